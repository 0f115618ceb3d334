"""README.md's Python examples run as written against a live worker serving ``smollm2``.

Every ``python`` block outside the "HTTP gateway" section runs here, as its own process
(``python -c``), with the README's Redis URL pointed at the test's Redis: nothing else is
changed. The gateway section's blocks need a gateway on localhost:8000 and run in
tests/gateway/test_readme_gateway.py; between the two, every Python block of the README runs.
The worker is the tiny checkpoint served as ``smollm2`` (the embedded model's name), so the
examples' shapes, not its answers, are what is checked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.workers.conftest import ThreadWorker, tiny_settings

REPO = Path(__file__).resolve().parents[1]
README_URL = "redis://localhost:6379/0"
GATEWAY_SECTION = "## HTTP gateway"


def python_blocks() -> tuple[list[str], list[str]]:
    """(blocks outside the gateway section, blocks inside it)."""
    text = (REPO / "README.md").read_text()
    start = text.index(GATEWAY_SECTION)
    end = text.index("\n## ", start + 1)
    gateway = text[start:end]
    rest = text[:start] + text[end:]
    pattern = r"```python\n(.*?)```"
    return re.findall(pattern, rest, flags=re.S), re.findall(pattern, gateway, flags=re.S)


@pytest.fixture
def smollm2_worker(redis_url: str, tiny_checkpoint: Callable[..., Path]) -> Iterator[str]:
    settings = tiny_settings(
        redis_url, tiny_checkpoint("llama"), name="readme", served_model_name="smollm2"
    )
    handle = ThreadWorker(settings).start()
    yield redis_url
    handle.stop()


def test_every_python_block_is_run_somewhere() -> None:
    here, gateway = python_blocks()
    assert len(here) >= 2 and len(gateway) >= 2
    # The gateway test reads its blocks from the same section.
    assert GATEWAY_SECTION in (REPO / "tests/gateway/test_readme_gateway.py").read_text()


def test_readme_python_examples_run_as_written(smollm2_worker: str) -> None:
    blocks, _ = python_blocks()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for block in blocks:
        code = block.replace(README_URL, smollm2_worker)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
            timeout=180,
        )  # fmt: skip
        assert out.returncode == 0, (block, out.stderr[-3000:])
        if "ChatClient(" in block:  # the client examples print answers with how they ended
            assert re.search(r"\b(stop|length)\b", out.stdout), (block, out.stdout)
