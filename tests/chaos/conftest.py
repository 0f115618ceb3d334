"""One chaos cluster for the whole chaos suite (its workers take most of its time to
start): Redis with ``appendfsync always`` and two workers of two host processes each, every
worker behind a TCP proxy of its own (:mod:`testkit.chaos.cluster`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testkit.chaos.cluster import ChaosCluster


@pytest.fixture(scope="session")
def chaos_cluster(
    tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChaosCluster]:
    logs = tmp_path_factory.mktemp("chaos-logs")
    with ChaosCluster(tiny_checkpoint("llama"), logs, workers=2, host_processes=2) as cluster:
        yield cluster
