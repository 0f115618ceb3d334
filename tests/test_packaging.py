"""`pip install chatq` is the producer and nothing heavy.

The wheel is built from this checkout and installed WITHOUT extras into a fresh virtual
environment (its dependencies come from the package registry; pip's cache makes reruns
quick). From there a producer submits a chat to a real worker, which runs from the dev
environment on the tiny test checkpoint, and gets the answer.
"""

from __future__ import annotations

import email
import json
import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny"
# Only the worker extra (or nothing of ours) may bring these in.
HEAVY = (
    "torch", "transformers", "tokenizers", "safetensors", "numpy", "triton", "jinja2", "rich",
    "prometheus_client", "pynvml", "arq",
)  # fmt: skip
# What the producer script below prints: what it imported, where from, and the answer.
PRODUCER = """
import asyncio, json, sys
import producer
from producer import ChatClient

async def main(url: str) -> dict:
    async with ChatClient(url) as client:
        rid = await client.submit(
            [{"role": "user", "content": "Where is my order #1234?"}],
            model=sys.argv[2], max_tokens=8, stream=True,
        )
        deltas = [delta async for delta in client.stream(rid, timeout_s=120)]
        res = await client.result(rid, timeout_s=120)
    return {
        "producer_file": producer.__file__, "deltas": deltas, "text": res.text,
        "finish_reason": res.finish_reason, "completion_tokens": res.usage.completion_tokens,
        "worker": res.worker, "heavy": sorted(set(sys.modules) & set(json.loads(sys.argv[3]))),
    }

print(json.dumps(asyncio.run(main(sys.argv[1]))))
"""


def _run(cmd: list[str], cwd: Path, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def test_importing_producer_loads_nothing_heavy() -> None:
    code = (
        "import importlib, json, pkgutil, sys, producer\n"
        "for mod in pkgutil.walk_packages(producer.__path__, 'producer.'):\n"
        "    importlib.import_module(mod.name)\n"
        f"print(json.dumps(sorted(set(sys.modules) & set({list(HEAVY)!r}))))\n"
    )
    # The dev environment has every heavy package installed: anything imported shows.
    out = _run([sys.executable, "-c", code], REPO, timeout_s=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """chatq's wheel, built from a copy of the checkout's files (tracked, plus new files git
    does not ignore): an in-tree build would leave build/ behind, whose stale modules later
    builds would pack."""
    root = tmp_path_factory.mktemp("wheel")
    listing = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO)
    assert listing.returncode == 0, f"the wheel test needs a git checkout: {listing.stderr}"
    src = root / "src"
    for name in listing.stdout.split("\0"):
        if name and (REPO / name).is_file():  # a deleted file is still listed until committed
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    out = _run([*pip_wheel, "-q", "-w", str(root / "dist"), str(src)], root)
    assert out.returncode == 0, out.stdout + out.stderr
    (path,) = (root / "dist").glob("chatq-*.whl")
    return path


def test_wheel_requires_only_redis_and_msgpack(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(zf.read(meta))  # core metadata: RFC 822 headers
    requires = metadata.get_all("Requires-Dist", [])
    plain = sorted(r for r in requires if "extra ==" not in r)
    assert plain == ["msgpack>=1.0", "redis[hiredis]>=5.0"]
    extras = set(metadata.get_all("Provides-Extra", []))
    assert {"worker", "gpu", "demo", "dev"} <= extras
    assert any(r.startswith("torch") and 'extra == "worker"' in r for r in requires)


@pytest.fixture
def slim_venv(wheel: Path, tmp_path: Path) -> Path:
    """A fresh virtual environment with the wheel installed without extras; its python."""
    venv = tmp_path / "venv"
    # No pip of its own (ensurepip is the slow part): the dev environment's pip installs
    # into it with --python.
    out = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    assert out.returncode == 0, out.stderr
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install"]
    out = _run([*pip, "-q", "--disable-pip-version-check", str(wheel)], tmp_path, timeout_s=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return python


@pytest.fixture
def cli_worker(
    redis_url: str, tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`chatq worker` from the dev environment on the tiny checkpoint."""
    log = (tmp_path / "worker.log").open("wb")
    args = [
        "--model", str(tiny_checkpoint("llama")), "--redis", redis_url, "--name", "wheel-w",
        "--served-model-name", MODEL, "--device", "cpu", "--kv-cache-tokens", "2048",
        "--max-num-seqs", "4", "--torch-threads", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "worker", *args],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    yield proc
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    log.close()


def test_wheel_without_extras_submits_a_chat(
    cli_worker: subprocess.Popen[bytes], slim_venv: Path, redis_url: str, tmp_path: Path
) -> None:
    python, venv = str(slim_venv), slim_venv.parent.parent
    found = _run([python, "-c", f"import importlib.util as u; print([m for m in {list(HEAVY)!r} "
                  "if u.find_spec(m)])"], tmp_path)  # fmt: skip
    assert found.stdout.strip() == "[]", found.stdout + found.stderr
    # Run outside the checkout, so that only the installed wheel can be imported.
    out = _run([python, "-c", PRODUCER, redis_url, MODEL, json.dumps(HEAVY)], tmp_path)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert out.returncode == 0, f"{out.stderr}\n--- worker log ---\n{log}"
    got = json.loads(out.stdout)
    assert Path(got["producer_file"]).is_relative_to(venv), got["producer_file"]
    assert got["heavy"] == []
    assert got["worker"] == "wheel-w"
    assert got["finish_reason"] in ("stop", "length")
    assert 1 <= got["completion_tokens"] <= 8
    assert "".join(got["deltas"]) == got["text"]

    # The CLI's producer side works too; the worker side names the extra it needs.
    chatq = str(venv / "bin" / "chatq")
    status = _run([chatq, "status", "--redis", redis_url, "--json"], tmp_path)
    assert status.returncode == 0, status.stderr
    (model,) = json.loads(status.stdout.splitlines()[-1])
    assert (model["model"], model["workers"]) == (MODEL, ["wheel-w"])
    worker = _run([chatq, "worker", "--model", "x", "--redis", redis_url], tmp_path)
    assert worker.returncode == 2
    assert "pip install 'chatq[worker]'" in worker.stderr
    assert "torch" in worker.stderr
