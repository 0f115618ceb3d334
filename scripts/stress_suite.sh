#!/usr/bin/env bash
# Run the test suite (or a part of it) N times in a row under background CPU load and count
# the failing runs: the check that no test depends on timing (issue 23's target: 0).
#   scripts/stress_suite.sh [-n RUNS] [-b BUSY_PROCS] [pytest args...]
#   e.g. scripts/stress_suite.sh -n 10 -b 2 tests/workers/test_worker.py
# The load is BUSY_PROCS (default 2) processes spinning on the CPU, like `stress -c 2`;
# they are stopped on exit. One log per run under $STRESS_OUT (default /tmp/chatq-stress).
set -uo pipefail
cd "$(dirname "$0")/.."
runs=10
busy=2
while getopts "n:b:" opt; do
  case "$opt" in
    n) runs=$OPTARG ;;
    b) busy=$OPTARG ;;
    *) echo "usage: $0 [-n RUNS] [-b BUSY_PROCS] [pytest args...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
out=${STRESS_OUT:-/tmp/chatq-stress}
mkdir -p "$out"
PY=${PY:-.venv/bin/python}

pids=()
stop_load() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
}
trap stop_load EXIT
for _ in $(seq "$busy"); do
  "$PY" -c "while True: pass" &
  pids+=($!)
done

failed=0
for i in $(seq "$runs"); do
  log="$out/run-$i.log"
  start=$(date +%s)
  "$PY" -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1
  rc=$?
  summary=$(grep -E "(passed|failed|error)" "$log" | tail -1)
  echo "run $i/$runs: rc $rc in $(($(date +%s) - start)) s: $summary"
  if [ "$rc" -ne 0 ]; then
    failed=$((failed + 1))
    grep -E "^(FAILED|ERROR)" "$log" | head -10
  fi
done
echo "failing runs: $failed of $runs (background load: $busy busy processes; logs in $out)"
[ "$failed" -eq 0 ]
