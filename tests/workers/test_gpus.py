"""``chatq worker --gpus``: GPU groups, what each child worker is told, the supervisor."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers.errors import ConfigError
from workers.gpus import child_env, gpu_groups
from workers.settings import WorkerSettings


def test_groups_from_list_all_and_tensor_parallel() -> None:
    assert gpu_groups("0,1") == [[0], [1]]
    assert gpu_groups("all", available=3) == [[0], [1], [2]]
    assert gpu_groups("0,1,2,3", tensor_parallel_size=2) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("spec", ["", "a,b", "0,0", "-1", "0,1,2"])
def test_bad_specs_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        gpu_groups(spec, tensor_parallel_size=2 if spec == "0,1,2" else 1)


def test_all_with_no_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        gpu_groups("all", available=0)


def test_child_settings_round_trip_through_the_environment() -> None:
    base = WorkerSettings(
        model_path="/models/qwen",
        redis_url="redis://127.0.0.1:6390/2",
        name="host7",
        max_num_seqs=128,
        enable_prefix_caching=False,
        metrics_port=9100,
        tensor_parallel_size=2,
        kv_cache_tokens=None,
    )
    env = child_env(base, [2, 3], index=1)
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env["NCCL_NVLS_ENABLE"] == "0"
    child = WorkerSettings.from_env(env)
    assert child.name == "host7-gpu2_3" and child.device == "cuda:0"
    assert child.metrics_port == 9101 and child.served_model_name == "qwen"
    assert child.max_num_seqs == 128 and child.enable_prefix_caching is False
    assert child.tensor_parallel_size == 2 and child.kv_cache_tokens is None
    assert child.engine_options()["tensor_parallel_size"] == 2
    assert child.redis_url == base.redis_url


# A stand-in for the per-GPU worker (a CPU machine cannot start one on ``cuda:0``): it logs
# its start with the settings it was given, crashes on its first start, and on SIGTERM logs
# it and exits 0.
CHILD = """
import os, signal, sys, time
from pathlib import Path
log = Path(sys.argv[1])
gpus = os.environ["CUDA_VISIBLE_DEVICES"]
def term(signum, frame):
    with log.open("a") as f:
        f.write(f"term {gpus}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)  # before the start is logged: the test signals after
first = not (log.parent / f"crashed-{gpus}").exists()
with log.open("a") as f:
    f.write(f"start {gpus} {os.environ['CHATQ_NAME']} {os.environ['CHATQ_DEVICE']}\\n")
if first:
    (log.parent / f"crashed-{gpus}").touch()
    sys.exit(3)
while True:
    time.sleep(0.05)
"""

SUPERVISOR = """
import sys
from workers.gpus import run_per_gpu
from workers.settings import WorkerSettings
settings = WorkerSettings(model_path="/models/tiny", redis_url="redis://127.0.0.1:1/0", name="w")
sys.exit(run_per_gpu(settings, "0,1", command=[sys.executable, sys.argv[1], sys.argv[2]]))
"""


def test_supervisor_restarts_a_crashed_child_and_forwards_sigterm(tmp_path: Path) -> None:
    """``--gpus 0,1``: one child per GPU, each with its own GPU and name; a child that exits
    non-zero is started again; SIGTERM to the supervisor reaches every child, and the
    supervisor exits with their (clean) code."""
    child, log = tmp_path / "child.py", tmp_path / "events.log"
    child.write_text(CHILD)
    repo = Path(__file__).resolve().parents[2]
    sup = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(child), str(log)], cwd=repo,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120  # ends the test; not a speed target

        def lines() -> list[str]:
            return log.read_text().splitlines() if log.exists() else []

        while sum(line.startswith("start") for line in lines()) < 4:
            assert sup.poll() is None and time.monotonic() < deadline, lines()
            time.sleep(0.05)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0, sup.stdout.read() if sup.stdout else ""
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    events = lines()
    starts = sorted(line for line in events if line.startswith("start"))
    assert starts == ["start 0 w-gpu0 cuda:0"] * 2 + ["start 1 w-gpu1 cuda:0"] * 2
    assert sorted(line for line in events if line.startswith("term")) == ["term 0", "term 1"]
