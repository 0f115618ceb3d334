"""``--smoke``: every benchmark's own code paths on tiny shapes, in seconds, on a CPU.

CI runs each ``bench/*.py`` with ``--smoke`` (``tests/test_bench_smoke.py``), so a benchmark
cannot rot between GPU runs. A benchmark whose smoke run needs other sizes than its
defaults declares them as defaults for that mode: options given on the command line still
win, so ``--smoke --device cuda`` is a quick run on a GPU before device time is spent.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def add_smoke_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--smoke", action="store_true", help=f"smoke run: {what}")


def parse_args(
    parser: argparse.ArgumentParser, smoke_defaults: dict[str, Any], argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse ``argv``; with ``--smoke``, ``smoke_defaults`` replace the parser's defaults."""
    first, _ = parser.parse_known_args(argv)
    if first.smoke:
        unknown = set(smoke_defaults) - set(vars(first))
        if unknown:
            raise ValueError(f"smoke defaults for options the parser lacks: {sorted(unknown)}")
        parser.set_defaults(**smoke_defaults)
    return parser.parse_args(argv)
