"""CPU benchmark: chatq vs transformers ``generate`` on SmolLM2-135M-Instruct.

16 concurrent customer-service chats share one system prompt; each produces exactly
``--max-tokens`` tokens (greedy, EOS ignored), so every method emits the same number of output
tokens. Methods, timed one after the other in the same process on the same token ids:

- ``hf-single``:  transformers ``generate`` one request at a time (the naive server).
- ``hf-batched``: transformers ``generate`` on all requests at once, left-padded.
- ``chatq``:      ``LLM.chat`` (continuous batching, paged KV cache, prefix caching).

All in float32 with the same torch thread count (``--threads``, default 1: on a small machine
shared with other processes, two OpenMP threads on two cores stall at every barrier whenever
anything else runs). Model loading and a warm-up on an unrelated prompt are excluded from the
timings; chatq gets a fresh engine per run, so its prefix cache starts cold. ``cpu s`` is this
process's CPU time during the run: far below ``seconds`` means other processes took the cores.

    .venv/bin/python bench/cpu_engine.py --repeats 2     # prints one table (best of 2 each)
    .venv/bin/python bench/cpu_engine.py --methods hf-single,hf-batched   # baselines only
    .venv/bin/python bench/cpu_engine.py --smoke     # the tiny test checkpoint, 4 tokens
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import smoke

SYSTEM_PROMPT = (
    "You are Sam, the customer-service assistant of NorthPeak Outdoor, an online shop for "
    "hiking, camping and climbing gear. Be friendly, brief and concrete. Policies: orders ship "
    "within 2 business days; standard delivery takes 3-5 business days, express 1-2. Returns "
    "are free within 30 days if the item is unused and in its original packaging; refunds go "
    "to the original payment method within 5 business days of the return arriving. Damaged or "
    "wrong items are replaced at no cost. Warranty: 2 years on tents, backpacks and stoves. "
    "Never ask for full card numbers or passwords. If you cannot solve a problem, offer to "
    "escalate to a human agent and give the ticket hours (Mon-Fri, 8:00-18:00 CET)."
)

USER_MESSAGES = [
    "Where is my order #48213? It was supposed to arrive yesterday.",
    "Can I return a tent I used once on a weekend trip?",
    "My camping stove stopped working after three months. What can I do?",
    "How long does express delivery take to Austria?",
    "I was charged twice for the same order. Please help.",
    "Do you ship to Switzerland, and are there customs fees?",
    "The backpack I received is the wrong color. Can you exchange it?",
    "How do I change the delivery address of an order I placed an hour ago?",
    "What is the difference between your 2-person and 3-person tents?",
    "I forgot my password and the reset email never arrives.",
    "When will the waterproof hiking boots in size 44 be back in stock?",
    "Can I combine two discount codes on one order?",
    "My refund has not shown up yet. I returned the jacket two weeks ago.",
    "Is the sleeping bag suitable for temperatures below zero?",
    "I want to talk to a human, the chatbot is not helping.",
    "Do you offer gift wrapping for birthday presents?",
]

WARMUP_MESSAGES = [{"role": "user", "content": "Say hello."}]


@dataclass
class Result:
    method: str
    output_tokens: int
    seconds: float
    cpu_seconds: float  # this process's CPU time: shows when other processes took the cores
    token_ids: list[list[int]]

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds


def conversations() -> list[list[dict[str, str]]]:
    return [
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": msg}]
        for msg in USER_MESSAGES
    ]


def encode(tokenizer: Any, convs: list[list[dict[str, str]]]) -> list[list[int]]:
    ids: list[list[int]] = []
    for conv in convs:
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids.append(tokenizer.encode(text, add_special_tokens=False))
    return ids


def disable_eos(model: Any, pad_id: int) -> None:
    """Make ``generate`` ignore EOS (like ``ignore_eos=True``) rather than suppress it.

    ``generate`` fills every unset option from ``model.generation_config``, so EOS is cleared
    there; ``min_new_tokens`` would instead forbid the EOS token and change greedy choices.
    """
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad_id
    model.generation_config.do_sample = False
    for name in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, name, None)


def run_hf_single(model: Any, prompts: list[list[int]], max_tokens: int) -> Result:
    import torch

    outs: list[list[int]] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for ids in prompts:
        inp = torch.tensor([ids])
        out = model.generate(
            input_ids=inp,
            attention_mask=torch.ones_like(inp),
            max_new_tokens=max_tokens,
            do_sample=False,
        )
        outs.append(out[0, inp.shape[1] :].tolist())
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return Result("hf generate, one at a time", sum(map(len, outs)), seconds, cpu, outs)


def run_hf_batched(model: Any, prompts: list[list[int]], max_tokens: int) -> Result:
    import torch

    pad_id = model.generation_config.pad_token_id
    # Left padding: every row's last prompt token sits at the same position, so one decode
    # step appends one token to every row. Shapes: input_ids, attention_mask [batch, max_len].
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    start, cpu_start = time.perf_counter(), time.process_time()
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    # EOS is disabled, so no row stops early: every row has exactly max_new_tokens new tokens.
    outs = [row[width:].tolist() for row in out]
    return Result("hf generate, batched (left pad)", sum(map(len, outs)), seconds, cpu, outs)


def run_chatq(
    llm: Any, convs: list[list[dict[str, str]]], prompts: list[list[int]], sp: Any
) -> Result:
    start, cpu_start = time.perf_counter(), time.process_time()
    results = llm.chat(convs, sp)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    for res, ids in zip(results, prompts, strict=True):
        if list(res.prompt_token_ids) != ids:
            print("warning: chatq tokenized a prompt differently", file=sys.stderr)
            break
    outs = [list(res.token_ids) for res in results]
    return Result("chatq LLM.chat", sum(map(len, outs)), seconds, cpu, outs)


def bench_chatq(
    model_dir: Path, convs: list[list[dict[str, str]]], prompts: list[list[int]], args: Any
) -> Result:
    """A fresh engine per run, so the prefix cache starts cold every time."""
    from gpu_engine import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_tokens=args.kv_cache_tokens)
    llm.chat([WARMUP_MESSAGES], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    before = llm.engine.stats()
    result = run_chatq(llm, convs, prompts, sp)
    after = llm.engine.stats()
    print(
        f"  chatq engine: {after['steps'] - before['steps']} steps, "
        f"{after['computed_prompt_tokens'] - before['computed_prompt_tokens']} prompt tokens "
        f"computed, {after['prefix_cache_hit_tokens'] - before['prefix_cache_hit_tokens']} "
        "prefix-cache hit tokens",
        flush=True,
    )
    del llm
    gc.collect()
    return result


def print_table(results: list[Result], reference: Result | None) -> None:
    base = next((r for r in results if r.method.endswith("one at a time")), None)
    rows = [
        ("method", "output tokens", "seconds", "cpu s", "tok/s", "vs one-at-a-time", "same tokens")
    ]
    for r in results:
        ratio = f"{r.tok_per_s / base.tok_per_s:.2f}x" if base else "-"
        same = "-"
        if reference is not None:
            n = sum(a == b for a, b in zip(r.token_ids, reference.token_ids, strict=True))
            same = f"{n}/{len(r.token_ids)}"
        rows.append(
            (
                r.method,
                str(r.output_tokens),
                f"{r.seconds:.2f}",
                f"{r.cpu_seconds:.2f}",
                f"{r.tok_per_s:.1f}",
                ratio,
                same,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines))


SMOKE = {"max_tokens": 4, "kv_cache_tokens": 4096}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF checkpoint dir (default: embedded SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--methods", default="hf-single,hf-batched,chatq")
    parser.add_argument("--kv-cache-tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=1, help="runs per method; best is kept")
    smoke.add_smoke_flag(parser, f"the tiny test checkpoint (unless --model), {SMOKE}")
    args = smoke.parse_args(parser, SMOKE, None)
    with tempfile.TemporaryDirectory(prefix="chatq-cpu-engine-") as tmp:
        if args.smoke and args.model is None:
            from testkit.checkpoints import build_checkpoint

            args.model = str(build_checkpoint(Path(tmp) / "tiny"))
        run(args)


def run(args: argparse.Namespace) -> None:
    methods = args.methods.split(",")

    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpu_engine.gguf import default_model_path

    model_dir = Path(args.model) if args.model else default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    convs = conversations()
    prompts = encode(tokenizer, convs)
    lens = [len(p) for p in prompts]
    print(
        f"model {model_dir.name}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
        f"requests {len(prompts)}  prompt tokens {min(lens)}-{max(lens)} (sum {sum(lens)})  "
        f"max_tokens {args.max_tokens}  greedy, EOS ignored, float32"
    )
    best: dict[str, Result] = {}
    model = None
    if any(m.startswith("hf-") for m in methods):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        disable_eos(model, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        with torch.inference_mode():
            run_hf_single(model, encode(tokenizer, [WARMUP_MESSAGES]), 4)

    # Methods take turns, each repeat in the same order; the fastest run of each is kept, since
    # on a shared machine noise from other processes only ever adds time.
    for repeat in range(args.repeats):
        for method in methods:
            if method == "chatq":
                result = bench_chatq(model_dir, convs, prompts, args)
            elif method == "hf-single":
                with torch.inference_mode():
                    result = run_hf_single(model, prompts, args.max_tokens)
            elif method == "hf-batched":
                with torch.inference_mode():
                    result = run_hf_batched(model, prompts, args.max_tokens)
            else:
                raise SystemExit(f"unknown method {method!r}")
            print(
                f"  [{repeat + 1}/{args.repeats}] {result.method}: {result.seconds:.1f} s "
                f"(cpu {result.cpu_seconds:.1f} s)",
                flush=True,
            )
            if method not in best or result.seconds < best[method].seconds:
                best[method] = result
    results = [best[m] for m in methods]

    counts = {r.output_tokens for r in results}
    if len(counts) > 1:
        print(f"warning: methods produced different token counts {counts}", file=sys.stderr)
    reference = next((r for r in results if r.method.endswith("one at a time")), None)
    print()
    print_table(results, reference)
    print(
        f"\n(cpu: {os.cpu_count()} logical cores; 'same tokens' = requests whose greedy "
        "output equals the one-at-a-time output)"
    )


if __name__ == "__main__":
    main()
