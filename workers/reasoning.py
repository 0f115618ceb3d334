"""The reasoning split: ``<think>…</think>`` text goes to ``reasoning_content``, the rest is
the answer.

Reasoning models (DeepSeek-R1-Distill, Qwen3) write their reasoning between think tags
before the answer. Some templates open the tag in the prompt (the generation prompt ends
with ``<think>\\n``), so the answer then starts inside the reasoning with no opening tag:
:func:`opens_reasoning` reads that off the rendered prompt. The split is made on text as it
streams: a tag cut across two deltas is held back until it is whole, so joined deltas equal
the final parts.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def has_think_tokens(vocab: dict[str, int]) -> bool:
    """True when the tokenizer knows both think tags (the model was trained with them)."""
    return THINK_START in vocab and THINK_END in vocab


def opens_reasoning(prompt: str) -> bool:
    """True when the prompt leaves a think tag open: the answer begins inside reasoning."""
    start = prompt.rfind(THINK_START)
    return start >= 0 and prompt.find(THINK_END, start) < 0


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (0: none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Splits one answer's text into (reasoning, content) deltas as it streams.

    Reasoning is recognised only at the start of the answer (leading whitespace aside), or
    from the first character when the prompt opened it; a think tag later in the answer is
    answer text. The whitespace after ``</think>`` is dropped from the content."""

    def __init__(self, in_reasoning: bool) -> None:
        self._state = "reasoning" if in_reasoning else "start"
        self._pending = ""  # text held back: a possible tag, or leading whitespace
        self.reasoning = ""  # all reasoning so far
        self.content = ""  # all content so far

    def feed(self, text: str) -> tuple[str, str]:
        """Add answer text; returns the (reasoning, content) deltas now safe to emit."""
        text = self._pending + text
        self._pending = ""
        reasoning, content = "", ""
        while text:
            if self._state == "start":
                stripped = text.lstrip()
                if not stripped or THINK_START.startswith(stripped):
                    self._pending = text  # whitespace, or a think tag still forming
                    break
                if stripped.startswith(THINK_START):
                    self._state = "reasoning"
                    text = stripped[len(THINK_START) :]
                    continue
                self._state = "content"
            if self._state == "reasoning":
                end = text.find(THINK_END)
                if end < 0:
                    keep = _partial_tag(text, THINK_END)
                    reasoning += text[: len(text) - keep]
                    self._pending = text[len(text) - keep :]
                    break
                reasoning += text[:end]
                self._state = "after"
                text = text[end + len(THINK_END) :]
                continue
            if self._state == "after":
                text = text.lstrip()
                if not text:
                    break
                self._state = "content"
            content += text
            break
        self.reasoning += reasoning
        self.content += content
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The end of the answer: text held back is what it is (a tag never completed)."""
        pending, self._pending = self._pending, ""
        if self._state == "reasoning":
            self.reasoning += pending
            return pending, ""
        self.content += pending
        return "", pending
