"""The reasoning split: think text apart from the answer, however the text is cut into
deltas (joined deltas equal the whole-text split)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.reasoning import ReasoningSplitter, has_think_tokens, opens_reasoning


def split(text: str, cuts: list[int], in_reasoning: bool = False) -> tuple[str, str]:
    splitter = ReasoningSplitter(in_reasoning)
    reasoning, content = "", ""
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    for a, b in itertools.pairwise(bounds):
        r, c = splitter.feed(text[a:b])
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    assert (splitter.reasoning, splitter.content) == (reasoning + r, content + c)
    return reasoning + r, content + c


@pytest.mark.parametrize(
    ("text", "in_reasoning", "expected"),
    [
        ("<think>a plan</think>\n\nThe answer.", False, ("a plan", "The answer.")),
        ("  <think>x</think>y", False, ("x", "y")),
        ("No reasoning here.", False, ("", "No reasoning here.")),
        (
            "Text, then <think>not reasoning</think>",
            False,
            ("", "Text, then <think>not reasoning</think>"),
        ),
        ("plan from the prompt</think>Answer", True, ("plan from the prompt", "Answer")),
        ("<think>cut off by max_tokens", False, ("cut off by max_tokens", "")),
        ("<thin", False, ("", "<thin")),
        ("", False, ("", "")),
    ],
)
def test_splits_reasoning_from_the_answer(
    text: str, in_reasoning: bool, expected: tuple[str, str]
) -> None:
    assert split(text, [], in_reasoning) == expected


@given(
    st.sampled_from(
        [
            "<think>step 1\nstep 2</think>\n\nFinal: 42",
            "Plain answer </think> with a tag",
            "<think></think>x",
        ]
    ),
    st.lists(st.integers(0, 64), max_size=8),
)
def test_any_cut_into_deltas_gives_the_same_parts(text: str, cuts: list[int]) -> None:
    assert split(text, cuts) == split(text, [])


def test_the_prompt_says_whether_the_answer_starts_inside_reasoning() -> None:
    assert opens_reasoning("<|User|>hi<|Assistant|><think>\n")
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_reasoning("<|im_start|>assistant\n")
    assert has_think_tokens({"<think>": 5, "</think>": 6})
    assert not has_think_tokens({"<think>": 5})
