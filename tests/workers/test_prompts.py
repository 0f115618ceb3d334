"""SegmentEncoder: cached pieces between added tokens give exactly the whole-string ids, with
the repo's tiny tokenizer and with SmolLM2's real one; tokenizers where that does not hold
are detected at start-up and tokenized whole."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from producer.protocol import make_envelope
from tests.checkpoints import build_tokenizer
from workers import prompts
from workers.prompts import PromptBuilder, SegmentEncoder

SYSTEM = "You are the shop's assistant. Answer briefly and politely."
_WORDS = [
    "order", "#12345", "refund", " ", "  ", "\n", "\n\n", "\t", "Where", "is", "my", "?", "!",
    "Grüße", "東京", "🙂", "ü", "—", "'s", "don't", "3-5", "0.5", "<|im_start|>", "<|im_end|>",
    "<|endoftext|>", "<|im_", "|>", "<", "user", "assistant", "system",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    local = Path(__file__).resolve().parents[2] / ".cache" / "tok-smollm2"
    try:
        if local.is_dir():
            return AutoTokenizer.from_pretrained(str(local))
        from gpu_engine.gguf import default_model_path

        return AutoTokenizer.from_pretrained(str(default_model_path()))
    except Exception as err:  # no embedded model on this machine
        pytest.skip(f"SmolLM2's tokenizer is not available: {err}")


def _random_text(rng: random.Random, max_words: int = 30) -> str:
    return "".join(
        rng.choice(_WORDS) + rng.choice(["", " ", ""]) for _ in range(rng.randint(0, max_words))
    )


def _random_chat(rng: random.Random) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.7 else []
    for i in range(rng.randint(1, 4)):
        content = _random_text(rng) or "x"
        turns.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
    if turns[-1]["role"] == "assistant":
        turns.append({"role": "user", "content": "and?"})
    return turns


def _whole(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    backend = tokenizer.backend_tokenizer
    return [list(backend.encode(t, add_special_tokens=False).ids) for t in texts]


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_cached_pieces_equal_whole_string_tokenization(
    which: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    builder = PromptBuilder(tokenizer)
    assert builder.segments is not None and builder.segments.exact
    assert builder.flat_render  # the rendering checked below is the fast one
    rng = random.Random(1234)
    chats = [_random_chat(rng) for _ in range(300)]
    texts = [builder.render_messages(c) for c in chats]
    raw = [_random_text(rng, 60) for _ in range(300)]  # added tokens anywhere, odd spacing
    want = _whole(tokenizer, texts + raw)
    for start in range(0, len(want), 64):  # batches, as intake sends them; the cache fills
        assert builder.encode((texts + raw)[start : start + 64]) == want[start : start + 64]
    assert builder.encode(texts + raw) == want  # again, now mostly from the cache
    assert builder.segments.hits > len(texts)  # the shared system prompt hit the cache
    # And through the whole intake path: envelopes → ids, as apply_chat_template gives them.
    envs = [make_envelope(c, model="m") for c in chats[:50]]
    for chat, ids in zip(chats[:50], builder.batch(envs), strict=True):
        expected = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert ids == list(expected)
        assert builder.render_messages(chat) == tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=False
        )


def test_cache_is_bounded(tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompts, "CACHE_MAX_PIECES", 50)
    monkeypatch.setattr(prompts, "CACHE_MAX_CHARS", 2_000)
    encoder = SegmentEncoder(tiny_tokenizer.backend_tokenizer)
    rng = random.Random(7)
    texts = [f"<|im_start|>user\n{_random_text(rng)} {i}<|im_end|>" for i in range(400)]
    for start in range(0, 400, 40):
        assert encoder.encode(texts[start : start + 40]) == _whole(
            tiny_tokenizer, texts[start : start + 40]
        )
        assert len(encoder._cache) <= 50 and encoder._cached_chars <= 2_000
    assert encoder._cached_chars == sum(len(p) for p in encoder._cache)


def _with_stripping_token(path: Path) -> Any:
    from tokenizers import AddedToken

    tok = build_tokenizer(path)
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken("<|tool|>", rstrip=True, normalized=False)]}
    )
    return tok


def _metaspace_first(path: Path) -> Any:
    """A SentencePiece-style tokenizer whose prefix '▁' goes to the first piece only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False
    )
    tok.train_from_iterator(["hello world user assistant order refund"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
    )
    return fast


@pytest.mark.parametrize("make", [_with_stripping_token, _metaspace_first])
def test_tokenizers_whose_pieces_interact_are_tokenized_whole(make: Any, tmp_path: Path) -> None:
    tokenizer = make(tmp_path)
    builder = PromptBuilder(tokenizer)
    assert builder.segments is not None and not builder.segments.exact
    rng = random.Random(3)
    texts = [builder.render_messages(_random_chat(rng)) for _ in range(50)]
    texts += ["<|im_start|>user hello<|im_end|>", "a <|tool|>  b", "<|tool|>\n x"]
    assert builder.encode(texts) == _whole(tokenizer, texts)
    assert builder.segments.hits == 0
