"""Host (Python) time per engine step, with the model forward stubbed out.

Drives ``LLMEngine.step`` on CPU with a tiny random Qwen3 (hidden 64, 1 layer, vocab 64)
whose forward pass is replaced by a zero tensor, so what is left is the host work that
runs serially with the GPU on the device: scheduling, building/staging the step's inputs,
the sampler's bookkeeping, postprocessing and the engine's own bookkeeping. Decode steps
take the CUDA-graph staging path (``DecodeGraphs.stage_and_run``) with a no-op replay, the
path the H200 benchmark takes.

Scenarios (both by default):
- ``decode``: 256 running sequences, block_size 16, prompts of randint(100, 2000) tokens
  (``random.seed(0)``), temperature 0.6, ``ignore_eos``; the timed steps are decode steps
  with all 256 sequences running (no finishes).
- ``nano``: nano-vllm's benchmark shape (256 requests, prompts randint(100, 1024), outputs
  randint(100, 1024), temperature 0.6) run to completion; per-step means over every step.

    .venv/bin/python bench/host_overhead.py [--steps 300] [--scenario decode] [--profile]
        [--eager-decode]   # also decode steps through prepare() (no graphs: CPU, TP ranks)
    .venv/bin/python bench/host_overhead.py --smoke   # every scenario, 8-16 requests

Prints one table: milliseconds per step of each phase (median over steps for ``decode``,
mean for ``nano``). ``other`` is ``LLMEngine.step`` minus the listed phases (StepOutput
building, paging-waste and prompt-token counters, sampler releases, waiting for the
step's tokens).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from random import randint, seed
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.phase_timer import PhaseTimer
from gpu_engine import EngineConfig, LLMEngine, SamplingParams
from gpu_engine.cuda_graphs import DecodeGraphs, MixedGraphs

TINY_QWEN3: dict[str, Any] = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64,
    intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, vocab_size=64, tie_word_embeddings=True,
    max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1000000.0,
    hidden_act="silu", attention_bias=False, eos_token_id=1, bos_token_id=0,
)  # fmt: skip
PHASES = (
    "schedule", "stage", "mixed_stage", "prepare", "logits", "sample", "commit", "complete",
    "other", "step",
)  # fmt: skip
# Decode steps through the graphs' staging never call prepare(); without graphs no step
# calls the graph stagings.
OPTIONAL_PHASES = ("prepare", "stage", "mixed_stage")


class _NoReplay:
    def replay(self) -> None:
        pass


@dataclass(frozen=True)
class Size:
    """Workload sizes: the benchmark's (the defaults) or ``--smoke``'s (same code paths,
    seconds on a CPU)."""

    seqs: int = 256  # decode: sequences running at once; nano: requests
    prompt_tokens: tuple[int, int] = (100, 2000)  # decode prompts
    decode_max_tokens: int = 2000
    spike_requests: int = 1024
    shared_tokens: int = 1000
    answer_tokens: tuple[int, int] = (50, 400)
    max_model_len: int = 4096


FULL = Size()
SMOKE = Size(
    seqs=8, prompt_tokens=(10, 40), decode_max_tokens=200, spike_requests=24, shared_tokens=40,
    answer_tokens=(4, 12), max_model_len=256,
)  # fmt: skip


class StepPhases:
    """Drives ``LLMEngine.step`` and keeps one dict of seconds per phase for every step."""

    def __init__(self, engine: LLMEngine) -> None:
        runner = engine.model_runner
        self.timer = PhaseTimer(
            [
                (engine.scheduler, "schedule", "schedule"),
                (runner, "_graph_decode_hidden", "stage"),
                (runner, "_graph_mixed_hidden", "mixed_stage"),
                (runner, "prepare", "prepare"),
                (runner.model, "compute_logits", "logits"),
                (runner.sampler, "sample_async", "sample"),
                (engine.scheduler, "commit", "commit"),
                (engine.scheduler, "complete", "complete"),
            ]
        )
        self.steps: list[dict[str, float]] = []
        self.engine = engine

    def step(self) -> list[Any]:
        current = self.timer.current
        current.clear()
        t = time.perf_counter()
        outs = self.engine.step()
        total = time.perf_counter() - t
        rec = {k: current.get(k, 0.0) for k in PHASES[:-2]}
        rec["other"] = total - sum(rec.values())
        rec["step"] = total
        rec["mixed"] = float(
            self.engine.model_runner.mixed_graphs is not None and bool(current.get("mixed_stage"))
        )
        self.steps.append(rec)
        return outs


def build_engine(
    root: Path, max_model_len: int, graphs_path: bool = True, max_num_seqs: int = 256
) -> LLMEngine:
    path = root / "tiny-qwen3"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_QWEN3))
    engine = LLMEngine(
        EngineConfig(
            model=str(path), load_format="random", device="cpu", dtype="float32",
            block_size=16, max_num_seqs=max_num_seqs, max_num_batched_tokens=8192,
            kv_cache_tokens=max_num_seqs * max_model_len, max_model_len=max_model_len,
            attention_backend="torch",
        )
    )  # fmt: skip
    runner = engine.model_runner
    hidden = runner.arch.hidden_size

    def no_forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], hidden)

    runner._run_eager = no_forward  # type: ignore[method-assign]
    if not graphs_path:  # decode steps through prepare(), as tensor-parallel ranks run them
        return engine
    # The device's decode path: static buffers staged from host lists, graph replay (a no-op).
    graphs = DecodeGraphs(
        runner.model, max_num_seqs, runner.max_model_len, runner.block_size, hidden, runner.dtype,
        runner.device, last_tokens=runner.last_tokens,
    )  # fmt: skip
    graphs.graphs = {bs: _NoReplay() for bs in graphs.batch_sizes}  # type: ignore[misc]
    runner.graphs = graphs
    # ... and steps with prefill chunks: the padded layout staged, replay a no-op.
    mixed = MixedGraphs(
        runner.model, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=runner.config.max_num_batched_tokens,
        max_model_len=runner.max_model_len, block_size=runner.block_size, hidden_size=hidden,
        dtype=runner.dtype, device=runner.device, mirror=graphs.mirror,
        last_tokens=runner.last_tokens,
    )  # fmt: skip
    mixed.graphs = {tp: _NoReplay() for tp in mixed.buckets}  # type: ignore[misc]
    runner.mixed_graphs = mixed
    return engine


def run_decode(
    root: Path, steps: int, profile: bool, graphs: bool, size: Size = FULL
) -> dict[str, float]:
    engine = build_engine(root, size.max_model_len, graphs, size.seqs)
    seed(0)
    for i in range(size.seqs):
        prompt = [randint(2, 63) for _ in range(randint(*size.prompt_tokens))]
        params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=size.decode_max_tokens)
        engine.add_request(f"r{i}", prompt, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()  # prefills (forward stubbed)
    for _ in range(20):
        engine.step()  # warm-up decode steps
    assert len(engine.scheduler.running) == size.seqs
    timer = StepPhases(engine)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    for _ in range(steps):
        outs = timer.step()
        assert len(outs) == size.seqs
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    timer.timer.require_all_ran(OPTIONAL_PHASES)
    return {k: 1e3 * statistics.median(s[k] for s in timer.steps) for k in PHASES}


def run_nano(root: Path, size: Size = FULL) -> tuple[dict[str, float], int]:
    engine = build_engine(root, size.max_model_len, max_num_seqs=size.seqs)
    seed(0)  # nano-vllm's draws, token ids folded into the tiny vocabulary
    prompts = [[randint(0, 10000) for _ in range(randint(100, 1024))] for _ in range(256)]
    max_tokens = [randint(100, 1024) for _ in range(256)]
    if size != FULL:  # the first requests, cut short
        prompts = [p[: size.prompt_tokens[1]] for p in prompts[: size.seqs]]
        max_tokens = [m % size.answer_tokens[1] + 1 for m in max_tokens[: size.seqs]]
    for i, (prompt, m) in enumerate(zip(prompts, max_tokens, strict=True)):
        params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m)
        engine.add_request(f"r{i}", [2 + t % 62 for t in prompt], params)
    timer = StepPhases(engine)
    generated = 0
    while engine.has_unfinished():
        generated += sum(len(o.new_token_ids) for o in timer.step())
    assert generated == sum(max_tokens), generated
    assert size != FULL or generated == 133_966, generated
    timer.timer.require_all_ran(OPTIONAL_PHASES)
    n = len(timer.steps)
    return {k: 1e3 * sum(s[k] for s in timer.steps) / n for k in PHASES}, n


def spike_engine(root: Path, size: Size = FULL) -> LLMEngine:
    """The stubbed engine with bench/spike.py's workload shape added: 1,024 requests at once,
    a shared 1,000-token prefix, 20-200 tokens of their own, answers of 50-400 (greedy,
    ``ignore_eos``); ``size`` scales it."""
    engine = build_engine(root, size.max_model_len, max_num_seqs=size.seqs)
    seed(0)
    shared = [randint(2, 63) for _ in range(size.shared_tokens)]
    own = (20, 200) if size == FULL else size.prompt_tokens
    for i in range(size.spike_requests):
        prompt = shared + [randint(2, 63) for _ in range(randint(*own))]
        answer = randint(*size.answer_tokens)
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=answer)
        engine.add_request(f"r{i}", prompt, params)
    return engine


def run_spike(root: Path, profile: bool, size: Size = FULL) -> list[tuple[str, dict[str, float]]]:
    """The spike's shape (``spike_engine``): finished slots are refilled at once, so many
    steps carry a prefill chunk."""
    engine = spike_engine(root, size)
    timer = StepPhases(engine)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    while engine.has_unfinished():
        timer.step()
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    timer.timer.require_all_ran(OPTIONAL_PHASES)
    rows = []
    for label, flag in (("decode-only", 0.0), ("with prefill chunks", 1.0)):
        steps = [s for s in timer.steps if s["mixed"] == flag]
        if steps:
            mean = {k: 1e3 * statistics.mean(s[k] for s in steps) for k in PHASES}
            rows.append((f"spike shape, {label}, {len(steps)} steps (mean)", mean))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="timed decode steps")
    ap.add_argument("--scenario", choices=("decode", "nano", "spike", "both"), default="both")
    ap.add_argument("--profile", action="store_true", help="cProfile the decode steps")
    ap.add_argument(
        "--eager-decode", action="store_true", help="also time decode steps through prepare()"
    )
    ap.add_argument("--smoke", action="store_true", help="every scenario on 8-24 requests")
    args = ap.parse_args()
    size = FULL
    if args.smoke:
        size, args.steps, args.eager_decode, args.scenario = SMOKE, 5, True, "all"
    torch.set_num_threads(1)
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.scenario in ("decode", "both", "all"):
            res = run_decode(root, args.steps, args.profile, True, size)
            rows.append((f"decode, {size.seqs} seqs (median)", res))
            if args.eager_decode:
                res = run_decode(root, args.steps, args.profile, False, size)
                rows.append((f"decode via prepare(), {size.seqs} seqs (median)", res))
        if args.scenario in ("spike", "all"):
            rows += run_spike(root, args.profile, size)
        if args.scenario in ("nano", "both", "all"):
            res, n = run_nano(root, size)
            rows.append((f"nano-vllm shape, {n} steps (mean)", res))
    print("| scenario | " + " | ".join(PHASES) + " |")
    print("|---|" + "---:|" * len(PHASES))
    for name, res in rows:
        print(f"| {name} | " + " | ".join(f"{res[k]:.3f}" for k in PHASES) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
