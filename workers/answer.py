"""One answer's parts: reasoning, answer text and tool calls, split from the model's text as
it streams (:mod:`workers.reasoning` first, then :mod:`workers.tool_calls` on what is not
reasoning). Built only for requests that need it; a plain answer is its text alone."""

from __future__ import annotations

from dataclasses import dataclass, field

from producer.contract.tools import ToolCall
from workers.reasoning import ReasoningSplitter
from workers.tool_calls import ToolCallParser, ToolFormat, make_parser


@dataclass(frozen=True)
class AnswerSpec:
    """How to split one request's answer: the reasoning split (and whether the prompt left
    it open), the tool-call format and the tools the request offers."""

    reasoning: bool = False
    in_reasoning: bool = False
    tool_format: ToolFormat | None = None
    tool_names: frozenset[str] = frozenset()
    # A grammar every answer must follow (a forced tool call), for constrained decoding.
    grammar: str | None = None

    @property
    def needed(self) -> bool:
        return self.reasoning or self.tool_format is not None


@dataclass
class Parts:
    """Deltas (or totals) of an answer's parts."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def add(self, other: Parts) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls


class AnswerParser:
    """Splits one answer into :class:`Parts` as its text streams; ``total`` is the sum."""

    def __init__(self, spec: AnswerSpec) -> None:
        self._reasoning = ReasoningSplitter(spec.in_reasoning) if spec.reasoning else None
        self._tools: ToolCallParser | None = None
        if spec.tool_format is not None:
            self._tools = make_parser(spec.tool_format, spec.tool_names)
        self.total = Parts()

    def feed(self, text: str) -> Parts:
        """Parts of ``text`` now safe to emit (a tag or call still forming is held back)."""
        if self._reasoning is not None:
            reasoning, content = self._reasoning.feed(text)
        else:
            reasoning, content = "", text
        return self._add(reasoning, content, final=False)

    def finish(self) -> Parts:
        """The end of the answer: whatever was held back, as it stands."""
        reasoning, content = self._reasoning.finish() if self._reasoning else ("", "")
        return self._add(reasoning, content, final=True)

    def _add(self, reasoning: str, content: str, *, final: bool) -> Parts:
        calls: list[ToolCall] = []
        if self._tools is not None:
            content, calls = self._tools.feed(content) if content else ("", [])
            if final:
                tail, more = self._tools.finish()
                content += tail
                calls += more
        parts = Parts(content, reasoning, calls)
        self.total.add(parts)
        return parts
