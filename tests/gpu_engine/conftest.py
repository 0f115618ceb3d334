"""Fixtures for engine tests: few CPU threads, transformers' greedy reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> Iterator[None]:
    try:
        import torch
    except ImportError:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


_HF: dict[Path, Any] = {}


def hf_model(path: Path) -> Any:
    """The transformers model for a checkpoint (fp32, eval), cached per path."""
    from transformers import AutoModelForCausalLM

    if path not in _HF:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="float32").eval()
        model.generation_config.eos_token_id = None  # compare full lengths (ignore_eos)
        model.generation_config.pad_token_id = 0
        _HF[path] = model
    return _HF[path]


def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt (``generate(do_sample=False)``)."""
    import torch

    model = hf_model(path)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)
    return [int(t) for t in out[0, len(prompt) :]]
