"""``chatq worker --gpus``: GPU groups and what each child worker is told."""

from __future__ import annotations

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
