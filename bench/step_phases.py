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
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.spike import build_model
from bench.workload import make_requests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--preset", default="qwen2.5-1.5b")
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--admit-min-seqs",
        type=int,
        default=None,
        help="engine option (default: the engine's choice); >1 groups admissions",
    )
    p.add_argument("--sync", action="store_true", help="step() instead of pipelined_step()")
    args = p.parse_args()

    import torch
    from transformers import AutoTokenizer

    from gpu_engine import LLMEngine, SamplingParams

    model_dir = build_model(args.out, args.preset, args.tokenizer, args.device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    reqs = make_requests(tok, args.requests, seed=2)
    prompts = []
    for r in reqs:
        out = tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=True)
        prompts.append(list(out["input_ids"] if hasattr(out, "keys") else out))
    engine = LLMEngine.from_options(
        str(model_dir), dtype="bfloat16", device=args.device, max_num_seqs=256,
        max_num_batched_tokens=8192, max_model_len=4096, admit_min_seqs=args.admit_min_seqs,
    )  # fmt: skip
    for i, (r, ids) in enumerate(zip(reqs[:8], prompts[:8], strict=True)):  # warm-up
        engine.add_request(f"w{i}", ids, SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()

    warm_tokens = engine.stats()["generated_tokens"]
    sched, runner = engine.scheduler, engine.model_runner
    phases: dict[str, float] = {}
    orig_schedule, orig_launch, orig_collect = sched.schedule, runner.launch, runner.collect
    cuda = args.device.startswith("cuda")
    ev: list = []

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t

        return wrapper

    def launch(batch):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        out = orig_launch(batch)
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            ev.append((start, end))
        return out

    scheduled: list = []  # the batch scheduled in this loop turn

    def schedule(now):
        batch = orig_schedule(now)
        scheduled.append(batch)
        return batch

    sched.schedule = timed("schedule", schedule)
    runner.launch = timed("launch", launch)
    runner.collect = timed("wait", orig_collect)

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
    for r in rows:
        s, e = spans[int(r["event"])]
        r["gpu"] = s.elapsed_time(e) / 1000
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
        rs = [r for r in rows if r["mixed"] == sel and r["seqs"] >= 200]
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
