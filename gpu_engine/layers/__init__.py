"""Model building blocks and attention backends.

``make_attention_backend`` picks a backend by name. ``"auto"`` is the torch reference on CPU;
on CUDA it prefers flash-attn, then Triton (``gpu_engine.layers.flash_attn.FlashAttnBackend``,
``gpu_engine.layers.triton_attn.TritonBackend``; imported lazily, constructed without
arguments; Triton only with an FP8 KV cache), and falls back to the torch reference with a
warning when neither imports.
"""

from __future__ import annotations

import importlib
import warnings

from gpu_engine.errors import EngineError
from gpu_engine.layers.base import AttentionBackend, AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "make_attention_backend"]

_GPU_BACKENDS = {
    "flash_attn": ("gpu_engine.layers.flash_attn", "FlashAttnBackend"),
    "triton": ("gpu_engine.layers.triton_attn", "TritonBackend"),
}


def _load(name: str) -> AttentionBackend:
    module_name, class_name = _GPU_BACKENDS[name]
    module = importlib.import_module(module_name)
    backend: AttentionBackend = getattr(module, class_name)()
    return backend


def make_attention_backend(
    name: str, device_type: str, fp8_kv_cache: bool = False
) -> AttentionBackend:
    """The backend called ``name`` ("auto" picks); an FP8 KV cache rules flash-attn out."""
    from gpu_engine.layers.torch_ref import TorchRefBackend

    if name == "torch":
        return TorchRefBackend()
    if name in _GPU_BACKENDS:
        if device_type != "cuda":
            raise EngineError(f"attention backend {name!r} needs a CUDA device")
        try:
            return _load(name)
        except ImportError as err:
            raise EngineError(f"attention backend {name!r} is not available: {err}") from err
    if name != "auto":
        raise EngineError(f"unknown attention backend {name!r}")
    if device_type != "cuda":
        return TorchRefBackend()
    errors = []
    for candidate in ("triton",) if fp8_kv_cache else ("flash_attn", "triton"):
        try:
            return _load(candidate)
        except (ImportError, AttributeError) as err:
            errors.append(f"{candidate}: {err}")
    warnings.warn(
        "no GPU attention backend importable (" + "; ".join(errors) + "); using the slow "
        "torch reference backend",
        RuntimeWarning,
        stacklevel=2,
    )
    return TorchRefBackend()
