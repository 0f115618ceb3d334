"""The README's gateway section runs as written: its Python blocks, against a gateway on
localhost:8000 and a worker serving ``smollm2`` (the tiny checkpoint under that name), with
``CHATQ_KEY`` set as the section's first commands set it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.gateway.conftest import REPO, GatewayProcess, create_key
from tests.workers.conftest import ThreadWorker, tiny_settings

pytestmark = pytest.mark.timeout(300)


def _section_blocks(language: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    start = text.index("## HTTP gateway")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def smollm2_worker(module_redis: str, tiny_checkpoint: Callable[..., Path]) -> Iterator[None]:
    settings = tiny_settings(module_redis, tiny_checkpoint("llama"), name="readme-tw",
                             served_model_name="smollm2")  # fmt: skip
    handle = ThreadWorker(settings).start()
    yield
    handle.stop()


def test_readme_python_blocks_run(
    smollm2_worker: None, spawn_gateway: Callable[..., GatewayProcess], module_redis: str
) -> None:
    blocks = _section_blocks("python")
    assert len(blocks) >= 2
    key = create_key(module_redis, "acme")
    spawn_gateway(port=8000)
    env = {**os.environ, "CHATQ_KEY": key}
    for block in blocks:
        out = subprocess.run([sys.executable, "-c", block], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, (block, out.stderr)
