#!/usr/bin/env bash
# The full spike (30 s burst) outlives one device command (10 min): start it in its own
# process session, then collect it with later calls on the same (still warm) machine.
#   scripts/device_spike_bg.sh start -- [bench/spike.py args]   returns at once
#   scripts/device_spike_bg.sh wait SECONDS                      waits, then reports; when the
#                                                                run is over, copies its files to $OUT
set -uo pipefail
BG=/tmp/chatq-spike-bg
case "${1:-}" in
  start)
    shift; [[ "${1:-}" == "--" ]] && shift
    rm -rf "$BG"; mkdir -p "$BG"
    OUT="$BG/out" SPIKE_TIMEOUT_S=1500 setsid nohup bash -c \
      'bash scripts/device_spike.sh spike -- "$@"; echo "exit $?" > '"$BG"'/done' _ "$@" \
      > "$BG/run.log" 2>&1 < /dev/null &
    sleep 5; cat "$BG/run.log"; echo "started (pid $!)"
    ;;
  wait)
    end=$(( $(date +%s) + ${2:-60} ))
    while [[ ! -f "$BG/done" && $(date +%s) -lt $end ]]; do sleep 5; done
    tail -5 "$BG/out/spike.log" 2>/dev/null; tail -3 "$BG/out/spike/worker.log" 2>/dev/null
    if [[ -f "$BG/done" ]]; then
      cat "$BG/done"; mkdir -p "${OUT:-/tmp/out}"; cp -r "$BG/out/." "${OUT:-/tmp/out}/"
      cat "$BG/run.log" | tail -40
    else
      echo "still running"; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
    fi
    ;;
  *) echo "usage: $0 start -- [spike args] | wait SECONDS" >&2; exit 2 ;;
esac
