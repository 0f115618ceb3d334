"""One rank's share of a model: its architecture (heads, KV heads, intermediate size) and its
slices of the HF safetensors, read without loading the rest of each tensor.

Query heads and the MLP's intermediate dim split evenly. KV heads split evenly when there are
at least as many as ranks; with fewer (``num_kv_heads < N``, N a multiple of them) each rank
keeps the one KV head its query heads attend to, so KV heads are replicated ``N / num_kv_heads``
times. Vocab rows split in ``ceil(vocab / N)`` shards (``layers.parallel``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gpu_engine.config import ConfigError
from gpu_engine.layers.parallel import vocab_shard
from gpu_engine.tp_group import TPGroup

# HF tensor-name parts -> how they split (dim 0 = output rows, dim 1 = input columns).
_COLUMN = ("q_proj", "gate_proj", "up_proj")  # rows, evenly
_KV = ("k_proj", "v_proj")  # rows, by KV head (replicated when fewer heads than ranks)
_ROW = ("o_proj", "down_proj")  # weight columns; their bias is replicated
_VOCAB = ("embed_tokens", "lm_head")  # rows, ceil(vocab / N), zero-padded


def local_kv_heads(num_kv_heads: int, size: int) -> int:
    return num_kv_heads // size if num_kv_heads >= size else 1


def local_arch(arch: Any, size: int) -> Any:
    """``arch`` (a ``LlamaArchConfig``) with this rank's share of heads and intermediate size;
    ``arch`` itself for one rank. Raises ConfigError when the shapes do not split."""
    if size == 1:
        return arch
    heads, kv_heads = arch.num_heads, arch.num_kv_heads
    problems = []
    if heads % size:
        problems.append(f"num_attention_heads={heads} is not a multiple of it")
    if kv_heads >= size and kv_heads % size:
        problems.append(f"num_key_value_heads={kv_heads} is not a multiple of it")
    if kv_heads < size and size % kv_heads:
        problems.append(f"it is not a multiple of num_key_value_heads={kv_heads}")
    if arch.intermediate_size % size:
        problems.append(f"intermediate_size={arch.intermediate_size} is not a multiple of it")
    if problems:
        raise ConfigError(f"tensor_parallel_size={size}: " + "; ".join(problems))
    return dataclasses.replace(
        arch,
        num_heads=heads // size,
        num_kv_heads=local_kv_heads(kv_heads, size),
        intermediate_size=arch.intermediate_size // size,
    )


def _kind(name: str) -> str | None:
    parts = name.split(".")
    for kind, names in (("column", _COLUMN), ("kv", _KV), ("row", _ROW), ("vocab", _VOCAB)):
        if any(p in names for p in parts):
            if kind == "row" and parts[-1] == "bias":
                return None  # added once after the all-reduce: every rank holds all of it
            return kind
    return None


def _bounds(kind: str, length: int, head_dim: int, tp: TPGroup) -> tuple[int, int]:
    """(start, stop) of this rank's slice of a dim of ``length``."""
    if kind == "vocab":
        start, per_rank = vocab_shard(length, tp.rank, tp.size)
        return start, min(start + per_rank, length)
    if kind == "kv":
        kv_heads = length // head_dim
        if kv_heads < tp.size:  # replicated: the KV head of this rank's query heads
            head = tp.rank * kv_heads // tp.size
            return head * head_dim, (head + 1) * head_dim
    if length % tp.size:
        raise ConfigError(f"a {kind}-parallel dim of {length} does not split {tp.size} ways")
    per_rank = length // tp.size
    return tp.rank * per_rank, (tp.rank + 1) * per_rank


def iter_rank_shards(
    files: list[Path], head_dim: int, tp: TPGroup
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, this rank's slice) for every tensor in ``files`` (safetensors), reading only
    the slice from disk (``safe_open(...).get_slice``)."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                kind = _kind(name)
                if kind is None:
                    yield name, f.get_tensor(name)
                    continue
                lazy = f.get_slice(name)
                shape = lazy.get_shape()
                dim = 1 if kind == "row" else 0
                start, stop = _bounds(kind, shape[dim], head_dim, tp)
                part = lazy[:, start:stop] if dim == 1 else lazy[start:stop]
                if kind == "vocab":
                    _, per_rank = vocab_shard(shape[0], tp.rank, tp.size)
                    if part.shape[0] < per_rank:  # the last shard: zero rows past the vocab
                        pad = part.new_zeros(per_rank - part.shape[0], *part.shape[1:])
                        part = torch.cat([part, pad])
                yield name, part
