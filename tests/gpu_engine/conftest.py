"""Fixtures for engine tests: few CPU threads, fixed seeds, transformers' greedy reference."""

from __future__ import annotations

import os
import random
import zlib
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


SEED_ENV = "CHATQ_TEST_SEED"


@pytest.fixture(autouse=True)
def test_seed(request: pytest.FixtureRequest) -> int:
    """Seeds Python's and torch's global generators before every engine test: from the
    test's id (so a test draws the same inputs whatever ran before it), or from
    ``CHATQ_TEST_SEED`` to reproduce or vary a run. The seed is printed, and so shown with a
    failure's captured output."""
    override = os.environ.get(SEED_ENV)
    seed = int(override) if override else zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass
    print(f"{SEED_ENV}={seed}  # {request.node.nodeid}")
    return seed


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
