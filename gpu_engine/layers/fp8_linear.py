"""FP8 linear layers (``quantization="fp8"``): e4m3 weights with one scale per output channel,
activations quantized per token, one scaled matmul.

``y = (x_q @ W_q.T) * x_scale[:, None] * w_scale[None, :] + b`` with fp32 accumulation:
for bf16 activations on a CUDA device of compute capability ≥ 8.9 through
``torch._scaled_mm`` (Hopper's FP8 tensor cores with row-wise scales; the activation is
quantized by one Triton kernel) or, for at most 16 rows and wide outputs (decode at small
batch), one Triton kernel that quantizes and multiplies, and for one row (batch-1 decode) a
split-K version of it that keeps every SM streaming narrow layers (``kernels.fp8_gemm``);
elsewhere
(CPU, fp32/fp16 models) the same arithmetic in fp32 torch ops: the reference the CPU tests
and the accuracy bench use.

``quantize_linear_layers`` swaps a loaded model's projections (q/k/v, o, gate/up, down) for
``Fp8Linear`` in place; the embedding, norms and LM head keep the model dtype. A
row-parallel projection keeps its all-reduce: each rank quantizes its own shard (its output
channels' scales cover the rank's slice of the input dim).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import nn

from gpu_engine.errors import EngineError
from gpu_engine.fp8 import quantize_rows

# The decoder's projections; everything else stays in the model dtype.
FP8_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@cache
def fp8_matmul_supported(device: torch.device) -> bool:
    """FP8 tensor-core matmuls: CUDA devices of compute capability 8.9 (Ada) and up."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@cache
def _num_sms(device: torch.device) -> int:
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def fused_wins(out_features: int, device: torch.device) -> bool:
    """Whether the fused small-M kernel beats quantization + ``_scaled_mm``: only with wide
    outputs (two waves of 64-channel programs). Measured on the H100 at M = 1: gate_up
    (37,888 channels) 68 vs 79 µs; qkv / o / down (≤ 4,608 channels, too few programs to keep
    the weights streaming) 31-141 µs vs 23-75 µs (benchmarks.md)."""
    return out_features >= 2 * 64 * _num_sms(device)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """x [M, K] (model dtype), weight [N, K] e4m3, weight_scale [N] fp32 -> [M, N].
    ``workspace`` (``gemv_workspace``): lets one contiguous row take the split-K kernel."""
    if x.dtype == torch.bfloat16 and fp8_matmul_supported(x.device):
        from gpu_engine.kernels import FP8_GEMV, FP8_SMALL_M
        from gpu_engine.kernels.fp8_gemm import MAX_ROWS, fp8_gemv, fp8_small_m_linear
        from gpu_engine.kernels.quant import quantize_per_token

        if FP8_GEMV and workspace is not None and x.shape[0] == 1 and x.is_contiguous():
            return fp8_gemv(x, weight, weight_scale, bias, workspace)
        if FP8_SMALL_M and x.shape[0] <= MAX_ROWS and fused_wins(weight.shape[0], x.device):
            return fp8_small_m_linear(x, weight, weight_scale, bias, _num_sms(x.device))

        x_q, x_scale = quantize_per_token(x)
        return torch._scaled_mm(
            x_q,
            weight.t(),  # column-major [K, N], as the FP8 GEMM wants it
            scale_a=x_scale[:, None],
            scale_b=weight_scale[None, :],
            bias=bias,
            out_dtype=x.dtype,
        )
    x_q, x_scale = quantize_rows(x)
    y = (x_q.float() @ weight.float().t()) * x_scale[:, None] * weight_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class Fp8Linear(nn.Module):
    """``x @ W.T + b`` with W in e4m3 [out, in] and fp32 scales [out]; ``reduce`` (a
    row-parallel layer's all-reduce over ranks) runs before the bias is added."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % 16 or out_features % 16:
            raise EngineError(
                f"FP8 matmuls need both dims divisible by 16, got {out_features}x{in_features}"
            )
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.reduce = reduce
        self.in_features, self.out_features = in_features, out_features
        from gpu_engine.kernels.fp8_gemm import gemv_workspace

        # The batch-1 kernel's split-K partial sums and counters (zero between calls).
        ws, counts = gemv_workspace(out_features, weight.device)
        self.register_buffer("gemv_partials", ws, persistent=False)
        self.register_buffer("gemv_counts", counts, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """Quantize ``linear``'s weight per output channel (a row-parallel layer's all-reduce
        is kept)."""
        weight, scale = quantize_rows(linear.weight.detach())
        tp = getattr(linear, "tp", None)
        reduce = tp.all_reduce if tp is not None and tp.size > 1 else None
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight, scale, bias, reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        workspace = (self.gemv_partials, self.gemv_counts)
        if self.reduce is None:
            y = fp8_linear(x2, self.weight, self.weight_scale, self.bias, workspace)
        else:
            y = self.reduce(fp8_linear(x2, self.weight, self.weight_scale, None, workspace))
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)


@torch.no_grad()
def quantize_linear_layers(model: nn.Module, lm_head: bool = False) -> int:
    """Replace every projection named in FP8_PROJECTIONS by an Fp8Linear (one at a time, so
    the peak is the model plus one layer's copy), and with ``lm_head`` the LM head's matmul
    too (``quantize_lm_head``); returns how many layers were quantized."""
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name in FP8_PROJECTIONS and isinstance(child, nn.Linear)
    ]
    for parent, name in targets:
        setattr(parent, name, Fp8Linear.from_linear(getattr(parent, name)))
    if not targets:
        raise EngineError("quantization='fp8': the model has no projections to quantize")
    count = len(targets) + (quantize_lm_head(model) if lm_head else 0)
    tune_batch_one(model)
    return count


def tune_batch_one(model: nn.Module) -> None:
    """Pick each FP8 weight shape's fastest batch-1 GEMV launch now, at load (it times
    candidates on the device, which graph capture would not allow later)."""
    from gpu_engine.kernels import FP8_GEMV, FP8_GEMV_TUNE

    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    if not (FP8_GEMV and FP8_GEMV_TUNE and layers):
        return
    if not fp8_matmul_supported(layers[0].weight.device):
        return  # the CPU's fp32 reference: no kernel to tune
    from gpu_engine.kernels.fp8_gemm import tune_gemv

    for layer in layers:  # tune_gemv times each distinct shape once
        tune_gemv(layer.weight, layer.weight_scale, (layer.gemv_partials, layer.gemv_counts))


@torch.no_grad()
def quantize_lm_head(model: nn.Module) -> int:
    """Give the model's LM head an FP8 copy of its rows to compute logits with. At batch 1 the
    head is the largest single read of a decode step (Qwen2.5-7B: 1.09 GB of 15 in bf16). The
    model-dtype weight is freed unless the embedding shares it (tied: the lookup stays exact
    and the FP8 copy costs vocab x hidden bytes more). Returns 1."""
    from gpu_engine.layers.parallel import ParallelLMHead

    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    if len(heads) != 1:
        raise EngineError(f"quantizing the LM head: the model has {len(heads)} LM heads")
    head = heads[0]
    readers = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
    # Not from_linear: the head's rows are a vocab shard, gathered (not summed) over ranks.
    rows = Fp8Linear(*quantize_rows(head.weight.detach()), bias=None)
    head.use_quantized(rows, keep_weight=len(readers) > 1)
    return 1
