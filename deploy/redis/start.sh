#!/bin/sh
# Start Redis for chatq: render the ACL file from users.acl.template with the passwords in
# CHATQ_REDIS_{PRODUCER,GATEWAY,WEBHOOKS,WORKER,OPERATOR}_PASSWORD, then run redis-server on redis.conf.
# Extra arguments go to redis-server (e.g. TLS options). `start.sh --check` is the health
# check: PING as the operator (over TLS when CHATQ_REDIS_TLS_CHECK_ARGS says how).
set -eu
CONF_DIR=$(dirname "$0")
if [ "${1:-}" = "--check" ]; then
  # shellcheck disable=SC2086
  REDISCLI_AUTH="$CHATQ_REDIS_OPERATOR_PASSWORD" redis-cli --user operator \
    ${CHATQ_REDIS_TLS_CHECK_ARGS:-} ping | grep -q PONG
  exit $?
fi
sha() {
  [ -n "$1" ] || { echo "start.sh: $2 is empty" >&2; exit 2; }
  printf '%s' "$1" | sha256sum | cut -d' ' -f1
}
P=$(sha "${CHATQ_REDIS_PRODUCER_PASSWORD:-}" CHATQ_REDIS_PRODUCER_PASSWORD)
G=$(sha "${CHATQ_REDIS_GATEWAY_PASSWORD:-}" CHATQ_REDIS_GATEWAY_PASSWORD)
H=$(sha "${CHATQ_REDIS_WEBHOOKS_PASSWORD:-}" CHATQ_REDIS_WEBHOOKS_PASSWORD)
W=$(sha "${CHATQ_REDIS_WORKER_PASSWORD:-}" CHATQ_REDIS_WORKER_PASSWORD)
O=$(sha "${CHATQ_REDIS_OPERATOR_PASSWORD:-}" CHATQ_REDIS_OPERATOR_PASSWORD)
ACL=${CHATQ_REDIS_ACL_FILE:-/run/chatq/users.acl}
grep -v '^#' "$CONF_DIR/users.acl.template" | grep -v '^$' \
  | sed -e "s/@PRODUCER_SHA256@/$P/" -e "s/@GATEWAY_SHA256@/$G/" \
      -e "s/@WEBHOOKS_SHA256@/$H/" -e "s/@WORKER_SHA256@/$W/" -e "s/@OPERATOR_SHA256@/$O/" \
  > "$ACL"
exec redis-server "$CONF_DIR/redis.conf" --aclfile "$ACL" "$@"
