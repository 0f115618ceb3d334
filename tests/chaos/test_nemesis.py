"""A mixed schedule of faults under streamed traffic, judged by the independent checker:
with ``appendfsync always`` every guarantee holds (its table is printed: all zeros but the
request and recovered counts)."""

from __future__ import annotations

import pytest

from testkit.chaos.cluster import ChaosCluster
from testkit.chaos.experiment import experiment
from testkit.chaos.nemesis import KINDS, schedule

pytestmark = pytest.mark.chaos


def _show(capsys: pytest.CaptureFixture[str], table: str) -> None:
    """The checker's table in the test log, passed or not (CI keeps it)."""
    with capsys.disabled():
        print("\n" + table, flush=True)


async def test_every_kind_of_fault_in_one_schedule_loses_and_doubles_nothing(
    chaos_cluster: ChaosCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    workers = sorted(chaos_cluster.workers)
    # Gaps of a few seconds: each fault's recovery is measured before the next begins.
    faults = schedule(KINDS, workers, start_s=2.0, gap_s=2.5, seed=20)
    duration_s = faults[-1].at_s + faults[-1].duration_s + 2.0
    # Answers of 150-400 tokens keep a few requests open at every fault's start (at 40-160
    # an idle machine answered so fast that once none of 97 was open when any fault began).
    verdict, traffic = await experiment(
        chaos_cluster, faults, duration_s=duration_s, rate_per_s=3.0, prefix="mixed",
        max_tokens=(150, 400),
    )  # fmt: skip
    _show(capsys, verdict.table(f"chaos schedule, appendfsync always: {len(faults)} faults"))
    assert verdict.requests >= 20 and traffic.submit_failures == 0, traffic.submit_errors
    assert verdict.clean, verdict
    assert verdict.recovered, "no request was open during a fault: the schedule tested nothing"
    assert all(seconds is not None for _, seconds in verdict.recovery_s), verdict.recovery_s
