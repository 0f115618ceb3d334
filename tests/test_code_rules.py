"""House rules that code review kept finding broken, checked on every run: short functions,
a docstring on every public class, each boundary's imports pointing one way, and a
producer that runs without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("producer", "workers", "gateway")
MAX_FUNCTION_LINES = 60


def _modules(*packages: str) -> list[tuple[Path, ast.Module]]:
    return [
        (path, ast.parse(path.read_text(encoding="utf-8")))
        for package in packages
        for path in sorted((REPO / package).rglob("*.py"))
    ]


def _imports(tree: ast.Module) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_no_function_is_longer_than_60_lines() -> None:
    """Orchestration reads as a list of named steps, not one long body."""
    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for path, tree in _modules(*PACKAGES)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_every_public_class_has_a_docstring() -> None:
    missing = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name}"
        for path, tree in _modules(*PACKAGES)
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and not node.name.startswith("_")
        and ast.get_docstring(node) is None
    ]
    assert not missing, missing


def test_the_contract_imports_neither_side() -> None:
    """producer/contract is what both sides import: it imports nothing of theirs (only
    producer.errors, the package's root exception, and the engine's torch-free types)."""
    allowed = ("producer.contract", "producer.errors", "gpu_engine.sequence")
    for path, tree in _modules("producer/contract"):
        ours = {
            m for m in _imports(tree) if m.split(".")[0] in ("producer", "workers", "gpu_engine")
        }
        assert all(m.startswith(allowed) for m in ours), (path.name, ours)


def test_the_engine_wire_and_loop_do_not_import_the_host_side() -> None:
    """The engine process's side imports the wire, never the host's engine_process (no
    import circle); the wire imports neither."""
    trees = {path.stem: tree for path, tree in _modules("workers")}
    for name in ("engine_wire", "engine_loop", "engine_fronts", "engine_trace"):
        assert "workers.engine_process" not in _imports(trees[name]), name
    assert not {m for m in _imports(trees["engine_wire"]) if m.startswith("workers")}


def test_the_producer_runs_without_torch() -> None:
    """A service that only submits chats never loads torch or transformers."""
    code = (
        "import sys\n"
        "import producer, producer.client, producer.sync_client\n"
        "from producer.contract import codec, enqueue, results, schema, scripts\n"
        "env = codec.make_envelope([{'role': 'user', 'content': 'hi'}], model='m', "
        "max_tokens=5)\n"
        "codec.decode_envelope(codec.encode_envelope(env))\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
