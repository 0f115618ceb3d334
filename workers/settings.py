"""Typed settings of one worker, from the environment (``CHATQ_*``) or the CLI.

Every field has one CLI option (``--max-num-seqs``) and one environment variable
(``CHATQ_MAX_NUM_SEQS``); the CLI wins over the environment, which wins over the defaults.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gpu_engine.config import ATTENTION_BACKENDS, DTYPES, KV_CACHE_DTYPES, QUANTIZATIONS
from producer.connection import check_url
from producer.contract.keys import HEARTBEAT_INTERVAL_S, check_partitions
from producer.errors import ChatqError
from workers.errors import ConfigError

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_ENGINE_FACTORY = "gpu_engine:LLMEngine.from_options"
MAX_HOST_PROCESSES = 32
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # every chatq process's log


def default_worker_name() -> str:
    """``host-pid-xxxx``: unique per process, readable in ``chatq status``."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process needs; validated on construction."""

    model_path: str = ""
    redis_url: str = DEFAULT_REDIS_URL
    name: str = field(default_factory=default_worker_name)
    served_model_name: str = ""  # request lanes are named after it; default: model dir name
    # A hub id in model_path: use the local Hugging Face cache only (also HF_HUB_OFFLINE=1).
    offline: bool = False
    prefix: str = "chatq"
    # The queue's partitions (Redis Cluster: one hash slot each); producers must agree.
    partitions: int = 1
    # --- engine options (gpu_engine.LLMEngine.from_options) ---
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    kv_cache_tokens: int | None = None
    max_model_len: int | None = None  # longest prompt + output; None: the model's limit
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    kv_cache_dtype: str = "auto"  # "fp8": e4m3 KV cache, about half the bytes per token
    quantization: str = "none"  # "fp8": FP8 linear layers ("fp8-lm-head": and the LM head)
    # A shared cached prefix (system prompt) attended once per group of decode sequences.
    shared_prefix_attention: bool = False
    seed: int = 0
    torch_threads: int | None = None  # CPU engines: torch.set_num_threads in the engine process
    tensor_parallel_size: int = 1  # shard the model over this many GPUs (cuda:N .. N+k-1)
    engine_factory: str = DEFAULT_ENGINE_FACTORY  # "module:attr" called like from_options
    # --- intake (how much work this worker takes from Redis) ---
    max_inflight_factor: float = 1.5  # admitted requests ≤ max_num_seqs × this
    headroom_tokens: int | None = None  # cost budget above the KV cache; default: batch tokens
    aging_s: float = 2.0  # one priority level is worth this many seconds of waiting
    read_block_ms: int = 500  # longest blocking XREADGROUP (bounds shutdown latency)
    # Host processes sharing the one engine process, each pulling, tokenizing and
    # aggregating on its own core (one is plenty for a GPU generating long answers; more for
    # small models with short answers, where one host core cannot keep up with the engine).
    host_processes: int = 1
    # --- reliability ---
    max_deliveries: int = 3
    grace_period_s: float = 30.0
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    # Entries Redis says this worker holds but it does not (a Redis restart from older data,
    # a lost reply) are taken up again once idle this long; checked this often too.
    reconcile_interval_s: float = 5.0
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        try:
            check_url(self.redis_url)
        except ChatqError as exc:
            raise ConfigError(str(exc)) from None
        if not self.prefix or ":" in self.prefix:
            raise ConfigError(f"prefix must be non-empty and contain no ':': {self.prefix!r}")
        try:
            check_partitions(self.partitions)
        except ChatqError as exc:
            raise ConfigError(str(exc)) from None
        if not self.name or any(c.isspace() or c in ":*?[]" for c in self.name):
            raise ConfigError(
                f"worker name must be non-empty without spaces or ':*?[]': {self.name!r}"
            )
        positive = (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_deliveries",
            "read_block_ms",
            "tensor_parallel_size",
            "host_processes",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens <= 0:
            raise ConfigError("kv_cache_tokens must be positive")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("max_model_len must be at least 2")
        if self.max_inflight_factor < 1.0:
            raise ConfigError("max_inflight_factor must be ≥ 1")
        if self.aging_s <= 0 or self.grace_period_s < 0 or self.heartbeat_interval_s <= 0:
            raise ConfigError("aging_s and heartbeat_interval_s must be > 0, grace_period_s ≥ 0")
        if self.reconcile_interval_s <= 0:
            raise ConfigError("reconcile_interval_s must be > 0")
        if self.host_processes > MAX_HOST_PROCESSES:
            raise ConfigError(f"host_processes must be at most {MAX_HOST_PROCESSES}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend must be one of {ATTENTION_BACKENDS}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {QUANTIZATIONS}")
        if ":" not in self.engine_factory:
            raise ConfigError("engine_factory must look like 'module:attr'")

    @property
    def model_name(self) -> str:
        """The name requests use for this model (and the lanes' key part)."""
        if self.served_model_name:
            return self.served_model_name
        if not self.model_path:
            raise ConfigError("model_path is required")
        return Path(self.model_path).name

    @property
    def admission_headroom_tokens(self) -> int:
        return self.max_num_batched_tokens if self.headroom_tokens is None else self.headroom_tokens

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments of ``LLMEngine.from_options`` (picklable, sent to the child)."""
        return {
            "dtype": self.dtype,
            "device": self.device,
            "block_size": self.block_size,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "kv_cache_tokens": self.kv_cache_tokens,
            "max_model_len": self.max_model_len,
            "enable_prefix_caching": self.enable_prefix_caching,
            "attention_backend": self.attention_backend,
            "kv_cache_dtype": self.kv_cache_dtype,
            "quantization": self.quantization,
            "shared_prefix_attention": self.shared_prefix_attention,
            "seed": self.seed,
            "tensor_parallel_size": self.tensor_parallel_size,
        }

    # --- constructors ---------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """``CHATQ_<FIELD>`` for every field (e.g. ``CHATQ_REDIS_URL``, ``CHATQ_MAX_NUM_SEQS``)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"CHATQ_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f.name, raw, _field_type(f.name))
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None
    ) -> WorkerSettings:
        """Environment first, then every option given on the command line."""
        given = {
            f.name: getattr(args, f.name)
            for f in fields(cls)
            if getattr(args, f.name, None) is not None
        }
        return cls.from_env(environ, **given)

    def with_(self, **changes: Any) -> WorkerSettings:
        return replace(self, **changes)


_TYPES: dict[str, type] = {
    "partitions": int,
    "block_size": int,
    "max_num_seqs": int,
    "max_num_batched_tokens": int,
    "kv_cache_tokens": int,
    "max_model_len": int,
    "enable_prefix_caching": bool,
    "shared_prefix_attention": bool,
    "offline": bool,
    "seed": int,
    "torch_threads": int,
    "tensor_parallel_size": int,
    "max_inflight_factor": float,
    "headroom_tokens": int,
    "aging_s": float,
    "read_block_ms": int,
    "host_processes": int,
    "max_deliveries": int,
    "grace_period_s": float,
    "heartbeat_interval_s": float,
    "reconcile_interval_s": float,
    "metrics_port": int,
}


def _field_type(name: str) -> type:
    return _TYPES.get(name, str)


def _parse(name: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        return kind(raw)
    except ValueError as err:
        raise ConfigError(f"CHATQ_{name.upper()}={raw!r} is not a valid {kind.__name__}") from err


# What each numeric option means (``chatq worker --help``); the default is added to each.
_HELP: dict[str, str] = {
    "partitions": "partitions of the queue to pull from (as many as producers use)",
    "block_size": "KV cache block size in tokens",
    "max_num_seqs": "most sequences the engine runs at once (its batch)",
    "max_num_batched_tokens": "most tokens one engine step processes (prefill chunk budget)",
    "kv_cache_tokens": "KV cache size in tokens (default: sized from free device memory)",
    "max_model_len": "longest prompt + output in tokens (default: the model's limit)",
    "seed": "engine sampling seed for requests without one",
    "torch_threads": "CPU engines: torch threads in the engine process (default: torch's)",
    "tensor_parallel_size": "shard the model over this many GPUs (cuda:N .. N+k-1)",
    "max_inflight_factor": "admitted requests at most max_num_seqs x this",
    "headroom_tokens": "cost budget above the KV cache (default: max_num_batched_tokens)",
    "aging_s": "one priority level is worth this many seconds of waiting",
    "read_block_ms": "longest blocking XREADGROUP (bounds shutdown latency)",
    "host_processes": "host processes (pull, tokenize, aggregate) sharing the engine",
    "max_deliveries": "deliveries before an entry goes to the dead-letter stream",
    "grace_period_s": "on SIGTERM, seconds running requests get to finish",
    "heartbeat_interval_s": "seconds between heartbeats",
    "reconcile_interval_s": "entries Redis says this worker holds but it does not are taken "
    "up again once idle this long (checked as often)",
    "metrics_port": "serve Prometheus metrics on this port (default: off)",
}


# On/off options (None when not given, so the environment can fill them): flag, setting,
# the value the flag sets, help.
_FLAGS = (
    ("--offline", "offline", True,
     "a hub id comes from the local Hugging Face cache only (no download)"),
    ("--no-prefix-caching", "enable_prefix_caching", False,
     "do not reuse cached KV blocks of shared prompt prefixes"),
    ("--shared-prefix-attention", "shared_prefix_attention", True,
     "attend a shared cached prefix once per group of decode sequences"),
)  # fmt: skip


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``chatq worker`` options; defaults are None so the environment can fill them."""
    d = WorkerSettings.__dataclass_fields__
    parser.add_argument(
        "--model",
        dest="model_path",
        help="checkpoint directory (config.json, safetensors, tokenizer), a .gguf file, a "
        "Hugging Face hub id (owner/name[@rev]) or the built-in 'smollm2' "
        "(SmolLM2-135M-Instruct, served as smollm2)",
    )
    parser.add_argument(
        "--redis", dest="redis_url", help=f"Redis URL (default {DEFAULT_REDIS_URL})"
    )
    parser.add_argument("--name", help="worker (consumer) name; default host-pid-random")
    parser.add_argument(
        "--served-model-name", help="model name requests use (default: the directory's name)"
    )
    parser.add_argument("--prefix", help="Redis key prefix (default chatq)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N | auto (default auto)")
    parser.add_argument("--dtype", choices=DTYPES, help="weights and activations (default auto)")
    for name, kind in _TYPES.items():
        if name in ("enable_prefix_caching", "shared_prefix_attention", "offline"):
            continue
        default = d[name].default
        shown = "" if default is None else f" (default {default})"
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help=_HELP[name] + shown)
    for flag, dest, const, text in _FLAGS:
        parser.add_argument(flag, dest=dest, action="store_const", const=const, help=text)
    parser.add_argument(
        "--attention-backend", choices=ATTENTION_BACKENDS, help="attention kernels (default auto)"
    )
    parser.add_argument(
        "--kv-cache-dtype", choices=KV_CACHE_DTYPES, help="fp8: e4m3 KV cache (default auto)"
    )
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        help="fp8: FP8 linear layers, quantized at load (fp8-lm-head: and the LM head)",
    )
    parser.add_argument(
        "--gpus",
        help="all | 0,1,...: one engine process per GPU (per group of --tensor-parallel-size "
        "GPUs), each a worker of its own in the same consumer group",
    )
    parser.add_argument("--engine-factory", help=argparse.SUPPRESS)
