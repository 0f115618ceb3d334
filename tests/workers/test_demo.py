"""``chatq demo`` end to end (what scripts/demo.sh runs after setup): its own private Redis,
a worker, a burst of chats, the answers and the summary table; here on the tiny checkpoint
instead of SmolLM2 (``--model``). Most of its time (tens of seconds on the shared CI machine)
is the worker's start, which is what the demo shows too. Also what it asks and shows: each
question with the facts it needs, time to first token and tokens/s."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from workers.cli import main
from workers.demo import QUESTIONS, Outcome, _chats, chat_messages


def test_demo_runs_the_whole_path_and_reports_every_request(
    tiny_checkpoint: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(tiny_checkpoint("llama"))
    rc = main(["demo", "--model", model, "--requests", "5", "--max-tokens", "4", "--show", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "private Redis at redis://" in out
    # The summary row: 5 requests, 0 errors.
    assert re.search(r"│\s*5\s*│\s*0\s*│", out), out[-3000:]
    assert not re.search(r"^error ", out, flags=re.M)  # no failed chat listed after it
    assert out.count("╭") == 2  # the two answers shown (--show 2), one panel each
    assert "TTFT p50" in out and "tok/s" in out and "first token" in out
    assert "answers ended on their own" in out


def test_every_question_comes_with_its_facts() -> None:
    chats = _chats(len(QUESTIONS) + 3)
    assert [f for _, f in chats[: len(QUESTIONS)]] == [f for _, f in QUESTIONS]  # each once
    for question, facts in chats:
        _, user = chat_messages(question, facts)
        assert user["content"].startswith(question) and facts in user["content"]
    # One system prompt for all: the prefix cache holds it once.
    assert len({chat_messages(*c)[0]["content"] for c in chats}) == 1


def test_an_answer_cut_by_max_tokens_ends_at_its_last_sentence() -> None:
    cut = Outcome("q", text="Refunds take 5-7 days. We also ship", finish_reason="length")
    assert cut.shown_text() == "Refunds take 5-7 days. [...]"
    whole = Outcome("q", text="Refunds take 5-7 days.", finish_reason="stop")
    assert whole.shown_text() == "Refunds take 5-7 days."
    timed = Outcome("q", first_token_ms=1000, total_ms=3000, completion_tokens=21)
    assert timed.decode_tps == 10.0
