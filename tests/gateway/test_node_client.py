"""The official ``openai`` npm package (Node) against the gateway: a non-streamed and a
streamed completion. The test installs the package with npm (the registry is reachable in
CI); without node / npm on the machine it is skipped, saying why."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.gateway.conftest import MODEL, GatewayProcess, create_key

NODE_DIR = Path(__file__).with_name("node")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def node_openai() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the Node client test")
    if not (NODE_DIR / "node_modules" / "openai").exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=NODE_DIR, check=True, timeout=240)  # fmt: skip
    return NODE_DIR


def test_node_openai_client(node_openai: Path, gateway: GatewayProcess, module_redis: str) -> None:
    key = create_key(module_redis, f"node-{uuid.uuid4().hex[:6]}")
    out = subprocess.run(
        ["node", "chat.mjs", gateway.url + "/v1", key, MODEL],
        cwd=node_openai, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["text"] and got["finish_reason"] in ("stop", "length")
    assert got["usage"]["completion_tokens"] >= 1
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
    assert got["streamed"] == got["text"]  # temperature 0: the same answer
    assert got["stream_usage"]["completion_tokens"] == got["usage"]["completion_tokens"]
    assert got["not_found"] == {"isNotFound": True, "status": 404}
