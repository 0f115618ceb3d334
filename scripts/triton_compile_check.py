"""Compile every Triton kernel for sm_90 on a machine without a GPU (ptxas ships with triton).

Catches type/shape errors before device time is spent, and prints registers, spills and
shared memory per kernel variant; ``--sass`` also counts tensor-core instructions.
Usage: TRITON_INTERPRET=0 python scripts/triton_compile_check.py [--sass]
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
    kv_cache,
    norm,
    prefill_attention,
    rotary,
)

P16, P32, P64, PI32, PI64 = "*bf16", "*fp32", "*fp32", "*i32", "*i64"


def sig(fn, types: dict[str, str], consts: dict[str, object]) -> triton.compiler.ASTSource:
    # Like the launcher at run time: pointers and strides that are multiples of 16 get the
    # divisibility hint (our caches and row strides always are), which enables 16-B loads.
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        signature[name] = "constexpr" if name in consts else types.get(name, "i32")
        if (
            name.endswith("_ptr")
            or name.startswith("stride_c")
            or name
            in {
                "stride_q_tok",
                "stride_q_head",
                "stride_o_tok",
                "stride_o_head",
                "stride_k_tok",
                "stride_v_tok",
                "stride_cache_slot",
                "stride_x",
                "stride_o",
            }
        ):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


def variants():
    for dt, p in (("bf16", "*bf16"), ("fp32", "*fp32")):
        prec = "ieee" if dt == "fp32" else "tf32"
        attn_types = {
            "q_ptr": p,
            "k_cache_ptr": p,
            "v_cache_ptr": p,
            "out_ptr": p,
            "block_table_ptr": PI32,
            "seq_lens_ptr": PI32,
            "cu_seqlens_q_ptr": PI32,
            "part_out_ptr": P32,
            "part_lse_ptr": P32,
            "qk_scale": "fp32",
        }
        for splits in (1, 8):
            for group in (2, 7):
                yield (
                    f"decode {dt} G{group} S{splits}",
                    sig(
                        decode_attention._decode_kernel,
                        attn_types,
                        dict(
                            GROUP=group,
                            GROUP_PAD=16,
                            HEAD_DIM=128,
                            BLOCK_D=128,
                            PAGE=16,
                            BLOCK_N=64 if dt == "bf16" else 32,
                            NUM_SPLITS=splits,
                            UPCAST=False,
                            PRECISION=prec,
                        ),
                    ),
                    4,
                    2,
                )
        yield (
            "merge",
            sig(
                decode_attention._merge_kernel,
                {"part_out_ptr": P32, "part_lse_ptr": P32, "out_ptr": p},
                dict(HEAD_DIM=128, BLOCK_D=128, NUM_SPLITS=8, SPLITS_PAD=8),
            ),
            4,
            1,
        )
        for bm in (16, 64) if dt == "bf16" else (16,):
            yield (
                f"prefill {dt} M{bm}",
                sig(
                    prefill_attention._prefill_kernel,
                    attn_types,
                    dict(
                        GROUP=2,
                        HEAD_DIM=128,
                        BLOCK_D=128,
                        PAGE=16,
                        BLOCK_M=bm,
                        BLOCK_N=64 if dt == "bf16" else 32,
                        UPCAST=False,
                        PRECISION=prec,
                    ),
                ),
                4,
                2,
            )
        yield (
            f"store {dt}",
            sig(
                kv_cache._store_kv_kernel,
                {"k_ptr": p, "v_ptr": p, "k_cache_ptr": p, "v_cache_ptr": p, "slot_ptr": PI64},
                dict(ROW=1024, BLOCK=1024),
            ),
            4,
            1,
        )
        for res in (False, True):
            yield (
                f"rms {dt} res={res}",
                sig(
                    norm._rms_norm_kernel,
                    {
                        "x_ptr": p,
                        "res_ptr": p,
                        "w_ptr": p,
                        "out_ptr": p,
                        "res_out_ptr": p,
                        "eps": "fp32",
                    },
                    dict(HAS_RESIDUAL=res, BLOCK=4096),
                ),
                8,
                1,
            )
        yield (
            f"silu {dt}",
            sig(activation._silu_and_mul_kernel, {"x_ptr": p, "out_ptr": p}, dict(BLOCK=1024)),
            4,
            1,
        )
        yield (
            f"rope {dt}",
            sig(
                rotary._rotary_kernel,
                {"q_ptr": p, "k_ptr": p, "pos_ptr": PI64, "cos_ptr": P32, "sin_ptr": P32},
                dict(Q_HEADS_PAD=32, K_HEADS_PAD=4, HALF=64, HALF_PAD=64),
            ),
            4,
            1,
        )


def main() -> int:
    sass = "--sass" in sys.argv
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    target = GPUTarget("cuda", 90, 32)
    failed = 0
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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
