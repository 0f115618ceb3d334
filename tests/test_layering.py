"""Who may import whom across the repository's top-level folders.

bench/ and tests/ share their fixtures through testkit/ and never import each other: a
benchmark that needs a test helper (or a test that needs a benchmark tool) would tie the two
together, and a change made for one would break the other unseen. testkit/ imports neither,
and the installed packages import none of the three. An engine factory named by string
(``"module:attr"``, loaded by the worker) counts as an import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder -> top-level names its modules must not import
FORBIDDEN: dict[str, set[str]] = {
    "tests": {"bench"},
    "bench": {"tests"},
    "testkit": {"tests", "bench"},
    "producer": {"tests", "bench", "testkit"},
    "workers": {"tests", "bench", "testkit"},
    "gpu_engine": {"tests", "bench", "testkit"},
}
# "module.path:attr" strings (engine factories) name an import too.
FACTORY = re.compile(r"^([A-Za-z_]\w*)(\.\w+)*:\w+(\.\w+)*$")


def imported_roots(source: str) -> set[str]:
    """Top-level package names ``source`` imports anywhere (nested imports included), plus
    those named by ``module:attr`` string constants."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = FACTORY.match(node.value)
            if match:
                roots.add(match.group(1))
    return roots


def test_the_check_sees_every_kind_of_import() -> None:
    source = (
        "import bench.spike\n"
        "from tests.checkpoints import build_tokenizer\n"
        "def f():\n    import testkit\n"
        "FACTORY = 'bench.zero_cost_engine:ZeroCostEngine.from_options'\n"
        "from . import sibling\n"
    )
    assert imported_roots(source) == {"bench", "tests", "testkit"}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_imports_only_downward(folder: str) -> None:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    offences = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in files
        for name in sorted(imported_roots(path.read_text()) & FORBIDDEN[folder])
    ]
    assert not offences, "\n".join(offences)
