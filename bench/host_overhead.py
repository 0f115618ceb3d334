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

Prints one table: milliseconds per step of each phase (median over steps for ``decode``,
mean for ``nano``). ``other`` is ``LLMEngine.step`` minus the listed phases (StepOutput
building, paging-waste and prompt-token counters, sampler releases).
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
from pathlib import Path
from random import randint, seed
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    "schedule", "stage", "mixed_stage", "prepare", "logits", "sample", "postprocess", "other",
    "step",
)  # fmt: skip


class _NoReplay:
    def replay(self) -> None:
        pass


class PhaseTimer:
    """Wraps engine methods with perf_counter timers; one dict of seconds per step."""

    def __init__(self, engine: LLMEngine) -> None:
        runner = engine.model_runner
        self.current: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        for obj, attr, label in (
            (engine.scheduler, "schedule", "schedule"),
            (runner, "_graph_decode_hidden", "stage"),
            (runner, "_graph_mixed_hidden", "mixed_stage"),
            (runner, "prepare", "prepare"),
            (runner.model, "compute_logits", "logits"),
            (runner.sampler, "sample_async", "sample"),
            (engine.scheduler, "postprocess", "postprocess"),
        ):
            self._wrap(obj, attr, label)
        self.engine = engine

    def _wrap(self, obj: Any, attr: str, label: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[label] = self.current.get(label, 0.0) + time.perf_counter() - t

        setattr(obj, attr, timed)

    def step(self) -> list[Any]:
        self.current = {}
        t = time.perf_counter()
        outs = self.engine.step()
        total = time.perf_counter() - t
        rec = {k: self.current.get(k, 0.0) for k in PHASES[:-2]}
        rec["other"] = total - sum(rec.values())
        rec["step"] = total
        rec["mixed"] = float(
            self.engine.model_runner.mixed_graphs is not None
            and bool(self.current.get("mixed_stage"))
        )
        self.steps.append(rec)
        return outs


def build_engine(root: Path, max_model_len: int, graphs_path: bool = True) -> LLMEngine:
    path = root / "tiny-qwen3"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_QWEN3))
    engine = LLMEngine(
        EngineConfig(
            model=str(path), load_format="random", device="cpu", dtype="float32",
            block_size=16, max_num_seqs=256, max_num_batched_tokens=8192,
            kv_cache_tokens=256 * max_model_len, max_model_len=max_model_len,
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
        runner.model, 256, runner.max_model_len, runner.block_size, hidden, runner.dtype,
        runner.device, last_tokens=runner.last_tokens,
    )  # fmt: skip
    graphs.graphs = {bs: _NoReplay() for bs in graphs.batch_sizes}  # type: ignore[misc]
    runner.graphs = graphs
    # ... and steps with prefill chunks: the padded layout staged, replay a no-op.
    mixed = MixedGraphs(
        runner.model, max_num_seqs=256, max_num_batched_tokens=runner.config.max_num_batched_tokens,
        max_model_len=runner.max_model_len, block_size=runner.block_size, hidden_size=hidden,
        dtype=runner.dtype, device=runner.device, mirror=graphs.mirror,
        last_tokens=runner.last_tokens,
    )  # fmt: skip
    mixed.graphs = {tp: _NoReplay() for tp in mixed.buckets}  # type: ignore[misc]
    runner.mixed_graphs = mixed
    return engine


def run_decode(root: Path, steps: int, profile: bool, graphs: bool) -> dict[str, float]:
    engine = build_engine(root, 4096, graphs)
    seed(0)
    for i in range(256):
        prompt = [randint(2, 63) for _ in range(randint(100, 2000))]
        params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=2000)
        engine.add_request(f"r{i}", prompt, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()  # prefills (forward stubbed)
    for _ in range(20):
        engine.step()  # warm-up decode steps
    assert len(engine.scheduler.running) == 256
    timer = PhaseTimer(engine)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    for _ in range(steps):
        outs = timer.step()
        assert len(outs) == 256
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return {k: 1e3 * statistics.median(s[k] for s in timer.steps) for k in PHASES}


def run_nano(root: Path) -> tuple[dict[str, float], int]:
    engine = build_engine(root, 4096)
    seed(0)  # nano-vllm's draws, token ids folded into the tiny vocabulary
    prompts = [[randint(0, 10000) for _ in range(randint(100, 1024))] for _ in range(256)]
    max_tokens = [randint(100, 1024) for _ in range(256)]
    for i, (prompt, m) in enumerate(zip(prompts, max_tokens, strict=True)):
        params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m)
        engine.add_request(f"r{i}", [2 + t % 62 for t in prompt], params)
    timer = PhaseTimer(engine)
    generated = 0
    while engine.has_unfinished():
        generated += sum(len(o.new_token_ids) for o in timer.step())
    assert generated == 133_966, generated
    n = len(timer.steps)
    return {k: 1e3 * sum(s[k] for s in timer.steps) / n for k in PHASES}, n


def spike_engine(root: Path) -> LLMEngine:
    """The stubbed engine with bench/spike.py's workload shape added: 1,024 requests at once,
    a shared 1,000-token prefix, 20-200 tokens of their own, answers of 50-400 (greedy,
    ``ignore_eos``)."""
    engine = build_engine(root, 4096)
    seed(0)
    shared = [randint(2, 63) for _ in range(1000)]
    for i in range(1024):
        prompt = shared + [randint(2, 63) for _ in range(randint(20, 200))]
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=randint(50, 400))
        engine.add_request(f"r{i}", prompt, params)
    return engine


def run_spike(root: Path, profile: bool) -> list[tuple[str, dict[str, float]]]:
    """The spike's shape (``spike_engine``): finished slots are refilled at once, so many
    steps carry a prefill chunk."""
    engine = spike_engine(root)
    timer = PhaseTimer(engine)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    while engine.has_unfinished():
        timer.step()
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
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
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.scenario in ("decode", "both"):
            res = run_decode(Path(tmp), args.steps, args.profile, graphs=True)
            rows.append(("decode, 256 seqs (median)", res))
            if args.eager_decode:
                res = run_decode(Path(tmp), args.steps, args.profile, graphs=False)
                rows.append(("decode via prepare(), 256 seqs (median)", res))
        if args.scenario == "spike":
            rows += run_spike(Path(tmp), args.profile)
        if args.scenario in ("nano", "both"):
            res, n = run_nano(Path(tmp))
            rows.append((f"nano-vllm shape, {n} steps (mean)", res))
    print("| scenario | " + " | ".join(PHASES) + " |")
    print("|---|" + "---:|" * len(PHASES))
    for name, res in rows:
        print(f"| {name} | " + " | ".join(f"{res[k]:.3f}" for k in PHASES) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
