"""Where an engine step's wall time goes on the spike workload (engine alone, no queue).

Builds the spike's random-weight model (bench/spike.py's preset), adds ``--requests`` of the
spike workload (tokenized first), steps the engine to completion and times every loop
turn's phases on the host: ``schedule`` (Scheduler.schedule), ``launch`` (staging + graph
replay + logits + sampling queued), ``wait`` (the host blocked on sampled tokens), ``post``
(the rest: commit, complete, outputs), plus the device span of each step from CUDA events
recorded before its launch and after its sampling. Two loops: ``--sync`` (``step()``:
launch a step, wait for it, postprocess) and the default asynchronous scheduling
(``pipelined_step()``: launch step N+1, then wait for step N). ``GPU busy`` = the steps'
device spans summed ÷ wall time (the spans follow one another in stream order). Prints one
table (means over decode-only and mixed steps of at least 200 sequences).

    python3 bench/step_phases.py --out /tmp/spike-ab --tokenizer .cache/tok-smollm2 [--sync]
    python3 bench/step_phases.py --smoke [--sync]   # tiny preset, 8 short requests, CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import smoke
from bench.phase_timer import PhaseTimer
from bench.spike import build_model
from bench.workload import make_requests

SMOKE = dict(preset="tiny", requests=8, device="cpu", min_seqs=1)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="model directory (required unless --smoke)")
    p.add_argument("--tokenizer", type=Path, help="required unless --smoke (the test tokenizer)")
    p.add_argument("--preset", default="qwen2.5-1.5b")
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--admit-min-seqs",
        type=int,
        default=None,
        help="engine option (default: the engine's choice); >1 groups admissions",
    )
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                   help="engine option: fp8 for the FP8 KV cache")  # fmt: skip
    p.add_argument("--shared-prefix", action="store_true", help="shared-prefix attention on")
    p.add_argument("--sync", action="store_true", help="step() instead of pipelined_step()")
    p.add_argument("--min-seqs", type=int, default=200, help="table: steps with this many seqs")
    smoke.add_smoke_flag(p, f"8 short requests, test tokenizer, {SMOKE}")
    args = smoke.parse_args(p, SMOKE, None)
    if not args.smoke and (args.out is None or args.tokenizer is None):
        p.error("--out and --tokenizer are required (or --smoke)")
    return args


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="chatq-phases-") as tmp:
        if args.out is None:
            args.out = Path(tmp)
        if args.tokenizer is None:
            from testkit.checkpoints import build_tokenizer

            args.tokenizer = args.out / "tokenizer"
            build_tokenizer(args.tokenizer)
        run(args)


def run(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    from gpu_engine import LLMEngine, SamplingParams

    if args.smoke:
        torch.set_num_threads(1)  # a tiny model: more threads only contend on a shared CPU
    model_dir = build_model(args.out, args.preset, args.tokenizer, args.device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    sizes = dict(system_tokens=50, answer_tokens=(4, 12)) if args.smoke else {}
    reqs = make_requests(tok, args.requests, seed=2, **sizes)
    prompts = []
    for r in reqs:
        out = tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=True)
        prompts.append(list(out["input_ids"] if hasattr(out, "keys") else out))
    cuda = args.device.startswith("cuda")
    engine = LLMEngine.from_options(
        str(model_dir), dtype="bfloat16" if cuda else "float32", device=args.device,
        max_num_seqs=256,
        max_num_batched_tokens=8192, max_model_len=4096, admit_min_seqs=args.admit_min_seqs,
        kv_cache_dtype=args.kv_cache_dtype, shared_prefix_attention=args.shared_prefix,
    )  # fmt: skip
    for i, (r, ids) in enumerate(zip(reqs[:8], prompts[:8], strict=True)):  # warm-up
        engine.add_request(f"w{i}", ids, SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()

    warm_tokens = engine.stats()["generated_tokens"]
    sched, runner = engine.scheduler, engine.model_runner
    orig_schedule, orig_launch = sched.schedule, runner.launch
    ev: list = []

    def mark():  # a point in the device's stream (off CUDA the work is done by then)
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def span_s(start, end) -> float:
        return start.elapsed_time(end) / 1000 if cuda else end - start

    def launch(batch, *args, **kwargs):
        start = mark()
        out = orig_launch(batch, *args, **kwargs)
        ev.append((start, mark()))
        return out

    scheduled: list = []  # the batch scheduled in this loop turn

    def schedule(now):
        batch = orig_schedule(now)
        scheduled.append(batch)
        return batch

    sched.schedule, runner.launch = schedule, launch
    timer = PhaseTimer(
        [(sched, "schedule", "schedule"), (runner, "launch", "launch"), (runner, "collect", "wait")]
    )
    phases = timer.current

    for i, (r, ids) in enumerate(zip(reqs, prompts, strict=True)):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))
    rows: list[dict[str, float]] = []
    spans: list = []
    t_all = time.perf_counter()
    while engine.has_unfinished():
        phases.clear()
        ev.clear()
        t = time.perf_counter()
        scheduled.clear()
        if args.sync:
            engine.step()
        else:
            engine.pipelined_step()
        wall = time.perf_counter() - t
        spans += ev
        batch = scheduled[-1] if scheduled else None
        if ev and batch is not None:
            rows.append(
                dict(
                    wall=wall,
                    mixed=float(batch.num_prefill_seqs > 0),
                    seqs=len(batch.seqs),
                    event=len(spans) - 1,
                    **phases,
                )
            )
    if cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - t_all
    timer.require_all_ran()
    for r in rows:
        r["gpu"] = span_s(*spans[int(r["event"])])
    outputs = engine.stats()["generated_tokens"] - warm_tokens
    busy = sum(r["gpu"] for r in rows) / total
    print(
        f"{'sync' if args.sync else 'pipelined'}: {len(rows)} steps in {total:.2f} s, "
        f"{outputs / total:,.0f} outputs/s, GPU busy {busy:.1%} "
        f"(admit_min_seqs {engine.scheduler.admit_min_seqs})"
    )
    cols = ["wall", "schedule", "launch", "wait", "gpu"]
    print("| loop | steps | n | seqs | " + " | ".join(f"{c} ms" for c in cols) + " | post ms |")
    print("|---|---|---|---|" + "---|" * (len(cols) + 1))
    for label, sel in (("decode-only", 0.0), ("mixed", 1.0)):
        rs = [r for r in rows if r["mixed"] == sel and r["seqs"] >= args.min_seqs]
        if not rs:
            continue
        mean = {c: statistics.mean(r.get(c, 0.0) for r in rs) * 1000 for c in cols}
        post = mean["wall"] - mean["schedule"] - mean["launch"] - mean["wait"]
        print(
            f"| {'sync' if args.sync else 'pipelined'} | {label} | {len(rs)} | "
            f"{statistics.mean(r['seqs'] for r in rs):.0f} | "
            + " | ".join(f"{mean[c]:.2f}" for c in cols)
            + f" | {post:.2f} |"
        )


if __name__ == "__main__":
    main()
