"""Chat template + tokenizer: messages → prompt token ids, a batch at a time.

Runs in intake's tokenizer thread, never in the engine's loop. The template is rendered with
the tokenizer's own compiled Jinja template (what ``apply_chat_template`` does inside, minus
its per-call overhead) when that gives byte-identical text on a probe conversation, else
with ``apply_chat_template``; the texts are then encoded in one ``encode_batch`` call of the
Rust tokenizer, which releases the GIL while it works.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from producer.protocol import Envelope

log = logging.getLogger(__name__)

CHATML_FALLBACK = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_PROBE = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Where is my order #12345?"},
    {"role": "assistant", "content": "It ships today."},
    {"role": "user", "content": "Thanks — and a refund? ✓"},
]


class PromptBuilder:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            log.warning("the tokenizer has no chat template; using ChatML")
            tokenizer.chat_template = CHATML_FALLBACK
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if hasattr(backend, "encode_batch") else None
        self._template = self._compiled_template()

    def _compiled_template(self) -> Any:
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            template = _compile_jinja_template(self.tokenizer.chat_template)
            fast = template.render(
                messages=_PROBE, add_generation_prompt=True, **self.tokenizer.special_tokens_map
            )
        except Exception:  # a private helper that moved, or a template needing more context
            return None
        slow = self.tokenizer.apply_chat_template(
            _PROBE, tokenize=False, add_generation_prompt=True
        )
        return template if fast == slow else None

    def render(self, env: Envelope) -> str:
        messages = [{"role": m.role, "content": m.content} for m in env.messages]
        if self._template is not None:
            text: str = self._template.render(
                messages=messages, add_generation_prompt=True, **self.tokenizer.special_tokens_map
            )
            return text
        rendered: str = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return rendered

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._backend is not None:
            return [
                list(e.ids) for e in self._backend.encode_batch(texts, add_special_tokens=False)
            ]
        return [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]

    def batch(self, envs: Sequence[Envelope]) -> list[list[int] | Exception]:
        """Token ids per envelope, or the exception its template raised (role order...)."""
        texts: list[str | Exception] = []
        for env in envs:
            try:
                texts.append(self.render(env))
            except Exception as err:
                texts.append(err)
        ok = [t for t in texts if isinstance(t, str)]
        encoded = iter(self.encode(ok)) if ok else iter(())
        return [t if isinstance(t, Exception) else next(encoded) for t in texts]
