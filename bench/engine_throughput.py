"""GPU benchmark: chatq throughput vs transformers continuous batching, decode roofline, KV.

Run on the device machine (one CUDA GPU); prints ONE table at the end.

(a) nano-vllm's benchmark shape: Qwen3-0.6B-shaped random bf16 weights, 256 requests of
    token-id prompts, ``random.seed(0)``, prompt lengths and output lengths
    ``randint(100, 1024)`` drawn exactly as nano-vllm's bench.py (all prompts first, then
    all output lengths: 133,966 output tokens), temperature 0.6, ``ignore_eos``. Output
    tokens/s of chatq and of transformers' own continuous batching
    (``init_continuous_batching`` + ``add_request`` with per-request ``max_new_tokens``)
    on the same requests in the same run. ``--hf-requests N`` runs only the first N
    requests through transformers (labelled "subset" in the table).
(b) decode roofline: Qwen2.5-7B-shaped random bf16 weights, batch 1, 8, 64 at context 512:
    time per output token (engine step, and graph replay alone) and achieved bandwidth =
    (weight bytes + KV bytes read per step) / time, over the device-to-device copy bandwidth
    measured in the same run (bytes read + written).
(c) KV bytes per token and paging waste (mean over the steps of (a)).

Variants side by side in one run: ``--kv-cache-dtypes auto,fp8`` runs (a) once per KV cache
dtype, ``--quantizations none,fp8`` runs (b) once per weight format (``fp8+kv`` adds the FP8
KV cache to FP8 weights). Each throughput also gets a cost per million output tokens at
``--usd-per-gpu-hour`` (a stated price, not a measurement).

    python bench/engine_throughput.py [--hf-requests 256] [--out DIR]
    python bench/engine_throughput.py --smoke     # tiny shapes, seconds, any device
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from random import randint, seed
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.kernel_profile import profile_kernels
from bench.phase_timer import PhaseTimer

QWEN3_06B: dict[str, Any] = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024,
    intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
    hidden_act="silu", attention_bias=False, eos_token_id=151645, bos_token_id=151643,
)  # fmt: skip
QWEN25_7B: dict[str, Any] = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
    intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
    max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
    hidden_act="silu", eos_token_id=151645, bos_token_id=151643,
)  # fmt: skip
NANO_VLLM_OUTPUT_TOKENS = 133_966
# --smoke: the same code paths on tiny shapes (any device, CPU included), so that CI (on the
# CPU) catches errors before device time is spent; a failed part fails the run.
SMOKE_SHAPE: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=10_240,
)  # fmt: skip
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_dir(cfg: dict[str, Any], root: Path, name: str) -> str:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    return str(path)


def kv_bytes_per_token(cfg: dict[str, Any], elem: int = 2) -> int:
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * elem


def nano_vllm_requests() -> tuple[list[list[int]], list[int]]:
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(100, 1024))] for _ in range(256)]
    max_tokens = [randint(100, 1024) for _ in range(256)]
    assert sum(max_tokens) == NANO_VLLM_OUTPUT_TOKENS, sum(max_tokens)
    return prompts, max_tokens


def copy_bandwidth_bytes_s() -> float:
    """Device-to-device copy of 4 GiB, counting bytes read + written; median of 20."""
    if DEVICE != "cuda":
        return float("nan")
    n = 2 * 2**30 // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    del src, dst
    return 2 * n * 2 / times[len(times) // 2]


def release_memory() -> None:
    """After an engine is gone: its reference cycles collected, its cached blocks returned,
    so the next engine sizes its KV cache from the whole device."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def free_engine(llm: Any) -> None:
    del llm
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def step_timer(engine: Any) -> PhaseTimer:
    """Host time in each phase of ``LLMEngine.begin_step`` / ``end_step``: ``launch`` holds
    the staging (``prepare`` or a graph's ``*_stage``), the forward and the sampling queued
    on the device; ``wait`` is the host blocked on a step's sampled tokens."""
    sched, runner = engine.scheduler, engine.model_runner
    return PhaseTimer(
        [
            (sched, "schedule", "schedule"),
            (runner, "launch", "launch"),
            (runner, "prepare", "prepare"),
            (runner, "_graph_decode_hidden", "graph_stage"),
            (runner, "_graph_mixed_hidden", "mixed_stage"),
            (sched, "commit", "commit"),
            (runner, "collect", "wait"),
            (sched, "complete", "complete"),
        ]
    )


# Steps with prefill chunks may all go through the mixed-step graphs on CUDA.
OPTIONAL_PHASES = ("prepare",)


# ---------------------------------------------------------------- (a) chatq


def usd_per_million_tokens(tok_s: float, usd_per_gpu_hour: float) -> float:
    return usd_per_gpu_hour / (tok_s * 3600) * 1e6


def run_chatq(
    path: str, prompts: list[list[int]], max_tokens: list[int], args: Any, kv: str = "auto"
) -> dict:
    from gpu_engine import LLM, SamplingParams
    from gpu_engine.gpu_stats import UtilizationSampler

    t0 = time.perf_counter()
    llm = LLM(
        path, dtype=args.dtype, load_format="random", max_model_len=4096,
        max_num_seqs=256, max_num_batched_tokens=args.max_num_batched_tokens,
        attention_backend=args.backend, kv_cache_dtype=kv,
    )  # fmt: skip
    runner = llm.engine.model_runner
    log(
        f"chatq up in {time.perf_counter() - t0:.1f}s: backend {runner.backend.name}, "
        f"{runner.num_kv_blocks} blocks x {runner.block_size}, graphs "
        f"{getattr(getattr(runner, 'graphs', None), 'batch_sizes', None)}"
    )
    # Warm-up (untimed): a long and a short prompt compile both prefill tile shapes.
    llm.generate([[7] * 300, [9] * 5], SamplingParams(max_tokens=8, ignore_eos=True))
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]
    timer = step_timer(llm.engine)
    steps0 = llm.engine.stats()["steps"]
    sync()
    with UtilizationSampler() as util:
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - t
    generated = sum(len(o.token_ids) for o in outs)
    assert generated == sum(max_tokens), (generated, sum(max_tokens))
    timer.require_all_ran(OPTIONAL_PHASES)
    stats = llm.engine.stats()
    steps = stats["steps"] - steps0
    res = {
        "tok_s": generated / elapsed, "elapsed_s": elapsed, "tokens": generated,
        "steps": steps, "paging_waste": stats["mean_paging_waste_fraction"],
        "preemptions": stats["preemptions"], "kv_blocks": runner.num_kv_blocks,
        "block_size": runner.block_size, "backend": runner.backend.name,
        "kv_cache_dtype": kv, "kv_bytes_per_token": runner.kv_bytes_per_token,
        "usd_per_m_tokens": usd_per_million_tokens(generated / elapsed, args.usd_per_gpu_hour),
        "host_ms_per_step": {k: 1e3 * v / max(1, steps) for k, v in timer.totals.items()},
        **util.summary(),
    }  # fmt: skip
    log(f"chatq: {res}")
    free_engine(llm)
    return res


# ---------------------------------------------------------------- (a) transformers


def run_transformers(prompts: list[list[int]], max_tokens: list[int], args: Any) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    n = min(args.hf_requests, len(prompts))
    prompts, max_tokens = prompts[:n], max_tokens[:n]
    if args.smoke:
        max_tokens = [min(m, 3) for m in max_tokens]
    shape = {**QWEN3_06B, **(SMOKE_SHAPE if args.smoke else {})}
    cfg = Qwen3Config(**{k: v for k, v in shape.items() if k not in ("architectures",)})
    dtype = getattr(torch, args.dtype)
    model = None
    impl_used = None
    for impl in ("paged|sdpa", "sdpa"):
        try:
            torch.manual_seed(0)
            with torch.device(DEVICE):
                model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=dtype)
            impl_used = impl
            break
        except Exception as err:  # try the next implementation name
            log(f"transformers attn_implementation {impl!r} failed: {err!r}"[:300])
    assert model is not None
    model.eval()
    gen_cfg = GenerationConfig(
        max_new_tokens=max(max_tokens), do_sample=True, temperature=0.6, top_k=0, top_p=1.0,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    cb: dict[str, Any] = {}
    if args.smoke and DEVICE != "cuda":  # a small cache: sized from free RAM, set-up takes ~15 s
        from transformers import ContinuousBatchingConfig

        cb["continuous_batching_config"] = ContinuousBatchingConfig(
            num_blocks=16, max_batch_tokens=256
        )
    manager = model.init_continuous_batching(generation_config=gen_cfg, **cb)
    if hasattr(manager, "warmup") and DEVICE == "cuda":  # it pre-captures CUDA graphs
        manager.warmup()
    manager.start()
    log(f"transformers {transformers.__version__} CB up ({impl_used}); {n} requests")
    done, tokens, timed_out = 0, 0, False
    t = time.perf_counter()
    for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True)):
        manager.add_request(input_ids=p, request_id=f"r{i}", max_new_tokens=m)
    while done < n:
        r = manager.get_result(timeout=1)
        if time.perf_counter() - t > args.hf_timeout_s:
            timed_out = True
            break
        if r is None:
            if hasattr(manager, "is_running") and not manager.is_running():
                break
            continue
        if r.is_finished():
            done += 1
            tokens += len(r.generated_tokens)
    elapsed = time.perf_counter() - t
    manager.stop(block=True, timeout=10)
    res = {
        "tok_s": tokens / elapsed, "elapsed_s": elapsed, "tokens": tokens, "requests": n,
        "finished": done, "expected_tokens": sum(max_tokens), "timed_out": timed_out,
        "attn_implementation": impl_used, "version": transformers.__version__,
    }  # fmt: skip
    log(f"transformers: {res}")
    del manager, model
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------- (b) roofline


def _decode_step_s(engine: Any, bs: int, prompt_len: int, steps: int, step: Any, tag: str) -> float:
    """Median seconds per decode step of ``bs`` greedy requests (one prefill step first),
    stepping with ``step`` (``engine.step`` or ``engine.pipelined_step``)."""
    from gpu_engine import SamplingParams

    for i in range(bs):
        engine.add_request(
            f"{tag}{bs}-{i}", [randint(0, 10000) for _ in range(prompt_len)],
            SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True),
        )  # fmt: skip
    engine.step()  # prefill (all prompts fit one step) + first token
    sync()
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    engine.finish_pipeline()
    times = sorted(times[2:-1] or times)
    return times[len(times) // 2]


def run_roofline(
    path: str, batches: list[int], copy_bw: float, args: Any, variant: str = "none"
) -> list[dict]:
    from gpu_engine import LLM

    ctx, steps = (512, 48) if not args.smoke else (40, 8)
    prompt_len = ctx - steps // 2  # contexts run prompt_len .. prompt_len + steps: mean ≈ ctx
    llm = LLM(
        path, dtype=args.dtype, load_format="random", max_model_len=2048,
        max_num_seqs=max(batches), max_num_batched_tokens=8192, attention_backend=args.backend,
        quantization=variant.removesuffix("+kv"),
        kv_cache_dtype="fp8" if variant.endswith("+kv") else "auto",
    )  # fmt: skip
    engine, runner = llm.engine, llm.engine.model_runner
    model = runner.model
    embed = model.model.embed_tokens.weight
    # FP8 layers keep their weights and scales as buffers.
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for n, b in model.named_buffers() if "weight" in n
    )
    weight_bytes -= embed.numel() * embed.element_size()  # only B rows of the table are read
    kv_tok = runner.kv_bytes_per_token
    rows = []
    for bs in batches:
        step_s = _decode_step_s(engine, bs, prompt_len, steps, engine.step, "b")
        # The engine's own loop (workers run it): each step's host work overlaps the device.
        pipelined_s = _decode_step_s(engine, bs, prompt_len, steps, engine.pipelined_step, "p")
        # Graph replay alone (forward of all layers, no LM head / sampling / host work).
        replay_s = float("nan")
        graphs = getattr(runner, "graphs", None)
        if graphs is not None and bs in graphs.graphs:
            g = graphs.graphs[bs]
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            g.replay()
            a.record()
            for _ in range(20):
                g.replay()
            b.record()
            b.synchronize()
            replay_s = a.elapsed_time(b) / 1e3 / 20
            if args.profile and bs == 1:
                profile_replay(g)
        step_bytes = weight_bytes + bs * embed.shape[1] * 2 + bs * ctx * kv_tok
        head = model.lm_head.weight
        replay_bytes = step_bytes - head.numel() * head.element_size()  # the head runs after
        row = {
            "variant": variant, "batch": bs, "step_ms": step_s * 1e3, "replay_ms": replay_s * 1e3,
            "ms_per_token": step_s * 1e3 / bs, "pipelined_ms_per_token": pipelined_s * 1e3 / bs,
            "bytes_per_step": step_bytes,
            "bw_tb_s": step_bytes / step_s / 1e12, "frac_copy_bw": step_bytes / step_s / copy_bw,
            "replay_frac_copy_bw": replay_bytes / replay_s / copy_bw,
            "usd_per_m_tokens": usd_per_million_tokens(bs / step_s, args.usd_per_gpu_hour),
        }  # fmt: skip
        log(f"roofline: {row}")
        rows.append(row)
    free_engine(llm)
    return rows


def profile_replay(graph: Any) -> None:
    """Kernel-level breakdown of five replays (where the time of a decode step goes)."""

    def replays() -> None:
        for _ in range(5):
            graph.replay()

    log(profile_kernels(replays, "decode replay profile (5 replays)"))


# ---------------------------------------------------------------- table


def _chatq_rows(res: dict) -> list[str]:
    runs = res.get("chatq", {})
    base = runs.get("auto")
    lines = []
    for kv, a in runs.items():
        ratio = f", **{a['tok_s'] / base['tok_s']:.2f}x** bf16 KV" if base and a is not base else ""
        lines.append(
            f"| (a) nano-vllm shape, Qwen3-0.6B bf16, 256 req, KV {kv} | chatq output tok/s | "
            f"**{a['tok_s']:,.0f}** ({a['tokens']:,} tok in {a['elapsed_s']:.2f} s, "
            f"{a['steps']} steps, {a['kv_bytes_per_token']:,} KV B/token, "
            f"${a['usd_per_m_tokens']:.3f}/M tok{ratio}) |"
        )
        host = ", ".join(f"{k} {v:.2f}" for k, v in a["host_ms_per_step"].items())
        lines.append(f"| (a) KV {kv} | chatq host ms/step | {host} |")
        if "gpu_util_mean_pct" in a:
            lines.append(
                f"| (a) KV {kv} | chatq GPU util (NVML mean) / peak mem | "
                f"{a['gpu_util_mean_pct']:.0f}% / {a['memory_peak_mib'] / 1024:.1f} GiB |"
            )
    h = res.get("transformers")
    if h:
        label = "all 256 requests" if h["requests"] == 256 and not h["timed_out"] else (
            f"SUBSET: first {h['requests']} requests, {h['finished']} finished"
            + (" (TIMED OUT)" if h["timed_out"] else "")
        )  # fmt: skip
        lines.append(
            f"| (a) | transformers {h['version']} CB ({h['attn_implementation']}) tok/s | "
            f"{h['tok_s']:,.0f} ({h['tokens']:,} tok in {h['elapsed_s']:.1f} s; {label}) |"
        )
        if base:
            lines.append(f"| (a) | chatq / transformers | **{base['tok_s'] / h['tok_s']:.1f}x** |")
    return lines


def table(res: dict) -> str:
    dev = res["device"]
    lines = [
        f"device: {dev.get('name')} (driver {dev.get('driver')}), torch {res['torch']}, "
        f"triton {res['triton']}; copy bandwidth (read+write) {res['copy_bw'] / 1e12:.2f} TB/s; "
        f"cost at ${res['usd_per_gpu_hour']:.2f} per GPU-hour (stated price)",
        "| part | metric | value |",
        "|---|---|---|",
        *_chatq_rows(res),
    ]
    for r in res.get("roofline", []):
        lines.append(
            f"| (b) Qwen2.5-7B decode, weights {r['variant']}, ctx 512, batch {r['batch']} | "
            f"ms/step, ms/token, BW, of copy BW | {r['step_ms']:.2f} ms step "
            f"({r['replay_ms']:.2f} ms graph replay), **{r['ms_per_token']:.3f} ms/token** "
            f"(engine loop, pipelined: **{r['pipelined_ms_per_token']:.3f}**), "
            f"{r['bw_tb_s']:.2f} TB/s, {100 * r['frac_copy_bw']:.0f}% (replay alone "
            f"{100 * r['replay_frac_copy_bw']:.0f}%), ${r['usd_per_m_tokens']:.2f}/M tok |"
        )
    for key, err in res.get("errors", {}).items():
        lines.append(f"| {key} | FAILED | {err} |")
    for name, b in res["kv_bytes_per_token"].items():
        lines.append(f"| (c) | KV bytes/token {name} (bf16) | {b:,} B ({b / 1024:.0f} KiB) |")
    for kv, a in res.get("chatq", {}).items():
        lines.append(
            f"| (c) KV {kv} | paging waste (mean over steps of (a)) | "
            f"{100 * a['paging_waste']:.2f}% |"
        )
    return "\n".join(lines)


def guarded(res: dict, key: str, fn: Any, *fn_args: Any) -> None:
    try:
        res[key] = fn(*fn_args)
    except Exception as err:  # report and go on with the next part
        import traceback

        traceback.print_exc()
        res.setdefault("errors", {})[key] = repr(err)[:500]
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf-requests", type=int, default=256, help="0 skips transformers")
    ap.add_argument("--hf-timeout-s", type=float, default=400.0)
    ap.add_argument("--skip-chatq", action="store_true")
    ap.add_argument("--skip-roofline", action="store_true")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--profile", action="store_true", help="kernel breakdown of a 7B replay")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 8 short requests")
    ap.add_argument("--kv-cache-dtypes", default="auto", help="(a) once per KV dtype: auto,fp8")
    ap.add_argument(
        "--quantizations",
        default="none",
        help="(b) once per weight format: none, fp8, fp8-lm-head, each +kv for the FP8 KV cache",
    )
    ap.add_argument("--usd-per-gpu-hour", type=float, default=3.0, help="stated price")
    ap.add_argument("--batches", default="1,8,64", help="(b) batch sizes")
    args = ap.parse_args()
    import triton

    from gpu_engine.gpu_stats import gpu_snapshot

    res: dict[str, Any] = {
        "device": gpu_snapshot(), "torch": torch.__version__, "triton": triton.__version__,
        "kv_bytes_per_token": {
            "Qwen3-0.6B": kv_bytes_per_token(QWEN3_06B), "Qwen2.5-7B": kv_bytes_per_token(QWEN25_7B)
        },
    }  # fmt: skip
    res["usd_per_gpu_hour"] = args.usd_per_gpu_hour
    res["copy_bw"] = copy_bandwidth_bytes_s()
    log(f"copy bandwidth {res['copy_bw'] / 1e12:.2f} TB/s; {res['device']}")
    prompts, max_tokens = nano_vllm_requests()
    qwen3, qwen25 = QWEN3_06B, QWEN25_7B
    if args.smoke:
        torch.set_num_threads(1)  # tiny shapes: more threads only contend on a shared CPU
        if DEVICE == "cpu":
            args.dtype = "float32"
        prompts, max_tokens = [p[:60] for p in prompts[:8]], [m % 16 + 1 for m in max_tokens[:8]]
        qwen3, qwen25 = {**qwen3, **SMOKE_SHAPE}, {**qwen25, **SMOKE_SHAPE}
        # transformers' continuous batching takes ~0.5 s per token on the CPU: 2 short ones.
        args.hf_requests = min(args.hf_requests, 2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Each part is guarded: a failure is reported, the other parts still run, and the
        # exit status is 1.
        if not args.skip_roofline:
            batches = [int(b) for b in args.batches.split(",")] if not args.smoke else [1, 4]
            path = model_dir(qwen25, root, "qwen25-7b")
            for variant in args.quantizations.split(","):
                part: dict[str, Any] = {}
                guarded(part, variant, run_roofline, path, batches, res["copy_bw"], args, variant)
                res.setdefault("roofline", []).extend(part.get(variant, []))
                res.setdefault("errors", {}).update(part.get("errors", {}))
                release_memory()
        if not args.skip_chatq:
            path = model_dir(qwen3, root, "qwen3-06b")
            for kv in args.kv_cache_dtypes.split(","):
                part = res.setdefault("chatq", {})
                guarded(part, kv, run_chatq, path, prompts, max_tokens, args, kv)
                res.setdefault("errors", {}).update(part.pop("errors", {}))
                release_memory()
    if args.hf_requests > 0:
        guarded(res, "transformers", run_transformers, prompts, max_tokens, args)
    text = table(res)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "engine_throughput.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "engine_throughput.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    if res.get("errors"):  # reported in the table; the run still fails
        print(f"failed parts: {sorted(res['errors'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
