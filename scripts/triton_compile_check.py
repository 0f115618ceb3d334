"""Compile every Triton kernel for sm_90 on a machine without a GPU (ptxas ships with triton).

Catches type/shape errors before device time is spent, and prints registers, spills and
shared memory per kernel variant; ``--sass`` also counts tensor-core instructions.
Usage: TRITON_INTERPRET=0 python scripts/triton_compile_check.py [--sass | --coverage]
``--coverage`` compiles nothing: it checks that every launchable kernel (a ``@triton.jit``
function named ``*_kernel``) in ``gpu_engine.kernels`` has a variant here (run by
tests/gpu_engine/test_kernels.py; .ci/run runs the full compile).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # before gpu_engine.kernels defines the kernels

import triton
from triton.backends.compiler import GPUTarget

from gpu_engine.kernels import (
    activation,
    decode_attention,
    fp8_gemm,
    kv_cache,
    norm,
    prefill_attention,
    quant,
    rotary,
    sampling,
    shared_prefix,
)

P32, PI32, PI64, PF8 = "*fp32", "*i32", "*i64", "*fp8e4nv"
# Pointer arguments by name: index tables are int32, slots and positions int64, partials,
# scales and rotary tables fp32; every other ``*_ptr`` holds the data type of the variant.
INT32_PTRS = {
    "block_table_ptr", "seq_lens_ptr", "cu_seqlens_q_ptr", "kv_start_ptr", "tiles_ptr",
    "tile_group_ptr", "tile_members_ptr", "group_tables_ptr", "group_lens_ptr",
}  # fmt: skip
INT64_PTRS = {"slot_ptr", "pos_ptr"}
FP32_PTRS = {
    "part_out_ptr", "part_lse_ptr", "cos_ptr", "sin_ptr", "k_scale_ptr", "v_scale_ptr",
    "w_scale_ptr", "scale_ptr",
}  # fmt: skip
FP32_SCALARS = {"qk_scale", "eps"}
DIVISIBLE = {
    "stride_q_tok", "stride_q_head", "stride_o_tok", "stride_o_head", "stride_k_tok",
    "stride_v_tok", "stride_cache_slot", "stride_x", "stride_o",
}  # fmt: skip


def sig(
    fn, data: str, consts: dict[str, object], overrides: dict[str, str] | None = None
) -> triton.compiler.ASTSource:
    """The kernel's signature: every argument typed by its name (``overrides`` first), the
    constexprs given. Like the launcher at run time, pointers and strides that are multiples
    of 16 get the divisibility hint (our caches and row strides always are)."""
    overrides = overrides or {}
    missing = [n for n, p in zip(fn.arg_names, fn.params, strict=True)
               if p.is_constexpr and n not in consts]  # fmt: skip
    if missing:
        raise SystemExit(f"{fn.__name__}: no value for constexpr {missing} (update this script)")
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in overrides:
            signature[name] = overrides[name]
        elif name in INT32_PTRS:
            signature[name] = PI32
        elif name in INT64_PTRS:
            signature[name] = PI64
        elif name in FP32_PTRS:
            signature[name] = P32
        elif name.endswith("_ptr"):
            signature[name] = data
        else:
            signature[name] = "fp32" if name in FP32_SCALARS else "i32"
        if name.endswith("_ptr") or name.startswith("stride_c") or name in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


def _attention(dt: str, p: str, fp8: bool):
    """Decode (with and without a shared prefix), merge, prefill and shared-prefix kernels."""
    prec = "ieee" if dt == "fp32" else "tf32"
    cache = {"k_cache_ptr": PF8, "v_cache_ptr": PF8} if fp8 else {}
    tag = f"{dt}{' fp8kv' if fp8 else ''}"
    block_n = 64 if dt == "bf16" else 32
    common = dict(HEAD_DIM=128, BLOCK_D=128, PAGE=16, BLOCK_N=block_n, UPCAST=False,
                  PRECISION=prec, FP8=fp8, NUM_KV_HEADS=8,
                  FP16_DOT=fp8 and dt == "bf16")  # fmt: skip
    # Decode and the shared prefix read an FP8 cache (bf16 model) in tiles of 128 keys;
    # prefill keeps 64 (the launchers' choices).
    decode_n = 128 if fp8 and dt == "bf16" else block_n
    for splits in (1, 8):
        for group in (2, 7):
            for kv_start in (False, True):
                # With a shared prefix (4 prefix splits) and one split, the decode program
                # folds the prefix partials in itself.
                slots = splits + 4 * int(kv_start)
                consts = dict(common, BLOCK_N=decode_n, GROUP=group, GROUP_PAD=16,
                              NUM_SPLITS=splits, KV_START=kv_start, NUM_SLOTS=slots,
                              FOLD_PREFIX=kv_start and splits == 1)  # fmt: skip
                name = f"decode {tag} G{group} S{splits}{' prefix' if kv_start else ''}"
                stages = decode_attention.decode_stages(consts)
                yield name, sig(decode_attention._decode_kernel, p, consts, cache), 4, stages
    merge = dict(HEAD_DIM=128, BLOCK_D=128, NUM_SPLITS=8, NUM_SLOTS=9, SPLITS_PAD=16)
    yield f"merge {tag}", sig(decode_attention._merge_kernel, p, merge), 4, 1
    for bm in (16, 64) if dt == "bf16" else (16,):
        consts = dict(common, GROUP=2, BLOCK_M=bm)
        yield f"prefill {tag} M{bm}", sig(prefill_attention._prefill_kernel, p, consts, cache), 4, 2
    for group in (2, 7):
        consts = dict(common, BLOCK_N=decode_n, GROUP=group,
                      GROUP_PAD=triton.next_power_of_2(group),
                      BLOCK_S=shared_prefix.prefix_block_s(group), NUM_SLOTS=12,
                      PREFIX_SPLITS=4)  # fmt: skip
        kernel = shared_prefix._prefix_kernel
        yield f"prefix {tag} G{group}", sig(kernel, p, consts, cache), 4, 2


def _elementwise(dt: str, p: str):
    """KV store, RMSNorm, SiLU-and-mul, rotary."""
    yield f"store {dt}", sig(kv_cache._store_kv_kernel, p, dict(ROW=1024, BLOCK=1024)), 4, 1
    consts = dict(NUM_KV_HEADS=8, HEAD_DIM=128, HEADS_PAD=8, BLOCK_D=128, PAGE=16)
    cache = {"k_cache_ptr": PF8, "v_cache_ptr": PF8}
    yield f"store fp8 {dt}", sig(kv_cache._store_kv_fp8_kernel, p, consts, cache), 4, 1
    for res in (False, True):
        consts = dict(HAS_RESIDUAL=res, BLOCK=4096)
        yield f"rms {dt} res={res}", sig(norm._rms_norm_kernel, p, consts), 8, 1
    yield f"silu {dt}", sig(activation._silu_and_mul_kernel, p, dict(BLOCK=1024)), 4, 1
    consts = dict(Q_HEADS_PAD=32, K_HEADS_PAD=4, HALF=64, HALF_PAD=64)
    yield f"rope {dt}", sig(rotary._rotary_kernel, p, consts), 4, 1


def _fp8_linear(dt: str, p: str):
    """FP8 weight GEMM for small batches, and the row quantizer."""
    for bias in (False, True):
        consts = dict(HAS_BIAS=bias, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, UPCAST=False)
        kernel = fp8_gemm._fp8_small_m_kernel
        yield f"fp8 gemm {dt} bias={bias}", sig(kernel, p, consts, {"w_ptr": PF8}), 4, 4
    gemv = ((1, False, 32, 256, 4), (4, False, 32, 256, 4), (1, True, 32, 256, 4),
            (4, True, 32, 256, 4), (2, False, 16, 2048, 8), (2, True, 16, 2048, 8))  # fmt: skip
    for split, prefetch, block_n, block_k, warps in gemv:
        consts = dict(SPLIT=split, HAS_BIAS=True, BLOCK_N=block_n, BLOCK_K=block_k,
                      PREFETCH=prefetch, X_BLOCK=4096,
                      ACC_1D=block_n * block_k > fp8_gemm.GEMV_ACC_2D_MAX)  # fmt: skip
        types = {"w_ptr": PF8, "ws_ptr": P32, "count_ptr": PI32}
        kernel = fp8_gemm._fp8_gemv_kernel
        name = f"fp8 gemv {dt} {block_n}x{block_k} split={split}{' prefetch' if prefetch else ''}"
        yield name, sig(kernel, p, consts, types), warps, 4
    consts = dict(BLOCK=4096)
    yield f"quant rows {dt}", sig(quant._quantize_rows_kernel, p, consts, {"out_ptr": PF8}), 4, 1


def _sampling(dt: str, p: str):
    """The keyed sampler (random and greedy rows, with and without a grammar mask) and its
    exponential draws."""
    types = {"keys_ptr": PI64, "temperature_ptr": P32, "greedy_ptr": "*i1", "mask_ptr": PI32,
             "out_ptr": PI64}  # fmt: skip
    for random in (False, True):
        for masked in (False, True):
            consts = dict(RANDOM=random, MASKED=masked, ROWS=1, BLOCK=sampling.BLOCK_V)
            name = f"sample {dt}{' random' if random else ''}{' masked' if masked else ''}"
            yield name, sig(sampling._sample_keyed_kernel, p, consts, types), 8, 1
    consts = dict(ROWS=1, BLOCK=sampling.BLOCK_V)
    types = {"keys_ptr": PI64, "out_ptr": P32}
    yield f"exponential {dt}", sig(sampling._exponential_keyed_kernel, p, consts, types), 4, 1


def variants():
    for dt, p in (("bf16", "*bf16"), ("fp32", "*fp32")):
        for fp8 in (False, True):
            yield from _attention(dt, p, fp8)
        yield from _elementwise(dt, p)
        yield from _fp8_linear(dt, p)
        yield from _sampling(dt, p)


def uncovered() -> list[str]:
    """Launchable kernels of ``gpu_engine.kernels`` that no variant compiles."""
    import importlib
    import pkgutil

    import gpu_engine.kernels as package

    covered = {src.fn for _, src, _, _ in variants()}
    missing = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            jit = isinstance(obj, triton.runtime.jit.JITFunction)
            if jit and name.endswith("_kernel") and obj not in covered:
                missing.append(f"{info.name}.{name}")
    return sorted(set(missing))


def main() -> int:
    if "--coverage" in sys.argv:
        missing = uncovered()
        print("every kernel has a variant" if not missing else f"no variant for: {missing}")
        return 1 if missing else 0
    sass = "--sass" in sys.argv
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}), sm_90")
    print(f"{'kernel':28} {'regs':>5} {'spill':>6} {'smem':>7} {'hgmma/hmma':>11}")
    for name, src, warps, stages in variants():
        try:
            k = triton.compile(
                src, target=target, options={"num_warps": warps, "num_stages": stages}
            )
        except Exception as err:
            failed += 1
            print(f"{name:28} FAILED: {str(err).splitlines()[-1][:200]}")
            continue
        ptx = k.asm["ptx"]
        regs = spill = "?"
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run(
                [cuobjdump, "-res-usage", f.name], capture_output=True, text=True
            ).stdout
            m = re.search(r"REG:(\d+).*?STACK:(\d+)", res)
            if m:
                regs, spill = m.group(1), m.group(2)
            mma = "-"
            if sass:
                s = subprocess.run(
                    [cuobjdump, "-sass", f.name], capture_output=True, text=True
                ).stdout
                mma = f"{len(re.findall('HGMMA', s))}/{len(re.findall('HMMA', s))}"
        del ptx
        print(f"{name:28} {regs:>5} {spill:>6} {k.metadata.shared:>7} {mma:>11}")
    print(f"triton {triton.__version__}: {failed} of the variants FAILED" if failed
          else f"triton {triton.__version__}: every variant compiled")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
