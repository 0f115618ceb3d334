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

# Written for these fixtures (not copied from a model): templates that render tools the way
# the two supported tool-call formats expect, so tests cover both renderers and parsers.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "Tools you may call:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n"
    'Call one as <tool_call>{"name": ..., "arguments": {...}}</tool_call>'
    "<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{% elif message.role == 'assistant' and message.tool_calls %}"
    "<|im_start|>assistant\n{{ message.content }}"
    "{% for call in message.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": '
    "{{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif not (loop.first and message.role == 'system') %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
LLAMA3_JSON_TEMPLATE = (
    "{% if tools %}<|start|>system\nAnswer with a JSON call "
    '{"name": function name, "parameters": arguments} of one of:\n'
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|eot|>{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'tool' %}<|start|>ipython\n{{ message.content }}<|eot|>"
    "{% elif message.tool_calls %}<|start|>assistant\n<|python_tag|>"
    "{% for call in message.tool_calls %}"
    '{"name": "{{ call.function.name }}", "parameters": '
    "{{ call.function.arguments | tojson }}}{% if not loop.last %}; {% endif %}"
    "{% endfor %}<|eot|>"
    "{% else %}<|start|>{{ message.role }}\n{{ message.content }}<|eot|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
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


def build_tokenizer(
    path: Path, template: str = CHATML_TEMPLATE, added_tokens: tuple[str, ...] = ()
) -> Any:
    """The trained BPE tokenizer, saved to ``path`` with ``template``; ``added_tokens``
    become non-special added tokens (kept in decoded text, as ``<think>`` is in Qwen3)."""
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
    if added_tokens:
        from tokenizers import AddedToken

        fast.add_tokens([AddedToken(t, normalized=False, special=False) for t in added_tokens])
    fast.chat_template = template
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


THINK_TOKENS = ("<think>", "</think>")
SCRIPT_MARGIN = 10.0  # logit of the scripted next token (all others: 0)


def build_scripted_checkpoint(
    path: Path,
    script: list[str],
    *,
    template: str = HERMES_TEMPLATE,
    after: tuple[str, ...] = ("<|im_start|>assistant\n", "</think>\n\n"),
) -> Path:
    """A tiny Llama checkpoint that answers every prompt ending in one of ``after`` with
    the pieces of ``script`` (each an added token of its tokenizer, all distinct), then
    ``<|im_end|>``: greedy decoding reproduces the script exactly.

    Its layers' output projections are zero, so the last hidden state is the current
    token's embedding; the embeddings of the tokens involved are orthonormal, and the
    output row of each scripted token is the embedding of the token before it. The model is
    real (the engine runs every layer), only its weights are chosen."""
    import torch
    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    added = tuple(dict.fromkeys((*THINK_TOKENS, *script)))
    tok = build_tokenizer(path, template, added)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = [tok.convert_tokens_to_ids(piece) for piece in script]
    if len(set(ids)) != len(ids):
        raise ValueError("script pieces must be distinct")
    nxt = {tok.encode(a, add_special_tokens=False)[-1]: ids[0] for a in after}
    nxt.update(zip(ids, [*ids[1:], eos], strict=True))
    cfg = _config("llama", len(tok), eos, num_hidden_layers=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        tokens = sorted(set(nxt) | set(nxt.values()))
        basis, _ = torch.linalg.qr(torch.randn(cfg.hidden_size, cfg.hidden_size))
        emb = model.model.embed_tokens.weight
        for j, t in enumerate(tokens):
            emb[t] = basis[:, j]
        head = model.lm_head.weight
        head.zero_()
        for prev, t in nxt.items():
            head[t] += SCRIPT_MARGIN * emb[prev]
    model.save_pretrained(str(path), safe_serialization=True)
    return path
