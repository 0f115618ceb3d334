"""Constrained vs unconstrained decoding, side by side: tokens/s of a batch of 64 requests.

One engine (random weights in a real model's shape, next to a real tokenizer) runs two
closed loops that each keep ``--batch`` requests in flight (a finished request is replaced
at once) until ``--requests`` have finished:

- ``json_schema``: every request constrained by a support-bot reply schema (xgrammar's
  token bitmask, filled on the host while the step's forward pass runs, applied on the
  device before sampling);
- ``free``: the same prompts, unconstrained, each generating exactly as many tokens as its
  constrained twin did (``ignore_eos``), so both loops do the same work.

The loops alternate ``--rounds`` times after a warm-up; the table gives each mode's best
round and the constrained loop's tokens/s relative to the free one (target: at most 5%
fewer). It also counts the constrained answers that finished and parse as JSON.

    python3 bench/structured.py --out /tmp/st --tokenizer .cache/tok-smollm2   # GPU
    python3 bench/structured.py --smoke        # tiny preset, test tokenizer, CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import smoke
from bench.phase_timer import PhaseTimer
from bench.spike import build_model

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string"},
        "order_id": {"type": "integer", "minimum": 0, "maximum": 99999999},
        "status": {"enum": ["open", "shipped", "delivered", "returned"]},
        "escalate": {"type": "boolean"},
    },
    "required": ["answer", "order_id", "status", "escalate"],
    "additionalProperties": False,
}
SMOKE = dict(preset="tiny", device="cpu", batch=4, requests=8, max_tokens=24, rounds=1)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="where the model is written (default: a temp dir)")
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer dir (default: the embedded SmolLM2 model's; --smoke: the test one)",
    )
    p.add_argument("--preset", default="qwen2.5-1.5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64, help="requests in flight")
    p.add_argument("--requests", type=int, default=256, help="finished requests per round")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--phases",
        action="store_true",
        help="also print each mode's host time per step by phase (the engine's own methods)",
    )
    smoke.add_smoke_flag(p, f"{SMOKE}")
    return smoke.parse_args(p, SMOKE, None)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="chatq-structured-") as tmp:
        if args.out is None:
            args.out = Path(tmp)
        if args.tokenizer is None and args.smoke:
            from testkit.checkpoints import build_tokenizer

            args.tokenizer = args.out / "tokenizer"
            build_tokenizer(args.tokenizer)
        if args.tokenizer is None:
            from gpu_engine.gguf import default_model_path

            args.tokenizer = default_model_path()
        run(args)


def run(args: argparse.Namespace) -> None:
    import torch

    from gpu_engine import LLMEngine

    if args.smoke:
        torch.set_num_threads(1)  # a tiny model: more threads only contend on a shared CPU
    model_dir = build_model(args.out, args.preset, args.tokenizer, args.device)
    engine = LLMEngine.from_options(
        str(model_dir),
        device=args.device,
        dtype="bfloat16" if args.device.startswith("cuda") else "float32",
        max_num_seqs=args.batch,
        max_num_batched_tokens=max(2048, 4 * args.batch),
        enable_prefix_caching=False,  # every prompt is computed in both loops alike
    )
    prompts = _prompts(engine.tokenizer, args.requests)
    timer = _phase_timer(engine) if args.phases else None
    _loop(engine, prompts[: args.batch], _constrained(args.max_tokens), args.batch)  # warm-up
    best: dict[str, tuple[float, int, float]] = {}
    ended = valid = 0
    phases: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        before = _snapshot(timer)
        lengths, answers, took = _loop(engine, prompts, _constrained(args.max_tokens), args.batch)
        if _keep_best(best, "json_schema", sum(lengths), took):
            phases["json_schema"] = _per_step(timer, before, took)
        ended, valid = _count_valid(engine.tokenizer, answers, args.max_tokens)
        free = [_free(n) for n in lengths]
        before = _snapshot(timer)
        free_lengths, _, took = _loop(engine, prompts, free, args.batch)
        assert free_lengths == lengths, "the free loop must generate what the constrained did"
        if _keep_best(best, "free", sum(free_lengths), took):
            phases["free"] = _per_step(timer, before, took)
    _print_table(args, best, ended, valid)
    if timer is not None:
        _print_phases(phases)
    stats = engine.stats()
    if stats["grammar_masks"]:
        per_mask_ms = 1e3 * stats["grammar_mask_fill_s"] / stats["grammar_masks"]
        print(f"host time filling a step's grammar mask: {per_mask_ms:.3f} ms (mean)")
    engine.close()
    if valid != ended:
        sys.exit(f"{ended - valid} constrained answers ended but are not valid JSON")


def _prompts(tokenizer: Any, n: int) -> list[list[int]]:
    questions = [
        "Where is my order 4412? It was due on Monday.",
        "I want to return the blue jacket from order 9981.",
        "Has order 1203 shipped yet? I need it by Friday.",
        "My parcel arrived damaged, what can I do?",
    ]
    return [
        tokenizer.encode(f"Reply as JSON. Customer {i}: {questions[i % len(questions)]}")
        for i in range(n)
    ]


def _constrained(max_tokens: int) -> Any:
    from gpu_engine import SamplingParams, StructuredOutput

    return SamplingParams(
        max_tokens=max_tokens, temperature=0.7, seed=1, structured=StructuredOutput.json(SCHEMA)
    )


def _free(tokens: int) -> Any:
    from gpu_engine import SamplingParams

    return SamplingParams(max_tokens=tokens, temperature=0.7, seed=1, ignore_eos=True)


def _loop(
    engine: Any, prompts: list[list[int]], params: Any, batch: int
) -> tuple[list[int], list[list[int]], float]:
    """Keep ``batch`` requests in flight until every prompt finished; each request's number
    of generated tokens and its token ids, and the wall time."""
    per_request = params if isinstance(params, list) else [params] * len(prompts)
    queue = deque(enumerate(prompts))
    tokens: dict[int, list[int]] = {}
    in_flight = 0
    start = time.perf_counter()
    while queue or in_flight:
        while queue and in_flight < batch:
            i, prompt = queue.popleft()
            engine.add_request(f"r{i}", prompt, per_request[i])
            tokens[i] = []
            in_flight += 1
        outputs = engine.pipelined_step() if engine.has_unfinished() else []
        for out in outputs:
            i = int(out.request_id[1:])
            tokens[i] += out.new_token_ids
            in_flight -= out.finished
    for out in engine.finish_pipeline():
        tokens[int(out.request_id[1:])] += out.new_token_ids
    took = time.perf_counter() - start
    order = sorted(tokens)
    return [len(tokens[i]) for i in order], [tokens[i] for i in order], took


def _count_valid(tokenizer: Any, answers: list[list[int]], max_tokens: int) -> tuple[int, int]:
    """(answers that ended before max_tokens, of them those that parse as JSON): the
    schema's answer string is free text, so random weights may run out of tokens in it.
    strict=False: JSON strings from random weights may hold raw control characters."""
    ended = [a for a in answers if len(a) < max_tokens]
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in ended]
    valid = 0
    for text in texts:
        with contextlib.suppress(ValueError):
            valid += isinstance(json.loads(text, strict=False), dict)
    return len(ended), valid


def _keep_best(best: dict[str, tuple[float, int, float]], mode: str, n: int, s: float) -> bool:
    """Keep the round if it is the mode's fastest so far; whether it was."""
    rate = n / s
    if mode not in best or rate > best[mode][0]:
        best[mode] = (rate, n, s)
        return True
    return False


# Host phases of a step, by the engine methods that run them. ``end_step`` holds the wait
# for the device (``collect``), the grammar matchers' ``_accept`` of the step's tokens and
# the scheduler's ``complete``; a deferred step's ``_sample_deferred`` holds the wait for its
# mask (``_fill``, on the grammar thread while the next step is scheduled: not on the engine
# thread's time) and ``sample_deferred`` (the mask's copy, masking, sampling launches).
PHASES = (
    ("engine", "_schedule"),
    ("engine", "_launch"),
    ("engine", "end_step"),
    ("runner", "collect"),
    ("engine", "_accept"),
    ("scheduler", "complete"),
    ("grammars", "_fill"),
    ("engine", "_sample_deferred"),
    ("runner", "sample_deferred"),
)


def _phase_timer(engine: Any) -> PhaseTimer:
    owners = dict(
        engine=engine,
        runner=engine.model_runner,
        scheduler=engine.scheduler,
        grammars=engine.grammars,
    )
    return PhaseTimer([(owners[owner], attr, attr) for owner, attr in PHASES])


def _snapshot(timer: PhaseTimer | None) -> tuple[dict[str, float], dict[str, int]]:
    if timer is None:
        return {}, {}
    return dict(timer.totals), dict(timer.calls)


def _per_step(
    timer: PhaseTimer | None, before: tuple[dict[str, float], dict[str, int]], took: float
) -> dict[str, float]:
    """Milliseconds per step of each phase since ``before`` (steps: ``_launch`` calls), and
    the wall time per step."""
    if timer is None:
        return {}
    totals, calls = before
    steps = max(1, timer.calls["_launch"] - calls["_launch"])
    out = {k: 1e3 * (v - totals[k]) / steps for k, v in timer.totals.items()}
    out["wall"] = 1e3 * took / steps
    out["steps"] = steps
    return out


def _print_phases(phases: dict[str, dict[str, float]]) -> None:
    labels = ["steps", "wall"] + [attr for _, attr in PHASES]
    print("host ms per step, by phase (the best round of each mode):")
    print(f"{'phase':<16}" + "".join(f"{mode:>12}" for mode in phases))
    for label in labels:
        cells = "".join(f"{phases[m].get(label, 0.0):>12.3f}" for m in phases)
        print(f"{label:<16}{cells}")


def _print_table(
    args: argparse.Namespace, best: dict[str, tuple[float, int, float]], ended: int, valid: int
) -> None:
    free_rate = best["free"][0]
    print(
        f"structured output: batch {args.batch}, {args.requests} requests per round, "
        f"max_tokens {args.max_tokens}, preset {args.preset}, device {args.device}, "
        f"best of {args.rounds} rounds"
    )
    print(f"{'mode':<12} {'tokens':>8} {'seconds':>8} {'tok/s':>10} {'vs free':>8}")
    for mode in ("free", "json_schema"):
        rate, n, s = best[mode]
        print(f"{mode:<12} {n:>8} {s:>8.2f} {rate:>10.1f} {rate / free_rate - 1:>+8.1%}")
    print(
        f"constrained answers of the last round: {ended} of {args.requests} ended before "
        f"max_tokens, {valid} of those parse as JSON"
    )


if __name__ == "__main__":
    main()
