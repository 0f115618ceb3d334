"""Multi-GPU check: tensor-parallel (TP=N) greedy parity with TP=1 on random-weight checkpoints.

Run on a machine with >= N CUDA GPUs (nvidia-h200-x2 for N=2); prints ONE table at the end.

    python bench/multi_gpu.py [--tp 2] [--dtypes bfloat16,float32] [--requests 32]
                              [--max-tokens 64] [--shapes qwen3-0.6b,qwen2-1.5b,llama-mqa]
                              [--enforce-eager] [--out DIR]
    python bench/multi_gpu.py --smoke    # tiny shapes on CPU (gloo), fp32: the same code paths

For each shape a random checkpoint in HF layout (safetensors, HF tensor names, bf16) is
written once, so TP=1 and TP=N load the very same weights (TP=N through the sharded loader:
each rank reads only its slices). For each dtype, TP=1 then TP=N run the same requests
(greedy, ignore_eos; mixed prompt lengths, a shared prefix, prompts longer than the batch
budget so prefill is chunked), each step driven through ``forward_logits`` so the logits of
the first ``--logit-steps`` generated tokens are kept; then ``LLM.generate`` is timed on the
same requests.

Columns:
  identical  requests whose whole greedy output equals TP=1's
  prefix     mean share of each output equal to TP=1's before the first different token
  top1       argmax agreement with TP=1 at the kept steps where both had the same inputs
  rel err    max over those steps of max|logits - logits_TP1| / max|logits_TP1|
  tok/s      output tokens/s of LLM.generate (TP=1 | TP=N; prefixes cached by the parity pass)
  verdict    fp32: "parity" when every output is identical and rel err < 1e-3

bf16: random weights give flat logits (top-2 gaps of a few % of the logit scale) and the
all-reduce reorders bf16 sums, so near-ties flip and outputs diverge after some tokens; the
bf16 rows are informative (rel err, top1 at equal inputs), the fp32 rows are the check.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

SHAPES: dict[str, dict[str, Any]] = {
    # 8 KV heads: split 4 + 4 at TP=2.
    "qwen3-0.6b": dict(
        model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        tie_word_embeddings=True, rope_theta=1000000.0,
    ),
    # q/k/v biases; 2 KV heads (1 per rank at TP=2, replicated at TP=4).
    "qwen2-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
        tie_word_embeddings=True, rope_theta=1000000.0,
    ),
    # One KV head (replicated on every rank); a vocab that does not split evenly.
    "llama-mqa": dict(
        model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=1, vocab_size=32001,
        tie_word_embeddings=False, rope_theta=10000.0,
    ),
}  # fmt: skip
SMOKE: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    vocab_size=1001,
)  # fmt: skip
COMMON: dict[str, Any] = dict(
    hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=4096, eos_token_id=0,
    bos_token_id=1, torch_dtype="bfloat16",
)  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def hf_tensor_shapes(cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """HF names and shapes of a llama-family checkpoint."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    yield "model.embed_tokens.weight", (vocab, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        for name, rows in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
            yield p + f"self_attn.{name}.weight", (rows, h)
            if cfg["model_type"] == "qwen2":
                yield p + f"self_attn.{name}.bias", (rows,)
        yield p + "self_attn.o_proj.weight", (h, heads * d)
        if cfg["model_type"] == "qwen3":
            yield p + "self_attn.q_norm.weight", (d,)
            yield p + "self_attn.k_norm.weight", (d,)
        yield p + "mlp.gate_proj.weight", (inter, h)
        yield p + "mlp.up_proj.weight", (inter, h)
        yield p + "mlp.down_proj.weight", (h, inter)
    yield "model.norm.weight", (h,)
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", (vocab, h)


def write_checkpoint(cfg: dict[str, Any], path: Path, device: str, seed: int = 0) -> Path:
    """Random bf16 weights (std 0.02, norms 1, biases std 0.02) in HF layout, no tokenizer."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, shape in hf_tensor_shapes(cfg):
        if "norm" in name:
            t = torch.ones(shape, device=device)
        else:
            t = torch.empty(shape, device=device).normal_(0.0, 0.02, generator=gen)
        tensors[name] = t.to(torch.bfloat16).cpu()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**COMMON, **cfg}))
    if device == "cuda":
        torch.cuda.empty_cache()  # KV sizing reads the driver's free memory
    return path


def make_requests(n: int, vocab: int, smoke: bool, seed: int = 0) -> list[list[int]]:
    """Mixed lengths; a quarter share a long prefix (prefix-cache hits)."""
    rng = random.Random(seed)
    lo, hi, shared_len = (4, 60, 24) if smoke else (16, 600, 256)
    shared = [rng.randrange(10, vocab) for _ in range(shared_len)]
    out = []
    for i in range(n):
        tail = [rng.randrange(10, vocab) for _ in range(rng.randint(lo, hi))]
        out.append(shared + tail[: hi // 4] if i % 4 == 0 else tail)
    return out


@torch.inference_mode()
def greedy_with_logits(
    engine: Any, prompts: list[list[int]], max_tokens: int, keep_steps: int
) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Step the engine through ``forward_logits`` (the path that reaches every rank);
    per prompt its greedy tokens and the fp32 CPU logits of the first ``keep_steps``."""
    from gpu_engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    tokens: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    while engine.has_unfinished():
        batch = engine.scheduler.schedule(time.time())
        out, rows = engine.model_runner.forward_logits(batch)
        picked = out.argmax(dim=-1).tolist() if rows else []
        sampled: list[int | None] = [None] * len(batch.seqs)
        for r, i in enumerate(rows):
            sampled[i] = picked[r]
            k = int(batch.seqs[i].request_id[1:])
            if len(logits[k]) < keep_steps:
                logits[k].append(out[r].float().cpu())
        for seq, token in engine.scheduler.postprocess(batch, sampled):
            tokens[int(seq.request_id[1:])].append(token)
    return tokens, logits


def run_engine(path: Path, tp: int, dtype: str, prompts: list[list[int]], args: Any) -> dict:
    from gpu_engine import LLM, SamplingParams

    options: dict[str, Any] = dict(
        dtype=dtype,
        tensor_parallel_size=tp,
        max_num_seqs=64,
        max_num_batched_tokens=64 if args.smoke else 512,
        enforce_eager=args.enforce_eager,
    )
    if args.smoke:
        options.update(device="cpu", kv_cache_tokens=8192)
    else:
        options.update(gpu_memory_utilization=0.5)
    t0 = time.perf_counter()
    llm = LLM(str(path), **options)
    build_s = time.perf_counter() - t0
    try:
        tokens, logits = greedy_with_logits(llm.engine, prompts, args.max_tokens, args.logit_steps)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        gen_s = time.perf_counter() - t0
        runner = llm.engine.model_runner
        info = dict(
            graphs=runner.graphs is not None,
            kv_heads_per_rank=runner.arch.num_kv_heads,
            kv_tokens=runner.num_kv_blocks * runner.block_size,
            prefix_hits=llm.engine.stats()["prefix_cache_hit_tokens"],
        )
    finally:
        llm.close()
        del llm
        # The runner, its CUDA graphs and KV cache sit in reference cycles: collect them and
        # hand the cached blocks back, or the next engine on this GPU finds no memory.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    # Not compared with ``tokens``: the timed pass reuses the parity pass's cached prefixes,
    # which changes bf16 rounding (near-ties may flip); it only measures speed.
    del outs
    return dict(
        tokens=tokens,
        logits=logits,
        build_s=build_s,
        tok_s=sum(len(t) for t in tokens) / gen_s,
        **info,
    )


def compare(ref: dict, got: dict) -> dict[str, float]:
    identical, prefix_share, agree, compared, err = 0, 0.0, 0, 0, 0.0
    for ref_t, got_t, ref_l, got_l in zip(
        ref["tokens"], got["tokens"], ref["logits"], got["logits"], strict=True
    ):
        diff = [i for i, (a, b) in enumerate(zip(ref_t, got_t, strict=True)) if a != b]
        same = diff[0] if diff else len(ref_t)  # tokens equal before the first difference
        identical += ref_t == got_t
        prefix_share += same / max(1, len(ref_t))
        # Step k's inputs are equal while the tokens before it are equal (k <= same).
        for a, b in list(zip(ref_l, got_l, strict=True))[: same + 1]:
            compared += 1
            agree += int(a.argmax() == b.argmax())
            err = max(err, float((a - b).abs().max() / a.abs().max()))
    n = len(ref["tokens"])
    return dict(identical=identical, n=n, prefix=prefix_share / n, top1=agree / compared, err=err)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtypes", default=None, help="default bfloat16,float32 (--smoke: float32)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--logit-steps", type=int, default=8)
    ap.add_argument("--enforce-eager", action="store_true", help="no decode CUDA graphs")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU with gloo")
    ap.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = ap.parse_args()
    if args.dtypes is None:  # bf16 takes the same code paths: the smoke run checks fp32 parity
        args.dtypes = "float32" if args.smoke else "bfloat16,float32"
    if args.smoke:
        torch.set_num_threads(1)
        args.requests, args.max_tokens = min(args.requests, 6), min(args.max_tokens, 8)
        shapes = {
            "smoke-kv2": {**SHAPES["qwen3-0.6b"], **SMOKE, "num_key_value_heads": 2,
                          "head_dim": 16},
            "smoke-kv1": {**SHAPES["llama-mqa"], **SMOKE},
        }  # fmt: skip
    else:
        if torch.cuda.device_count() < args.tp:
            sys.exit(f"needs {args.tp} CUDA devices, found {torch.cuda.device_count()}")
        shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
        gpus = [torch.cuda.get_device_name(i) for i in range(args.tp)]
        log(f"torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}, GPUs {gpus}")
    device = "cpu" if args.smoke else "cuda"
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="chatq-multi-gpu-") as tmp:
        for name, cfg in shapes.items():
            log(f"{name}: writing a random checkpoint")
            path = write_checkpoint(cfg, Path(tmp) / name, device)
            prompts = make_requests(args.requests, cfg["vocab_size"], args.smoke)
            for dtype in args.dtypes.split(","):
                runs = {}
                for tp in (1, args.tp):
                    log(f"{name} {dtype}: TP={tp}")
                    runs[tp] = run_engine(path, tp, dtype, prompts, args)
                    log(f"  built in {runs[tp]['build_s']:.1f} s, {runs[tp]['tok_s']:.0f} tok/s")
                c = compare(runs[1], runs[args.tp])
                verdict = "-"
                if dtype == "float32":
                    ok = c["identical"] == c["n"] and c["err"] < 1e-3
                    verdict = "parity" if ok else "MISMATCH"
                two = runs[args.tp]
                rows.append(
                    [
                        name,
                        dtype,
                        f"{c['identical']}/{c['n']}",
                        f"{100 * c['prefix']:.1f}%",
                        f"{100 * c['top1']:.1f}%",
                        f"{c['err']:.1e}",
                        f"{two['kv_heads_per_rank']}",
                        "yes" if two["graphs"] else "no",
                        f"{runs[1]['tok_s']:.0f} | {two['tok_s']:.0f}",
                        verdict,
                    ]
                )
                results.append(
                    dict(
                        shape=name,
                        dtype=dtype,
                        tp=args.tp,
                        **c,
                        tok_s_tp1=runs[1]["tok_s"],
                        tok_s_tpn=two["tok_s"],
                        kv_heads_per_rank=two["kv_heads_per_rank"],
                        graphs=two["graphs"],
                        prefix_hits=two["prefix_hits"],
                    )
                )
    head = [
        "shape",
        "dtype",
        "identical",
        "prefix",
        "top1",
        "rel err",
        "KV heads/rank",
        "graphs",
        "tok/s TP1 | TPN",
        "verdict",
    ]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print(f"\nTP={args.tp} vs TP=1, {args.requests} requests x {args.max_tokens} greedy tokens")
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "multi_gpu.json").write_text(json.dumps(results, indent=2))
    if any(row[-1] == "MISMATCH" for row in rows):
        print("fp32 TP outputs differ from TP=1", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
