"""Where an engine step's wall time goes on the spike workload (engine alone, no queue).

Builds the spike's random-weight model (bench/spike.py's preset), adds ``--requests`` of the
spike workload (tokenized first), steps the engine to completion and times every step's
phases on the host: ``schedule`` (Scheduler.schedule), ``launch`` (staging + graph replay +
logits + sampling queued), ``wait`` (the host blocked on the sampled tokens), ``post``
(postprocess and outputs), plus the device span of the step from CUDA events recorded
before the launch and after the sampling. ``idle`` = wall − device span: time the GPU had
nothing of this step to run. Prints one table (means over decode-only and mixed steps).

    python3 bench/step_phases.py --out /tmp/spike-ab --tokenizer .cache/tok-smollm2
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

    sched.schedule = timed("schedule", orig_schedule)
    runner.launch = timed("launch", launch)
    runner.collect = timed("wait", orig_collect)

    for i, (r, ids) in enumerate(zip(reqs, prompts, strict=True)):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))
    rows: list[dict[str, float]] = []
    t_all = time.perf_counter()
    while engine.has_unfinished():
        phases.clear()
        ev.clear()
        t = time.perf_counter()
        pending = engine.begin_step()
        outs = engine.end_step(pending)
        wall = time.perf_counter() - t
        batch = pending.batch
        gpu = ev[0][0].elapsed_time(ev[0][1]) / 1000 if ev else 0.0
        rows.append(
            dict(
                wall=wall,
                gpu=gpu,
                mixed=float(batch.num_prefill_seqs > 0),
                seqs=len(batch.seqs),
                tokens=float(len(outs)),
                **phases,
            )
        )
    total = time.perf_counter() - t_all
    outputs = sum(r["tokens"] for r in rows)
    print(
        f"{len(rows)} steps in {total:.2f} s, {outputs / total:,.0f} outputs/s "
        f"(admit_min_seqs {engine.scheduler.admit_min_seqs})"
    )
    cols = ["wall", "schedule", "launch", "wait", "gpu"]
    print("| steps | n | seqs | " + " | ".join(f"{c} ms" for c in cols) + " | post ms | idle ms |")
    print("|---|---|---|" + "---|" * (len(cols) + 2))
    for label, sel in (("decode-only", 0.0), ("mixed", 1.0)):
        rs = [r for r in rows if r["mixed"] == sel and r["seqs"] >= 200]
        if not rs:
            continue
        mean = {c: statistics.mean(r.get(c, 0.0) for r in rs) * 1000 for c in cols}
        post = mean["wall"] - mean["schedule"] - mean["launch"] - mean["wait"]
        idle = mean["wall"] - mean["gpu"]
        print(
            f"| {label} | {len(rs)} | {statistics.mean(r['seqs'] for r in rs):.0f} | "
            + " | ".join(f"{mean[c]:.2f}" for c in cols)
            + f" | {post:.2f} | {idle:.2f} |"
        )


if __name__ == "__main__":
    main()
