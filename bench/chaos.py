"""Chaos runs longer than CI's: a schedule of every kind of fault under streamed traffic, per
Redis fsync policy, each judged by the independent checker (``testkit.chaos``), and what a
Redis crash or rollback costs.

Per ``--fsync`` policy (``always``, ``everysec``): ``--rounds`` schedules of every fault kind
(worker and host kill -9, SIGSTOP past the heartbeat TTL, Redis kill -9 and restart,
``CLIENT PAUSE``, network delay and partition through a proxy per worker), with the
checker's table (lost, duplicated final, duplicated stream text, unexpected, recovered) and
each fault's recovery time. Then, unless ``--no-rollback``, a Redis restart from a snapshot
``--rollback-s`` old under load (a host crash under ``everysec``, a failover to a lagging
replica): what that loses.

    .venv/bin/python bench/chaos.py                          # both policies, 3 rounds each
    .venv/bin/python bench/chaos.py --fsync always --rounds 1
    .venv/bin/python bench/chaos.py --smoke                  # CI: one short schedule
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testkit.chaos.checker import Verdict  # noqa: E402
from testkit.chaos.cluster import ChaosCluster  # noqa: E402
from testkit.chaos.experiment import experiment  # noqa: E402
from testkit.chaos.nemesis import KINDS, ROLLBACK, Fault, schedule  # noqa: E402
from testkit.checkpoints import build_checkpoint  # noqa: E402

SMOKE_KINDS = ("kill_redis", "client_pause")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fsync", nargs="+", default=["always", "everysec"],
                   choices=["always", "everysec", "no"])  # fmt: skip
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--rate", type=float, default=4.0, help="requests/s submitted")
    p.add_argument("--gap-s", type=float, default=6.0, help="between faults")
    p.add_argument("--rollback-s", type=float, default=1.0)
    p.add_argument("--no-rollback", action="store_true")
    p.add_argument("--smoke", action="store_true")
    return p.parse_args()


async def run_policy(ckpt: Path, fsync: str, args: argparse.Namespace, logs: Path) -> bool:
    kinds = SMOKE_KINDS if args.smoke else KINDS
    workers = 2 if args.smoke else args.workers
    clean = True
    hosts = 1 if args.smoke else 2  # the smoke run's faults do not kill host processes
    with ChaosCluster(ckpt, logs, workers=workers, appendfsync=fsync, host_processes=hosts) as cl:
        for round_ in range(1 if args.smoke else args.rounds):
            faults = schedule(kinds, sorted(cl.workers), start_s=2.0, gap_s=args.gap_s,
                              seed=round_)  # fmt: skip
            duration_s = faults[-1].at_s + faults[-1].duration_s + 2.0
            verdict, _ = await experiment(
                cl, faults, duration_s=duration_s, rate_per_s=args.rate, seed=round_,
                prefix=f"{fsync}-{round_}",
            )  # fmt: skip
            report(verdict, f"appendfsync {fsync}, round {round_ + 1}: {len(faults)} faults")
            clean &= verdict.clean
        if not args.smoke and not args.no_rollback:
            rollback = Fault(ROLLBACK, "cw0", at_s=3.0, duration_s=args.rollback_s)
            verdict, traffic = await experiment(
                cl, [rollback], duration_s=3.0 + args.rollback_s + 3.0, rate_per_s=args.rate,
                prefix=f"{fsync}-rollback", drain_timeout_s=90.0,
            )  # fmt: skip
            report(verdict, f"Redis restarted from a snapshot {args.rollback_s:g} s old")
            assert rollback.began_s is not None and rollback.ended_s is not None
            during = [s for s in traffic.seen.values()
                      if rollback.began_s <= s.submitted_s < rollback.ended_s]  # fmt: skip
            print(f"requests acknowledged during the lost {args.rollback_s:g} s: {len(during)}")
    return clean


def report(verdict: Verdict, title: str) -> None:
    print(verdict.table(f"### {title}") + "\n", flush=True)


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="chatq-chaos-") as tmp:
        root = Path(tmp)
        ckpt = build_checkpoint(root / "ckpt", "llama")
        started = time.monotonic()
        broken = False
        for fsync in ["always"] if args.smoke else args.fsync:
            clean = asyncio.run(run_policy(ckpt, fsync, args, root))
            # A guarantee broken under ``always`` is a failure; under weaker policies the
            # tables measure what they cost.
            broken |= fsync == "always" and not clean
        print(f"total {time.monotonic() - started:.0f} s")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
