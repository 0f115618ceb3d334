"""The chaos checker: what every request got, judged from the clients' side and from what
Redis keeps, independently of the workers' own accounting.

Per request (acknowledged by ENQUEUE):

- **lost**: no final result, neither seen by its reader nor kept in its result stream;
- **duplicated final**: more than one final, seen or kept;
- **duplicated stream text**: a chunk index seen or kept twice, a gap in the indexes, or
  (for a ``done``) chunks that do not join to its final text, as seen or as kept;
- **unexpected**: a result stream for an id that was never submitted;
- **recovered**: answered correctly although a fault began while it was open.

Per fault, the **recovery time**: from the fault's end until every request open when it
began had its final (0 when they all finished during the fault).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis

from producer.contract.keys import Keys
from producer.contract.results import Chunk, Done, Error, decode_result
from testkit.chaos.nemesis import Fault
from testkit.chaos.traffic import Seen, Traffic

KEYS = Keys()
DETAIL_CHARS = 1500  # of each finding's detail in the table
COLUMNS = ("requests", "lost", "duplicated_final", "duplicated_text", "unexpected", "recovered")


@dataclass
class Verdict:
    """The checker's findings (see the module doc); ids per finding."""

    requests: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated_final: list[str] = field(default_factory=list)
    duplicated_text: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    cancelled: int = 0
    recovery_s: list[tuple[str, float | None]] = field(default_factory=list)  # (fault, s)
    details: dict[str, str] = field(default_factory=dict)  # id → what was wrong with it

    def counts(self) -> dict[str, int]:
        return {c: self.requests if c == "requests" else len(getattr(self, c)) for c in COLUMNS}

    @property
    def clean(self) -> bool:
        """Every guarantee held: nothing lost, doubled or unexpected."""
        c = self.counts()
        return not (c["lost"] or c["duplicated_final"] or c["duplicated_text"] or c["unexpected"])

    def table(self, title: str = "") -> str:
        """The findings as a Markdown table, then one row per fault."""
        counts = self.counts()
        lines = [title] if title else []
        lines += [
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "---|" * len(COLUMNS),
            "| " + " | ".join(str(counts[c]) for c in COLUMNS) + " |",
            "",
            "| fault | recovery s |",
            "|---|---|",
        ]
        for name, seconds in self.recovery_s:
            lines.append(f"| {name} | {'open' if seconds is None else f'{seconds:.2f}'} |")
        lines += [
            f"  {rid}: {detail[:DETAIL_CHARS]}" for rid, detail in sorted(self.details.items())
        ]
        return "\n".join(lines)


def check(traffic: Traffic, r: redis.Redis, faults: list[Fault]) -> Verdict:
    """Judge every request of ``traffic`` against what ``r`` keeps (see the module doc)."""
    verdict = Verdict(requests=len(traffic.seen))
    for rid, seen in sorted(traffic.seen.items()):
        kept = [decode_result(f) for _, f in r.xrange(KEYS.result(rid))]
        _judge(verdict, seen, kept, faults)
    prefix = KEYS.result("")
    for key in r.scan_iter(match=f"{prefix}{traffic.prefix}-*", count=1000):
        rid = key.decode()[len(prefix) :]
        if rid not in traffic.attempted:
            verdict.unexpected.append(rid)
    for fault in faults:
        verdict.recovery_s.append((fault.name, _recovery_s(fault, traffic.seen.values())))
    return verdict


def _judge(verdict: Verdict, seen: Seen, kept: list[Any], faults: list[Fault]) -> None:
    rid = seen.request_id
    kept_finals = [e for e in kept if isinstance(e, Done | Error)]
    kept_chunks = [e for e in kept if isinstance(e, Chunk)]
    if not seen.finals and not kept_finals:
        verdict.lost.append(rid)
        return
    if len(seen.finals) > 1 or len(kept_finals) > 1:
        verdict.duplicated_final.append(rid)
    final = seen.finals[0][1] if seen.finals else kept_finals[0]
    if isinstance(final, Error) and final.code == "cancelled":
        verdict.cancelled += 1
    seen_text = [seen.chunks[i] for i in sorted(seen.chunks)]
    kept_indexes = [c.index for c in kept_chunks]
    doubled = (
        seen.repeated
        or sorted(seen.chunks) != list(range(len(seen.chunks)))
        or kept_indexes != list(range(len(kept_chunks)))
        or (
            isinstance(final, Done)
            and ("".join(seen_text) != final.text
                 or "".join(c.delta for c in kept_chunks) != final.text)
        )
    )  # fmt: skip
    if doubled:
        verdict.duplicated_text.append(rid)
        verdict.details[rid] = (
            f"seen indexes {sorted(seen.chunks)} repeated {seen.repeated}; kept indexes "
            f"{kept_indexes}; final {final!r}; seen {seen_text!r}; kept "
            f"{[c.delta for c in kept_chunks]!r}"
        )
        return
    final_s = seen.final_s
    if any(f.began_s is not None and seen.submitted_s < f.began_s and
           (final_s is None or final_s > f.began_s) for f in faults):  # fmt: skip
        verdict.recovered.append(rid)


def _recovery_s(fault: Fault, seen: Any) -> float | None:
    """Seconds from the fault's end until the requests open at its start had finals; None
    when one never got one."""
    if fault.began_s is None or fault.ended_s is None:
        return None
    latest = fault.ended_s
    for s in seen:
        if s.submitted_s < fault.began_s and (s.final_s is None or s.final_s > fault.began_s):
            if s.final_s is None:
                return None
            latest = max(latest, s.final_s)
    return latest - fault.ended_s
