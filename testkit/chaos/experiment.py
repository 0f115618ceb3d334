"""One chaos experiment: traffic against a cluster while the nemesis runs its schedule, then
the checker's verdict."""

from __future__ import annotations

import asyncio
import contextlib

from testkit.chaos.checker import Verdict, check
from testkit.chaos.cluster import MODEL, ChaosCluster
from testkit.chaos.nemesis import Fault, Nemesis
from testkit.chaos.traffic import Traffic

FIRST_SUBMIT_WAIT_S = 30.0


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
    faults_run = _faults_once_traffic_flows(cluster, traffic, faults)
    await asyncio.gather(traffic.run(duration_s, drain_timeout_s), faults_run)
    r = cluster.client()
    try:
        return check(traffic, r, faults), traffic
    finally:
        r.close()


async def _faults_once_traffic_flows(
    cluster: ChaosCluster, traffic: Traffic, faults: list[Fault]
) -> None:
    """The schedule's clock starts at the first accepted submit, not at the call: on a loaded
    machine the client can take seconds to connect, and a fault at 2 s would otherwise find
    no request open. Past FIRST_SUBMIT_WAIT_S the faults run anyway."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(traffic.first_submit.wait(), FIRST_SUBMIT_WAIT_S)
    await Nemesis(cluster).run(faults)
