#!/usr/bin/env bash
# flash-attn 2 on the GPU host, built there from its source distribution (issue 22): the
# host has nvcc, torch and ninja but no network, and a call carries at most 64 MiB, so the
# sdist (scripts/flash_attn_sdist.sh, into .whl-flash/) travels and is compiled there for
# sm_90 only, cut down to what the engine calls: forward kernels (plain and split-KV, causal
# and not) for bf16 and head dims 64 and 128 (SmolLM2; Qwen3-0.6B, Qwen2.5-7B), no backward,
# dropout, ALiBi, softcap, uneven head dims or local windows. The build runs in the
# background under /tmp (kept while the machine is held), so it outlives one command:
#   run: carry [".whl-flash"], "bash scripts/device_flash_attn.sh build"   (starts, waits ~9 min)
#   run: carry [".whl-flash"], "bash scripts/device_flash_attn.sh wait test race engine"
# (the build takes ~80 s on the 16-core host: "build test race engine" fits one call).
# Parts: build (start, then wait), wait (until the wheel exists or the build failed), test
# (the flash_attn backend's tests on the GPU with the real package), race
# (bench/attention_race.py: our kernels vs flash-attn's), engine (nano-vllm's shape with each
# backend, side by side).
set -uo pipefail
ROOT=/tmp/chatq-flash
SRC="$ROOT/src"
LOG="$ROOT/build.log"
WHEEL_DIR="$ROOT/wheel"
SITE="$ROOT/site"
export PYTHONUNBUFFERED=1

start_build() {
  if [ -d "$SRC" ]; then echo "build already started ($LOG)"; return; fi
  mkdir -p "$ROOT" "$WHEEL_DIR"
  tar -xzf .whl-flash/flash_attn-*.tar.gz -C "$ROOT" && mv "$ROOT"/flash_attn-* "$SRC"
  python3 - "$SRC" <<'PY'
import re, sys
from pathlib import Path
src = Path(sys.argv[1])
setup = src / "setup.py"
text = setup.read_text()
# Only the kernels the engine launches: bf16 forward (and split-KV forward) for hdim 64 / 128.
keep = re.compile(r"flash_fwd(_split)?_hdim(64|128)_bf16(_causal)?_sm80\.cu")
def cut(match):
    lines = [l for l in match.group(0).splitlines()
             if ".cu\"" not in l or keep.search(l)]
    return "\n".join(lines)
text, n = re.subn(r'name="flash_attn_2_cuda",\s*sources=\[.*?\]', cut, text, count=1, flags=re.S)
assert n == 1, "flash_attn_2_cuda's source list not found"
for flag in ("BACKWARD", "DROPOUT", "ALIBI", "SOFTCAP", "UNEVEN_K", "LOCAL"):
    text = text.replace(f'# "-DFLASHATTENTION_DISABLE_{flag}",', f'"-DFLASHATTENTION_DISABLE_{flag}",')
setup.write_text(text)
switch = src / "csrc/flash_attn/src/static_switch.h"
s = switch.read_text()
start = s.index("#define HEADDIM_SWITCH")
end = s.index("}()", start) + 3
s = s[:start] + r'''#define HEADDIM_SWITCH(HEADDIM, ...)                                           \
  [&] {                                                                        \
    if (HEADDIM <= 64) {                                                       \
      constexpr static int kHeadDim = 64;                                      \
      return __VA_ARGS__();                                                    \
    } else if (HEADDIM <= 128) {                                               \
      constexpr static int kHeadDim = 128;                                     \
      return __VA_ARGS__();                                                    \
    }                                                                          \
    throw std::runtime_error("this flash-attn build has head dims 64 and 128 only"); \
  }()''' + s[end:]
start = s.index("#define FP16_SWITCH")
end = s.index("}()", start) + 3
s = s[:start] + r'''#define FP16_SWITCH(COND, ...)                                                 \
  [&] {                                                                        \
    if (COND) throw std::runtime_error("this flash-attn build has bf16 only"); \
    using elem_type = cutlass::bfloat16_t;                                     \
    return __VA_ARGS__();                                                      \
  }()''' + s[end:]
# DISABLE_BACKWARD leaves run_mha_bwd's dispatch in flash_api.cpp: with no backward
# kernels built it would be an undefined symbol at import.
api = src / "csrc/flash_attn/flash_api.cpp"
a = api.read_text()
call = "run_mha_bwd_<elem_type, kHeadDim, Is_causal>(params, stream);"
assert call in a, "run_mha_bwd's dispatch not found"
api.write_text(a.replace(call, 'throw std::runtime_error("this flash-attn build has no backward");'))
if "#include <stdexcept>" not in s:
    s = "#include <stdexcept>\n" + s
switch.write_text(s)
print("sources kept:", len(keep.findall(text)))
PY
  (
    cd "$SRC" && FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS=90 \
      MAX_JOBS="${MAX_JOBS:-16}" NVCC_THREADS="${NVCC_THREADS:-2}" \
      nohup python3 -m pip wheel -v --no-build-isolation --no-deps -w "$WHEEL_DIR" . \
      >"$LOG" 2>&1
    echo "exit $?" >>"$LOG"
  ) &
  disown
  echo "build started at $(date +%T) ($LOG)"
}

wait_build() {
  local limit=$1 t0
  t0=$(date +%s)
  while [ $(($(date +%s) - t0)) -lt "$limit" ]; do
    if ls "$WHEEL_DIR"/flash_attn-*.whl >/dev/null 2>&1; then
      echo "wheel: $(ls "$WHEEL_DIR") after $(($(date +%s) - t0)) s of waiting"
      python3 -m pip install -q --no-index --no-deps --target "$SITE" "$WHEEL_DIR"/flash_attn-*.whl
      return 0
    fi
    if grep -q "^exit [1-9]" "$LOG" 2>/dev/null; then
      grep -E "error|Error" "$LOG" | head -20; tail -20 "$LOG"; return 1
    fi
    sleep 10
  done
  echo "still building after $limit s: $(grep -c "Building\|nvcc" "$LOG") log lines"
  tail -3 "$LOG"
  return 2
}

for part in "$@"; do
  case "$part" in
    build) start_build; wait_build "${WAIT_S:-520}" ;;
    wait) wait_build "${WAIT_S:-520}" || exit 1 ;;
    test)
      PYTHONPATH="$SITE:$PWD" python3 -c "import flash_attn, flash_attn_2_cuda; print('flash_attn', flash_attn.__version__)" || exit 1
      PYTHONPATH="$SITE:$PWD" timeout "${TEST_S:-300}" python3 -m pytest -q -rs -p no:cacheprovider \
        -o addopts="" tests/gpu_engine/test_flash_attn.py 2>&1 | tail -25 ;;
    race)
      PYTHONPATH="$SITE:$PWD" timeout "${RACE_S:-300}" python3 bench/attention_race.py 2>&1 \
        | grep -v -E "leaked|skipped remainder|nanobind|refleaks" | tail -45 ;;
    engine)
      for backend in flash_attn triton; do
        PYTHONPATH="$SITE:$PWD" timeout 100 python3 bench/engine_throughput.py --hf-requests 0 \
          --skip-roofline --backend "$backend" 2>&1 | grep -E "^\| \(a\)|Error" | head -3
      done ;;
    *) echo "unknown part: $part (build, wait, test, race, engine)" >&2; exit 2 ;;
  esac
done
