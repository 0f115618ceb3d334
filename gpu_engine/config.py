"""Engine configuration (plain data, no torch: the worker host process imports it too)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from gpu_engine.errors import EngineError

DTYPES = ("auto", "float32", "bfloat16", "float16")
# is_fp8_kv (gpu_engine.fp8) names the FP8 ones: that module imports torch, this one must not.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
QUANTIZATIONS = ("none", "fp8", "fp8-lm-head")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")
LOAD_FORMATS = ("auto", "random")


class ConfigError(EngineError, ValueError):
    """An engine option is out of range or inconsistent."""


@dataclass
class EngineConfig:
    """Every knob of one engine instance; ``LLM(...)`` keyword arguments map onto these fields.

    ``kv_cache_tokens=None`` sizes the paged KV cache from free memory: on CUDA
    ``gpu_memory_utilization`` of the device after a warm-up pass, on CPU
    ``cpu_kv_cache_fraction`` of available RAM capped at ``cpu_kv_cache_max_tokens``.
    """

    model: str
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # "auto" = cuda if available, else cpu
    block_size: int = 16  # tokens per KV-cache block
    max_num_seqs: int = 256  # running sequences at most (also per step)
    max_num_batched_tokens: int = 4096  # new tokens per step at most (prefill chunks + decodes)
    kv_cache_tokens: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # "auto" | "torch" | "triton" | "flash_attn"
    seed: int = 0  # seeds the engine-wide generator used by requests without their own seed
    # Longest sequence (prompt + output); None = the model's max_position_embeddings, and never
    # more than the KV cache holds (so a lone sequence can always finish).
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_fraction: float = 0.1
    cpu_kv_cache_max_tokens: int = 65536
    # Waiting this many seconds raises a request's effective priority by one level, so a
    # low-priority request never starves behind a stream of high-priority ones.
    priority_aging_s: float = 10.0
    # Admission keeps this fraction of KV blocks free for running sequences to grow into,
    # which avoids admit-then-preempt thrashing.
    admission_watermark: float = 0.01
    # Run every step eagerly (the GPU fast path may capture steps as CUDA graphs).
    enforce_eager: bool = False
    # Steps with prefill chunks also replay CUDA graphs, captured per padded token count
    # (Triton attention backend, one device); False runs them eagerly (~10 launches a layer).
    mixed_step_graphs: bool = True
    # A step that also starts a prompt costs more than a decode-only step (prefill rows,
    # padding, ~1 ms more host work). So while every running sequence is decoding and slots
    # free up one by one (a full engine), new prompts are let in in groups of at least
    # ``admit_min_seqs`` (or all that wait), holding a free slot back at most
    # ``admit_max_delay_s``. With free slots to spare (calm) nothing is held. None =
    # max_num_seqs // 16 when steps are graph-captured, else 1 (admit at once). On the H200,
    # spike workload, engine full: 16 gave 32,687 vs 28,486 outputs/s for 1.
    admit_min_seqs: int | None = None
    admit_max_delay_s: float = 0.05
    # Asynchronous scheduling: ``LLMEngine.pipelined_step`` launches step N+1 before step N's
    # tokens reach the host, so scheduling, staging and postprocessing overlap the device.
    # False makes pipelined_step a plain step (for comparisons).
    async_scheduling: bool = True
    # "auto": safetensors from the model directory; "random": random weights built on the
    # device from config.json alone (benchmarks of model shapes without a checkpoint).
    load_format: str = "auto"
    # Shard the model over this many devices of one host (ranks 1..N-1 in processes the engine
    # spawns; see gpu_engine.tp_runner). 1 = no process group, the single-device path.
    tensor_parallel_size: int = 1
    # "auto": the KV cache in the model dtype; "fp8" (= "fp8_e4m3"): e4m3 values with one fp32
    # scale per token and KV head, quantized when stored and dequantized in the attention
    # kernels' registers: about half the bytes per token (torch and Triton backends).
    kv_cache_dtype: str = "auto"
    # "fp8": the linear layers' weights quantized at load (e4m3, one scale per output channel),
    # activations quantized per token, FP8 matmuls on CUDA; embedding, norms and LM head stay
    # in the model dtype. "fp8-lm-head": the LM head's matmul too (its largest read at batch 1;
    # a tied embedding keeps its exact copy for lookups). "none": every weight in the model
    # dtype.
    quantization: str = "none"
    # Decode steps whose sequences share cached prefix blocks (a common system prompt) attend
    # to each shared prefix once per group and step, merged with each sequence's own suffix
    # (captured decode graphs, Triton backend, prefix caching on). Off by default: on the
    # H100 spike workload (with the FP8 KV cache) it measured slower, see benchmarks.md.
    shared_prefix_attention: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model must be a non-empty path")
        for name, choices in (
            ("dtype", DTYPES),
            ("attention_backend", ATTENTION_BACKENDS),
            ("kv_cache_dtype", KV_CACHE_DTYPES),
            ("quantization", QUANTIZATIONS),
            ("load_format", LOAD_FORMATS),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.kv_cache_dtype != "auto" and self.attention_backend == "flash_attn":
            raise ConfigError(
                "kv_cache_dtype='fp8' needs the triton or torch attention backend, not flash_attn"
            )
        for name in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "tensor_parallel_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ConfigError(
                f"kv_cache_tokens ({self.kv_cache_tokens}) must hold at least one block "
                f"of {self.block_size} tokens"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("max_model_len must be >= 2")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        if not 0.0 < self.cpu_kv_cache_fraction <= 1.0:
            raise ConfigError("cpu_kv_cache_fraction must be in (0, 1]")
        if self.priority_aging_s <= 0:
            raise ConfigError("priority_aging_s must be > 0")
        if not 0.0 <= self.admission_watermark < 1.0:
            raise ConfigError("admission_watermark must be in [0, 1)")
        if self.admit_min_seqs is not None and (
            not isinstance(self.admit_min_seqs, int) or self.admit_min_seqs < 1
        ):
            raise ConfigError("admit_min_seqs must be a positive int or None")
        if self.admit_max_delay_s < 0:
            raise ConfigError("admit_max_delay_s must be >= 0")

    @property
    def fp8_kv_cache(self) -> bool:
        return self.kv_cache_dtype != "auto"

    @classmethod
    def from_options(cls, model: str, **options: Any) -> EngineConfig:
        """Build from keyword options, rejecting unknown names with a clear error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(model=str(model), **options)
