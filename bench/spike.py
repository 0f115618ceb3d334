"""The headline proof: Redis in front of one GPU worker absorbs a burst of 20x capacity.

One command: builds a random-weight model in real shape (Qwen2.5-1.5B / DeepSeek-R1-Distill-
Qwen-1.5B by default, bf16, ``ignore_eos``), measures the engine alone on the workload
(capacity and the throughput baseline), starts a private Redis and one ``chatq worker``
subprocess, then drives async producers through three phases: calm at 50% of capacity, a
burst at ``--burst-x`` times capacity for ``--burst-s`` seconds, and recovery until the backlog
is drained. A sampler records backlog, pending, throughput and GPU state once a second.
Writes ``spike.json`` and ``spike.png`` under ``--out`` and prints one table last.

    python bench/spike.py --out out/spike                      # on the GPU machine
    python bench/spike.py --smoke      # tiny model on the CPU, 1 s calm, 1 s burst, seconds

The run fails (exit 1) if a request was lost, answered twice or errored.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import smoke
from bench.kernel_profile import profile_kernels
from bench.spike_drive import GpuSampler
from bench.spike_report import Figures, plot, summarize
from bench.workload import ChatRequest, make_requests
from gpu_engine.config import QUANTIZATIONS

SMOKE: dict[str, Any] = dict(
    preset="tiny", device="cpu", system_tokens=50, calm_s=1.0, burst_s=1.0, burst_x=3.0,
    alone_requests=12, max_num_seqs=4, max_num_batched_tokens=512, max_model_len=512,
    drain_timeout_s=120.0, answer_tokens=(4, 12),
)  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeek-R1-Distill-Qwen-1.5B / Qwen2.5-1.5B shape.
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=10000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,  # SmolLM2 tokenizer's vocabulary
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
}


def build_model(out_dir: Path, preset: str, tokenizer_dir: Path, device: str) -> Path:
    """Random weights in real shape, written as safetensors next to a real tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    model_dir = out_dir / f"model-{preset}"
    if (model_dir / "model.safetensors").exists():
        return model_dir
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(model_dir)
    cfg = Qwen2Config(**PRESETS[preset], eos_token_id=tok.eos_token_id, torch_dtype="bfloat16")
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(cfg).named_parameters()}
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, device=device, dtype=torch.bfloat16)
        else:
            t = torch.randn(shape, device=device, generator=gen, dtype=torch.float32) * 0.02
            t = t.to(torch.bfloat16)
        tensors[name] = t.cpu()
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(model_dir)
    return model_dir


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        dtype="bfloat16" if args.device.startswith("cuda") else "float32",
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        mixed_step_graphs=not args.eager_mixed,
        async_scheduling=not args.sync_steps,
        kv_cache_dtype=args.kv_cache_dtype,
        shared_prefix_attention=args.shared_prefix,
        quantization=args.quantization,
    )


def engine_alone(model_dir: Path, reqs: list[ChatRequest], args: argparse.Namespace) -> dict:
    """The same requests straight into the engine: throughput and prefix-cache TTFT effect."""
    import torch
    from transformers import AutoTokenizer

    from gpu_engine import LLMEngine, SamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir)
    if args.device == "cpu":  # as the worker runs (--torch-threads 1): a tiny model on the CPU
        torch.set_num_threads(1)
    engine = LLMEngine.from_options(str(model_dir), **engine_options(args))
    # As the worker's engine process does after startup (it collects when it chooses, see
    # workers/engine_loop.py); switched back on when this returns.
    gc.freeze()
    gc.disable()

    def ids(r: ChatRequest) -> list[int]:
        out = tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    saturated: dict[str, float] = {}

    def run(batch: list[ChatRequest], tag: str) -> tuple[float, int, dict[str, float]]:
        first: dict[str, float] = {}
        # Tokenized before the clock starts: through the queue the worker's host process
        # tokenizes, in parallel with the engine; here it would stall the engine.
        prompts = [ids(r) for r in batch]
        start = time.perf_counter()
        for r, prompt in zip(batch, prompts, strict=True):
            sp = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
            engine.add_request(f"{tag}{r.index}", prompt, sp)
        tokens = 0
        saturated.clear()
        while engine.has_unfinished():
            # Asynchronous scheduling, as the worker's engine process steps it.
            for o in engine.pipelined_step():
                tokens += len(o.new_token_ids)
                if o.new_token_ids and o.request_id not in first:
                    first[o.request_id] = time.perf_counter() - start
            if not saturated and not engine.scheduler.waiting:
                # Every request admitted: the batch only shrinks from here (the tail).
                saturated.update(seconds=time.perf_counter() - start, tokens=tokens)
        return time.perf_counter() - start, tokens, first

    run(reqs[:4], "warm")  # compile / capture outside the timed region
    # Prefix-cache effect on TTFT: requests one at a time, shared system prompt (cached after
    # the warm-up) versus a system prompt never seen before.
    cold = make_requests(
        tok,
        8,
        seed=12345,
        system_tokens=args.system_tokens,
        answer_tokens=tuple(args.answer_tokens),
    )
    ttft_hit = [run([r], f"hit{i}-")[2].popitem()[1] for i, r in enumerate(reqs[4:12])]
    ttft_miss = []
    for i, r in enumerate(cold):
        unique = [{"role": "system", "content": f"[tenant {i}] " + r.messages[0]["content"]}]
        r2 = ChatRequest(r.index, unique + r.messages[1:], r.max_tokens)
        ttft_miss.append(run([r2], f"miss{i}-")[2].popitem()[1])
    steps0 = engine.stats()["steps"]
    gpu = GpuSampler()
    util: list[float] = []
    util_avg: list[float] = []
    sampling = threading.Event()

    def sample_gpu() -> None:
        while not sampling.wait(0.5):
            reading = gpu.read()
            util.append(reading.get("gpu_util", float("nan")))
            if "gpu_util_avg" in reading:
                util_avg.append(reading["gpu_util_avg"])

    sampler = threading.Thread(target=sample_gpu, daemon=True)
    sampler.start()
    elapsed, tokens, _ = run(reqs, "alone")
    sampling.set()
    sampler.join()
    stats = engine.stats()
    if args.profile_steps:
        # The same system prompt (cached), user turns not seen before: a full batch's steps.
        again = [[r.messages[0], {**r.messages[1], "content": "Again: " + r.messages[1]["content"]}]
                 for r in reqs[: 3 * args.max_num_seqs // 2]]  # fmt: skip
        prompts = [ids(ChatRequest(i, m, 0)) for i, m in enumerate(again)]
        print(profile_saturated(engine, prompts, [r.max_tokens for r in reqs], args.profile_steps))
    gc.enable()
    runner = engine.model_runner
    return dict(
        requests=len(reqs),
        seconds=elapsed,
        output_tokens=tokens,
        tok_s=tokens / elapsed,
        # While requests still waited for a slot (the queue's saturated window is the same);
        # the whole run when every request got a slot at once.
        tok_s_saturated=(
            saturated["tokens"] / saturated["seconds"]
            if saturated.get("tokens")
            else tokens / elapsed
        ),
        steps=stats["steps"] - steps0,
        gpu_util_mean=sum(util) / len(util) if util else float("nan"),
        gpu_util_avg_mean=sum(util_avg) / len(util_avg) if util_avg else float("nan"),
        mixed_graphs=runner.mixed_graphs is not None,
        mixed_replays=runner.mixed_graphs.num_replays if runner.mixed_graphs else 0,
        decode_replays=runner.graphs.num_replays if runner.graphs else 0,
        shared_prefix_steps=runner.graphs.sharing.num_staged
        if runner.graphs and runner.graphs.sharing
        else 0,
        kv_bytes_per_token=runner.kv_bytes_per_token,
        req_s=len(reqs) / elapsed,
        ttft_hit_ms=[t * 1000 for t in ttft_hit],
        ttft_miss_ms=[t * 1000 for t in ttft_miss],
        stats=stats,
    )


def profile_saturated(engine: Any, prompts: list[list[int]], max_tokens: list[int], n: int) -> str:
    """The kernels of ``n`` steps with every slot busy: ``prompts`` (more than the engine's
    slots) are added at once and stepped 20 times first; the steps before the profiled ones
    give the step's wall time without the profiler. The pass then runs to its end."""
    from gpu_engine import SamplingParams

    for i, (prompt, m) in enumerate(zip(prompts, max_tokens, strict=False)):
        sp = SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
        engine.add_request(f"profile{i}", prompt, sp)
    for _ in range(20):
        engine.pipelined_step()
    start = time.perf_counter()
    for _ in range(n):
        engine.pipelined_step()
    step_ms = (time.perf_counter() - start) / n * 1000
    running = len(engine.scheduler.running)

    def steps() -> None:
        for _ in range(n):
            engine.pipelined_step()

    table = profile_kernels(steps, f"{n} steps, {running} running, {step_ms:.2f} ms a step")
    while engine.has_unfinished():
        engine.pipelined_step()
    return table


def add_engine_variant_arguments(p: argparse.ArgumentParser) -> None:
    """The engine options ``engine_options`` and ``start_worker`` pass on (FP8 KV cache,
    shared-prefix attention, FP8 weights), for every benchmark that starts workers this way."""
    p.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8")
    p.add_argument(
        "--quantization",
        default="none",
        choices=QUANTIZATIONS,
        help="FP8 linear layers, quantized at load (fp8-lm-head: and the LM head)",
    )
    p.add_argument(
        "--shared-prefix",
        action="store_true",
        help="shared-prefix attention: the system prompt attended once per group and step",
    )


def start_worker(
    redis_url: str,
    model_dir: Path,
    args: argparse.Namespace,
    log: Path,
    *,
    name: str = "spike-gpu0",
    served_name: str = "spike",
    placement: list[str] | None = None,
) -> Any:
    """A ``chatq worker`` subprocess; ``placement`` defaults to ``--device <args.device>``
    (``["--gpus", "0,1"]`` for one worker per GPU)."""
    cmd = [
        sys.executable, "-m", "workers.cli", "worker", "--model", str(model_dir),
        "--redis", redis_url, "--name", name, "--served-model-name", served_name,
        *(placement or ["--device", args.device]),
        "--max-num-seqs", str(args.max_num_seqs),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--max-model-len", str(args.max_model_len),
        "--kv-cache-dtype", args.kv_cache_dtype,
        "--quantization", args.quantization,
        *(["--shared-prefix-attention"] if args.shared_prefix else []),
        *(["--torch-threads", "1"] if args.device == "cpu" else []),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="results directory (required unless --smoke)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-1.5b")
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer dir (default: the embedded SmolLM2 model's; --smoke: the test one)",
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--calm-s", type=float, default=20.0)
    p.add_argument("--burst-s", type=float, default=30.0)
    p.add_argument("--burst-x", type=float, default=20.0)
    p.add_argument("--calm-x", type=float, default=0.5)
    p.add_argument("--alone-requests", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument(
        "--max-model-len",
        type=int,
        default=4096,
        help="prompt + answer at most (the workload needs ~1,700; sizes the block tables)",
    )
    p.add_argument(
        "--eager-mixed",
        action="store_true",
        help="engine-alone pass: run steps with prefill chunks eagerly (A/B of mixed graphs)",
    )
    p.add_argument(
        "--sync-steps",
        action="store_true",
        help="engine-alone pass: no asynchronous scheduling (A/B of pipelined steps)",
    )
    add_engine_variant_arguments(p)
    p.add_argument("--drain-timeout-s", type=float, default=900.0)
    p.add_argument("--answer-tokens", type=int, nargs=2, default=(50, 400))
    p.add_argument("--alone-json", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after the engine-alone pass: a kernel table of this many full-batch steps (CUDA)",
    )
    smoke.add_smoke_flag(p, f"tiny model on the CPU, {SMOKE}")
    args = smoke.parse_args(p, SMOKE, None)
    if args.out is None and not args.smoke:
        p.error("--out is required (or --smoke)")
    if args.profile_steps < 0 or (args.profile_steps and not args.device.startswith("cuda")):
        p.error("--profile-steps: a positive count, on a CUDA device (the profile is CUDA's)")
    return args


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="chatq-spike-") as tmp:
        if args.out is None:
            args.out = Path(tmp)
        if args.tokenizer is None and args.smoke:
            from testkit.checkpoints import build_tokenizer

            args.tokenizer = args.out / "tokenizer"
            build_tokenizer(args.tokenizer)
        return run(args)


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from workers.redis_server import RedisServer

    if args.tokenizer is None:
        from gpu_engine.gguf import default_model_path

        args.tokenizer = default_model_path()
    model_dir = build_model(args.out, args.preset, args.tokenizer, args.device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    # The engine-alone pass runs the first requests of the run itself (make_requests is
    # prefix-stable: the first n of a longer list are the same requests).
    probe = make_requests(
        tok,
        args.alone_requests,
        seed=2,
        system_tokens=args.system_tokens,
        answer_tokens=tuple(args.answer_tokens),
    )
    if args.alone_json is not None:  # child mode: engine alone, result to a file, exit
        args.alone_json.write_text(json.dumps(engine_alone(model_dir, probe, args)))
        return 0
    # The engine-alone pass runs in its own process so its GPU memory is surely returned
    # before the worker sizes its KV cache from free memory.
    alone_path = args.out / "alone.json"
    child = ["--out", str(args.out), "--tokenizer", str(args.tokenizer)]  # the same model
    subprocess.run([sys.executable, *sys.argv, *child, "--alone-json", str(alone_path)], check=True)
    alone = json.loads(alone_path.read_text())
    capacity_rps = alone["req_s"]
    print(
        f"engine alone: {alone['tok_s']:.0f} tok/s, capacity {capacity_rps:.1f} req/s", flush=True
    )

    from bench.spike_drive import drive

    n_calm = int(args.calm_s * capacity_rps * args.calm_x)
    n_burst = int(args.burst_s * capacity_rps * args.burst_x)
    reqs = make_requests(
        tok,
        n_calm + n_burst,
        seed=2,
        system_tokens=args.system_tokens,
        answer_tokens=tuple(args.answer_tokens),
    )
    same = min(len(reqs), len(probe))
    assert [r.messages for r in reqs[:same]] == [r.messages for r in probe[:same]]
    schedule = [i / (capacity_rps * args.calm_x) for i in range(n_calm)]
    schedule += [args.calm_s + i / (capacity_rps * args.burst_x) for i in range(n_burst)]
    with RedisServer() as server:
        worker = start_worker(server.url, model_dir, args, args.out / "worker.log")
        try:
            result = asyncio.run(drive(server.url, "spike", reqs, schedule, args, worker))
        finally:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
    figures: Figures = summarize(result, alone, args, capacity_rps)
    (args.out / "spike.json").write_text(
        json.dumps({"figures": figures, "run": result, "alone": alone}, default=str, indent=1)
    )
    plot(result, args.out / "spike.png")
    for line in figures["table"]:
        print(line)
    if figures["lost"] or figures["duplicated"] or figures["errored"]:
        print("requests were lost, duplicated or errored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
