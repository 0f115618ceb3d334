"""Host time per phase of an engine step, measured by wrapping the engine's own methods.

The benchmarks name the methods a step runs through (``LLMEngine.begin_step`` /
``end_step``: ``Scheduler.schedule``, ``ModelRunner.launch``, ``Scheduler.commit``,
``ModelRunner.collect``, ``Scheduler.complete``...). When the engine changes, a name that is
gone fails at once with the phase it belonged to, and ``idle`` lists phases that were
wrapped but never ran (a method still there but no longer on the step's path), so a
benchmark can refuse to report a phase as taking no time when it is simply not measured.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any


class PhaseTimer:
    """Wraps ``(object, attribute, label)`` methods with perf_counter timers: ``totals`` and
    ``calls`` per label since the start, ``current`` since the caller last cleared it."""

    def __init__(self, targets: Iterable[tuple[Any, str, str]]) -> None:
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.current: dict[str, float] = {}
        for obj, attr, label in targets:
            self._wrap(obj, attr, label)

    def _wrap(self, obj: Any, attr: str, label: str) -> None:
        fn = getattr(obj, attr, None)
        if fn is None or not callable(fn):
            raise AttributeError(
                f"phase {label!r}: {type(obj).__name__}.{attr} is gone; update the phases "
                "this benchmark times to the engine's step as it is now"
            )
        self.totals[label] = 0.0
        self.calls[label] = 0

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.totals[label] += elapsed
                self.calls[label] += 1
                self.current[label] = self.current.get(label, 0.0) + elapsed

        setattr(obj, attr, timed)

    def idle(self, optional: Iterable[str] = ()) -> list[str]:
        """Labels whose method never ran, leaving out ``optional`` ones (phases a step may
        legitimately skip on this device)."""
        skip = set(optional)
        return [label for label, n in self.calls.items() if n == 0 and label not in skip]

    def require_all_ran(self, optional: Iterable[str] = ()) -> None:
        """Raise if a timed phase never ran: its figure would read as free."""
        idle = self.idle(optional)
        if idle:
            raise RuntimeError(f"timed phases never ran (no longer on the step's path?): {idle}")
