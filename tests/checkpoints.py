"""Tiny random Llama / Qwen2 / Qwen3 checkpoints with a real (trained) BPE tokenizer.

Built at test time with transformers configs and ``save_pretrained`` (safetensors); no hub.
The tokenizer is a byte-level BPE trained on a small built-in corpus, so any text encodes,
with ChatML special tokens and a chat template like SmolLM2's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Hello! How can I help you with your order today?",
    "My package has not arrived yet. The tracking number says it is out for delivery.",
    "I would like a refund for the broken headphones I received last week.",
    "To reset your password, open the login page and choose 'Forgot password'.",
    "Your order #12345 was shipped on Monday and should arrive within 3-5 business days.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}",
    "Thank you for contacting customer support. Is there anything else I can do?",
    "You are a helpful assistant for an online shop. Answer briefly and politely.",
]

VOCAB_SIZE = 512


def build_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def _config(arch: str, vocab_size: int, eos_id: int, **overrides: Any) -> Any:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        eos_token_id=eos_id,
        bos_token_id=None,
        pad_token_id=None,
        initializer_range=0.2,
    )
    if arch == "llama":
        common.update(tie_word_embeddings=False)
        cfg: Any = LlamaConfig(**{**common, **overrides})
    elif arch == "qwen2":
        common.update(tie_word_embeddings=True)
        cfg = Qwen2Config(**{**common, **overrides})
    elif arch == "qwen3":
        common.update(tie_word_embeddings=True, head_dim=32)
        cfg = Qwen3Config(**{**common, **overrides})
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return cfg


def build_checkpoint(
    path: Path, arch: str = "llama", *, seed: int = 0, dtype: str = "float32", **overrides: Any
) -> Path:
    """Write a tiny random ``arch`` checkpoint (config, safetensors, tokenizer) to ``path``."""
    import torch
    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    vocab_size = overrides.pop("vocab_size", VOCAB_SIZE)  # >= VOCAB_SIZE: extra rows unused
    cfg = _config(arch, vocab_size, tok.convert_tokens_to_ids("<|im_end|>"), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=getattr(torch, dtype))
    model.save_pretrained(str(path), safe_serialization=True)
    return path
