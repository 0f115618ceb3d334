"""Where a worker's model comes from: the built-in ``smollm2`` name, checkpoint directories
(checked, with what is missing named, before anything loads), ``.gguf`` files and hub ids
from the local Hugging Face cache (no test downloads)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from huggingface_hub import constants

from producer.client import ChatClient
from tests.workers.conftest import ThreadWorker, tiny_settings
from workers.cli import main
from workers.errors import ConfigError
from workers.model_source import check_model_dir, resolve_model, with_model_dir
from workers.redis_server import RedisServer
from workers.settings import WorkerSettings

pytestmark = pytest.mark.timeout(180)
REPO_ID = "chatq-test/tiny-llama"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Callable[..., Path]
) -> Path:
    """A Hugging Face cache holding REPO_ID (refs/main → one snapshot), and no endpoint that
    answers (a connection to it is refused at once)."""
    root = tmp_path / "hub"
    repo = root / ("models--" + REPO_ID.replace("/", "--"))
    shutil.copytree(tiny_checkpoint("llama"), repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return repo / "snapshots" / SNAPSHOT


def test_a_directory_is_used_as_it_is(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    ckpt = tiny_checkpoint("llama")
    assert resolve_model(str(ckpt)) == ckpt
    with pytest.raises(ConfigError, match=r"without config\.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"not a \.gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))
    for missing in (str(tmp_path / "nowhere"), "./model.gguf", "not a model"):
        with pytest.raises(ConfigError, match="not found"):
            resolve_model(missing)


def test_a_cached_hub_id_resolves_offline_and_when_the_hub_is_unreachable(
    hub_cache: Path,
) -> None:
    assert resolve_model(REPO_ID, offline=True) == hub_cache
    assert resolve_model(f"{REPO_ID}@main", offline=True) == hub_cache
    # Online, but nothing answers: the cached copy is used.
    assert resolve_model(REPO_ID, offline=False) == hub_cache


def test_a_hub_id_that_is_not_cached_is_refused_saying_so(hub_cache: Path) -> None:
    for offline, why in ((True, "the worker is offline"), (False, "cannot be reached")):
        with pytest.raises(ConfigError) as info:
            resolve_model("chatq-test/not-downloaded", offline=offline)
        message = str(info.value)
        assert "'chatq-test/not-downloaded' is not in the Hugging Face cache" in message
        assert why in message and "huggingface-cli download chatq-test/not-downloaded" in message


def test_the_embedded_gguf_file_resolves_to_the_demo_s_directory() -> None:
    """Converted once per machine (~20 s the first time), as the demo and GGUF tests do."""
    pytest.importorskip("gguf")
    from gpu_engine.errors import EngineError
    from gpu_engine.gguf import default_gguf_file, default_model_path

    try:
        gguf_file = default_gguf_file()
    except EngineError as err:
        pytest.skip(str(err))
    assert resolve_model(str(gguf_file)) == default_model_path()


def test_a_worker_serves_a_hub_id_from_the_cache(
    hub_cache: Path, redis_server: RedisServer
) -> None:
    settings = tiny_settings(redis_server.url, Path("unused"), name="hub-w", served_model_name="")
    settings = settings.with_(model_path=REPO_ID, offline=True)
    resolved = with_model_dir(settings)
    assert resolved.model_path == str(hub_cache)
    assert resolved.model_name == "tiny-llama"  # the hub id's name part
    handle = ThreadWorker(settings).start()
    try:

        async def ask() -> str:
            async with ChatClient(redis_url=redis_server.url) as client:
                result = await client.chat(
                    [{"role": "user", "content": "hi"}], model="tiny-llama", max_tokens=3
                )
                return result.finish_reason

        import asyncio

        assert asyncio.run(ask()) in ("stop", "length")
    finally:
        handle.stop()


def test_smollm2_is_the_embedded_model_served_as_smollm2() -> None:
    settings = with_model_dir(WorkerSettings(model_path="smollm2"))
    assert settings.model_name == "smollm2"
    check_model_dir(settings)  # a complete checkpoint: config, tokenizer, weights
    assert (Path(settings.model_path) / "config.json").is_file()
    renamed = with_model_dir(WorkerSettings(model_path="smollm2", served_model_name="small"))
    assert renamed.model_name == "small" and renamed.model_path == settings.model_path
    # A path that does not exist is neither a built-in name nor a hub id.
    with pytest.raises(ConfigError, match="not found"):
        with_model_dir(WorkerSettings(model_path="/models/x"))


def test_missing_pieces_are_named(tmp_path: Path, tiny_checkpoint: Callable[..., Path]) -> None:
    def error(path: Path | str) -> str:
        with pytest.raises(ConfigError) as info:
            check_model_dir(WorkerSettings(model_path=str(path)))
        return str(info.value)

    assert "model directory not found" in error(tmp_path / "nope") and "smollm2" in error("x")
    (tmp_path / "file.bin").write_bytes(b"x")
    assert "must resolve to a checkpoint directory" in error(tmp_path / "file.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    message = error(empty)
    assert "no config.json" in message and "tokenizer" in message and "safetensors" in message
    partial = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint("llama"), partial)
    for weights in partial.glob("*.safetensors"):
        weights.unlink()
    message = error(partial)
    assert "safetensors" in message and "config.json" not in message
    with pytest.raises(ConfigError, match="--model is required"):
        check_model_dir(WorkerSettings())


def test_worker_command_fails_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["worker", "--model", str(tmp_path), "--redis", "redis://localhost:1/0"]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and str(tmp_path) in err
    # The check comes first: Redis (port 1 refuses connections) was never reached.
    assert "Redis" not in err
