"""WorkerSettings: defaults, environment, CLI (CLI wins), validation."""

from __future__ import annotations

import argparse

import pytest

from workers.errors import ConfigError
from workers.settings import WorkerSettings, add_worker_arguments


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_wins_over_environment_which_wins_over_defaults() -> None:
    env = {
        "CHATQ_REDIS_URL": "redis://envhost:6379/1",
        "CHATQ_MAX_NUM_SEQS": "64",
        "CHATQ_GRACE_PERIOD_S": "12.5",
        "CHATQ_ENABLE_PREFIX_CACHING": "false",
    }
    args = _parse(
        "--model",
        "/models/smol",
        "--max-num-seqs",
        "32",
        "--device",
        "cpu",
        "--kv-cache-tokens",
        "4096",
        "--max-model-len",
        "2048",
        "--name",
        "w7",
    )
    s = WorkerSettings.from_args(args, env)
    assert s.redis_url == "redis://envhost:6379/1"
    assert s.max_num_seqs == 32 and s.grace_period_s == 12.5
    assert s.enable_prefix_caching is False and s.kv_cache_tokens == 4096
    assert s.name == "w7" and s.device == "cpu"
    assert s.model_name == "smol"  # lanes are named after the model dir by default
    assert s.engine_options()["max_num_seqs"] == 32
    assert s.max_model_len == 2048 and s.engine_options()["max_model_len"] == 2048
    assert s.admission_headroom_tokens == s.max_num_batched_tokens
    fp8 = WorkerSettings.from_args(
        _parse("--model", "/m", "--kv-cache-dtype", "fp8", "--shared-prefix-attention"),
        {"CHATQ_QUANTIZATION": "fp8"},
    )
    assert fp8.engine_options()["kv_cache_dtype"] == "fp8"
    assert fp8.engine_options()["quantization"] == "fp8"
    assert fp8.engine_options()["shared_prefix_attention"] is True
    assert s.engine_options()["shared_prefix_attention"] is False
    head = WorkerSettings.from_args(_parse("--model", "/m", "--quantization", "fp8-lm-head"), {})
    assert head.engine_options()["quantization"] == "fp8-lm-head"
    served = WorkerSettings.from_args(_parse("--model", "/m", "--served-model-name", "chat"), {})
    assert served.model_name == "chat"


def test_defaults_give_unique_names() -> None:
    assert WorkerSettings().name != WorkerSettings().name


@pytest.mark.parametrize(
    "bad",
    [
        {"redis_url": "http://localhost"},
        {"prefix": "a:b"},
        {"name": "has space"},
        {"max_num_seqs": 0},
        {"kv_cache_tokens": -1},
        {"max_model_len": 1},
        {"max_inflight_factor": 0.5},
        {"aging_s": 0},
        {"engine_factory": "no_colon"},
        {"host_processes": 0},
        {"host_processes": 33},
        {"kv_cache_dtype": "int8"},
        {"quantization": "awq"},
    ],
)
def test_invalid_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        WorkerSettings(**bad)  # type: ignore[arg-type]


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="CHATQ_MAX_NUM_SEQS"):
        WorkerSettings.from_env({"CHATQ_MAX_NUM_SEQS": "many"})
