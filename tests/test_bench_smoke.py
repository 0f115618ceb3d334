"""Every benchmark runs in CI: ``python bench/<name>.py --smoke`` (tiny shapes, CPU, seconds).

A benchmark is any ``bench/*.py`` that runs as a script; the smoke run takes its own code
paths end to end and fails on the errors a full run would report (a failed part, a phase
the step no longer runs, a lost request). Run as subprocesses: tests/ does not import
bench/. ``-m "not bench"`` leaves them out of a quick local run.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 280  # under pytest's own 300 s, so a hung run reports its output


def _runs_as_script(path: Path) -> bool:
    """True for modules with an ``if __name__ == "__main__":`` block."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            left = node.test.left
            if isinstance(left, ast.Name) and left.id == "__name__":
                return True
    return False


BENCHMARKS = sorted(p.name for p in (REPO / "bench").glob("*.py") if _runs_as_script(p))


def test_benchmarks_are_found() -> None:
    assert {"engine_throughput.py", "queue_throughput.py", "spike.py"} <= set(BENCHMARKS)
    assert "spike_report.py" not in BENCHMARKS  # a module the spike imports, not a benchmark


@pytest.mark.bench
@pytest.mark.parametrize("name", BENCHMARKS)
def test_smoke_run(name: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        out = subprocess.run(
            [sys.executable, str(REPO / "bench" / name), "--smoke"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{name} --smoke ran past {TIMEOUT_S} s:\n{err.stdout}\n{err.stderr}")
    tail = f"{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    assert out.returncode == 0, f"{name} --smoke exited {out.returncode}:\n{tail}"
    assert out.stdout.strip(), f"{name} --smoke printed no results"


def test_the_spike_refuses_a_kernel_profile_off_cuda() -> None:
    """``--profile-steps`` profiles CUDA kernels: on the CPU it is refused, naming the option,
    before anything runs (not accepted and left empty)."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "spike.py"), "--smoke", "--profile-steps", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--profile-steps" in out.stderr and "CUDA" in out.stderr
