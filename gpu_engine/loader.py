"""Load a local HF checkpoint directory: config, (sharded) safetensors, tokenizer, eos ids."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gpu_engine import tp_group
from gpu_engine.errors import EngineError
from gpu_engine.layers.base import AttentionBackend
from gpu_engine.models import LlamaArchConfig, LlamaForCausalLM

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_model_dir(model: str) -> Path:
    """A checkpoint directory; a ``.gguf`` file is first converted to a cached HF directory
    (``gpu_engine.gguf.convert_gguf``)."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from gpu_engine.gguf import convert_gguf

        path = convert_gguf(path)
    if not (path / "config.json").is_file():
        raise EngineError(f"{model!r} is not a model directory (no config.json)")
    return path


def load_hf_config(path: Path) -> dict[str, Any]:
    with open(path / "config.json", encoding="utf-8") as f:
        cfg: dict[str, Any] = json.load(f)
    return cfg


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, following model.safetensors.index.json shards."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise EngineError(f"no safetensors weights in {path}")
    return [path / name for name in files]


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, cpu tensor) for every tensor, following model.safetensors.index.json shards."""
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, f.get_tensor(key)


def build_model(
    arch: LlamaArchConfig,
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    backend: AttentionBackend,
    load_format: str = "auto",
    seed: int = 0,
    quantization: str = "none",
) -> LlamaForCausalLM:
    """Construct directly in ``dtype`` on ``device`` and copy the checkpoint in
    (``load_format="random"``: random weights instead, no checkpoint files read);
    ``quantization="fp8"`` then quantizes the linear layers (``layers.fp8_linear``),
    ``"fp8-lm-head"`` the LM head too."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(arch, backend)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "random":
        from gpu_engine.random_weights import init_random_weights

        init_random_weights(model, seed)
    elif tp_group.current().size > 1:  # this rank's slices only
        from gpu_engine.tp_shards import iter_rank_shards

        tp = tp_group.current()
        model.load_weights(iter_rank_shards(safetensors_files(path), arch.head_dim, tp))
    else:
        model.load_weights(iter_safetensors(path))
    if quantization in ("fp8", "fp8-lm-head"):
        from gpu_engine.layers.fp8_linear import quantize_linear_layers

        quantize_linear_layers(model, lm_head=quantization == "fp8-lm-head")
    elif quantization != "none":
        raise EngineError(f"unknown quantization {quantization!r}")
    return model.eval()


def load_tokenizer(path: Path) -> Any | None:
    """The HF tokenizer, or None when the directory has no tokenizer files."""
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def read_eos_token_ids(path: Path, hf_config: dict[str, Any], tokenizer: Any | None) -> list[int]:
    """Union of eos ids from generation_config.json, config.json and the tokenizer."""
    ids: list[int] = []

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list):
            ids.extend(int(v) for v in value if isinstance(v, int))

    gen = path / "generation_config.json"
    if gen.is_file():
        with open(gen, encoding="utf-8") as f:
            add(json.load(f).get("eos_token_id"))
    add(hf_config.get("eos_token_id"))
    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    return sorted(set(ids))
