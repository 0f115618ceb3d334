"""Model implementations, keyed by HF ``model_type``."""

from __future__ import annotations

from gpu_engine.models.llama import SUPPORTED_MODEL_TYPES, LlamaArchConfig, LlamaForCausalLM

__all__ = ["SUPPORTED_MODEL_TYPES", "LlamaArchConfig", "LlamaForCausalLM"]
