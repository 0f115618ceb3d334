"""Where a half-finished streamed answer stands: read back from its result stream.

A streaming request's chunks carry the ids of the tokens generated since the previous chunk
(``Chunk.tokens``), so a worker that takes the request over (its first worker died, or lost
its entry) can continue it instead of starting again: it prefills prompt + generated tokens
(the prefix cache holds the prompt when it has seen it), generates only the remaining
``max_tokens``, and numbers its chunks on from the last one. The chunks' texts joined are
then exactly the final text, however many workers the answer passed through: the writes of
a worker that lost the entry are fenced off (CHUNKS), so what is read here, after the
claim, is what the stream keeps.

A request that asked for logprobs has them in its chunks too, one per token: the resumed
answer's final result takes those of the tokens generated before from there, and a chunk
whose logprobs do not match its tokens ends what can be resumed from, as a gap does.

A request for n > 1 answers is resumed answer by answer: each chunk names its answer
(``Chunk.choice``), each answer goes on from its own tokens.

What the chunks do not carry is the random generator of a seeded request: on a CPU engine the
continuation restarts it from the seed, so a resumed seeded answer is not the one an
uninterrupted run would have given (greedy answers are, as far as the engine's batch numerics
are). A CUDA engine's keyed draws count the resumed tokens (``num_resumed_tokens``), so there
the continuation makes the draws the uninterrupted run would have made.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from producer.contract.keys import Keys
from producer.contract.logprobs import TokenLogprob
from producer.contract.results import Chunk, decode_result
from producer.errors import ProtocolError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnswerPoint:
    """One answer's part of a resume point: its tokens, streamed text and logprobs."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class ResumePoint:
    """What a request's chunks hold: every generated token, the text streamed so far (of
    its first answer; ``others``: those of answers 1..n-1 of a request for n > 1)."""

    next_index: int  # the index of the next chunk
    token_ids: list[int]  # every token generated so far, in order
    text: str  # the chunks' deltas joined (what readers have seen)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked
    others: dict[int, AnswerPoint] = field(default_factory=dict)

    def answer(self, index: int) -> AnswerPoint:
        """Answer ``index``'s part (empty for one without chunks)."""
        if index == 0:
            return AnswerPoint(self.token_ids, self.text, self.logprobs)
        return self.others.get(index, AnswerPoint([], ""))


def resume_point(
    entries: Sequence[tuple[Any, dict[Any, Any]]], logprobs: bool = False
) -> ResumePoint | None:
    """The resume point of a result stream's entries (XRANGE's reply); None without chunks.

    Chunks are taken in stream order while their indexes run on from 0; a gap (a Redis that
    lost some) ends what can be trusted, and so does a chunk without token ids (a worker
    older than resuming wrote it), or, for a request with ``logprobs``, one without an
    entry per token: the request then starts again from its prompt."""
    chunks: dict[int, list[Chunk]] = {}  # by answer
    count = 0
    for _, fields in entries:
        try:
            entry = decode_result(fields)
        except ProtocolError as err:
            log.warning("unreadable result entry, not resuming past it: %s", err)
            break
        if not isinstance(entry, Chunk):
            break
        if entry.index != count or (entry.delta and not entry.tokens):
            break
        if logprobs and len(entry.logprobs) != len(entry.tokens):
            break
        chunks.setdefault(entry.choice, []).append(entry)
        count += 1
    if not count:
        return None
    answers = {k: _answer_point(c, logprobs) for k, c in chunks.items()}
    first = answers.pop(0, AnswerPoint([], ""))
    return ResumePoint(count, first.token_ids, first.text, first.logprobs, answers)


def _answer_point(chunks: list[Chunk], logprobs: bool) -> AnswerPoint:
    return AnswerPoint(
        [t for c in chunks for t in c.tokens],
        "".join(c.delta for c in chunks),
        [e for c in chunks for e in c.logprobs] if logprobs else [],
    )


async def read_resume_points(
    redis: Redis, keys: Keys, request_ids: Sequence[str], logprobs: Collection[str] = ()
) -> dict[str, ResumePoint]:
    """The resume point of each request that has chunks (one pipelined XRANGE each);
    ``logprobs``: the ids of those that asked for logprobs."""
    if not request_ids:
        return {}
    pipe = redis.pipeline(transaction=False)
    for request_id in request_ids:
        pipe.xrange(keys.result(request_id))
    replies = await pipe.execute()
    points = {}
    for request_id, reply in zip(request_ids, replies, strict=True):
        point = resume_point(reply or [], request_id in logprobs)
        if point is not None:
            points[request_id] = point
    return points
