"""Subprocesses the benchmarks start (workers, gateways, arq workers): started with their
output appended to a log file, stopped with SIGTERM and, after 30 s, SIGKILL."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def spawn(
    args: list[str], log: Path, cwd: Path = REPO, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``args`` run from ``cwd`` (the repository by default), unbuffered, stdout and stderr
    appended to ``log``; ``env`` adds to this process's environment."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        args, cwd=cwd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=full_env
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
