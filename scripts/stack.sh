#!/usr/bin/env bash
# The compose stack on a machine without a container registry (CI, and these dev machines):
#   bash scripts/stack.sh prepare   base image by debootstrap, the CPU torch wheel and this
#                                   machine's CA bundle into the build context
#   bash scripts/stack.sh env       print the variables compose needs (eval "$(... env)")
# With a registry, plain `docker compose build && docker compose up` needs none of this.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${CHATQ_BASE_IMAGE:-local/debian:bookworm}
case "${1:-}" in
  prepare)
    bash scripts/base_image.sh "$BASE"
    if ! ls deploy/docker/wheels/torch-*.whl >/dev/null 2>&1; then
      # The same torch==2.13.0 file this machine's pip installs (its CPU build).
      python3 -m pip download -q --no-deps --only-binary=:all: -d deploy/docker/wheels \
        torch==2.13.0
    fi
    for ca in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
      if [ -f "$ca" ]; then cp "$ca" deploy/docker/ca-certificates.crt; break; fi
    done
    ;;
  env)
    echo "export CHATQ_BASE_IMAGE=$BASE CHATQ_DEBIAN_IMAGE=$BASE"
    ;;
  *)
    echo "usage: bash scripts/stack.sh prepare|env" >&2
    exit 2
    ;;
esac
