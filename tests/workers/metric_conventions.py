"""Prometheus naming conventions, checked on families from a live registry or a scrape.

Used by the metrics tests and the stack test: ``chatq_`` prefix, snake case, counters end in
``_total``, base units only (seconds, bytes, ratios 0..1, celsius, watts, hertz; never
milliseconds or percent), histograms are durations in seconds, every family has help text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

NAME_RE = re.compile(r"^chatq_[a-z][a-z0-9_]*[a-z0-9]$")
NOT_BASE_UNITS = ("_ms", "_milliseconds", "_percent", "_pct", "_kib", "_mib", "_gib", "_mhz",
                  "_minutes", "_hours", "_kb", "_mb")  # fmt: skip
GAUGE_SUFFIXES = ("_seconds", "_bytes", "_ratio", "_celsius", "_watts", "_hertz", "_tokens",
                  "_requests", "_devices", "_workers", "_throttled", "_per_second", "_info",
                  "_up")  # fmt: skip


def convention_problems(families: Iterable[Any]) -> list[str]:
    """One line per family that breaks a convention (empty: all fine)."""
    problems: list[str] = []
    for fam in families:
        name, kind = fam.name, fam.type
        full = f"{name}_total" if kind == "counter" else name  # the client strips _total
        if not NAME_RE.match(full):
            problems.append(f"{full}: not chatq_ snake case")
        if any(part in full for part in NOT_BASE_UNITS):
            problems.append(f"{full}: not in base units")
        if not fam.documentation.strip():
            problems.append(f"{full}: no help text")
        if kind == "histogram" and not name.endswith("_seconds"):
            problems.append(f"{name}: histograms here are durations, named _seconds")
        if kind == "gauge" and (name.endswith("_total") or not name.endswith(GAUGE_SUFFIXES)):
            problems.append(f"{name}: a gauge names its unit ({', '.join(GAUGE_SUFFIXES)})")
        if kind not in ("counter", "gauge", "histogram"):
            problems.append(f"{name}: unexpected type {kind}")
    return problems
