"""The harness itself: private Redis answers and is clean per test; checkpoints load."""

from __future__ import annotations

from typing import Any


async def test_redis_is_private_and_clean(redis_client: Any) -> None:
    assert await redis_client.ping()
    assert await redis_client.dbsize() == 0
    await redis_client.set("chatq:test", "1")
    info = await redis_client.info("server")
    assert int(info["redis_version"].split(".")[0]) >= 7


async def test_database_flushed_between_tests(redis_client: Any) -> None:
    assert await redis_client.get("chatq:test") is None


def test_tiny_checkpoints_load_in_transformers(tiny_checkpoint: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for arch in ("llama", "qwen2", "qwen3"):
        path = tiny_checkpoint(arch)
        assert (path / "model.safetensors").exists()
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok.apply_chat_template(
            [{"role": "user", "content": "Where is my order?"}], add_generation_prompt=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        out = model(torch.tensor([ids]))
        assert out.logits.shape == (1, len(ids), model.config.vocab_size)
        assert tok.decode(tok("Hello, refund 42!")["input_ids"]) == "Hello, refund 42!"
