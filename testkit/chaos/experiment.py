"""One chaos experiment: traffic against a cluster while the nemesis runs its schedule, then
the checker's verdict."""

from __future__ import annotations

import asyncio

from testkit.chaos.checker import Verdict, check
from testkit.chaos.cluster import MODEL, ChaosCluster
from testkit.chaos.nemesis import Fault, Nemesis
from testkit.chaos.traffic import Traffic


async def experiment(
    cluster: ChaosCluster,
    faults: list[Fault],
    *,
    duration_s: float,
    drain_timeout_s: float = 120.0,
    rate_per_s: float = 4.0,
    max_tokens: tuple[int, int] = (40, 160),
    seed: int = 0,
    prefix: str = "chaos",
    submit_retry_s: float = 30.0,
) -> tuple[Verdict, Traffic]:
    """Submit for ``duration_s`` while ``faults`` happen; wait for every answer (up to the
    drain timeout after the faults are over); judge."""
    traffic = Traffic(
        cluster.url, MODEL, rate_per_s=rate_per_s, max_tokens=max_tokens, seed=seed,
        prefix=prefix, submit_retry_s=submit_retry_s,
    )  # fmt: skip
    await asyncio.gather(traffic.run(duration_s, drain_timeout_s), Nemesis(cluster).run(faults))
    r = cluster.client()
    try:
        return check(traffic, r, faults), traffic
    finally:
        r.close()
