"""``chatq``'s options: every one has help text, enum values are checked, and a request for
a model nobody serves is refused at once by ``chatq enqueue``."""

from __future__ import annotations

import argparse
import re
from typing import Any

import pytest

from workers.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser, path: str = "chatq") -> list[tuple[str, Any]]:
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _parsers(sub, f"{path} {name}")
    return out


def test_every_option_has_help_text() -> None:
    """More than its default: what it does."""
    missing = [
        f"{path} {'/'.join(action.option_strings) or action.dest}"
        for path, parser in _parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        and action.help != argparse.SUPPRESS
        and not re.sub(r"\(default[^)]*\)", "", action.help or "").strip()
    ]
    assert missing == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "LOUD", "status"],
        ["worker", "--dtype", "float64"],
        ["worker", "--attention-backend", "cudnn"],
        ["worker", "--kv-cache-dtype", "int4"],
        ["worker", "--quantization", "awq"],
        ["enqueue", "--model", "m", "--priority", "urgent", "hi"],
        ["purge", "m", "--lane", "urgent"],
    ],
)
def test_bad_enum_values_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_log_level_from_the_environment_is_checked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHATQ_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit):
        main(["status"])
    assert "CHATQ_LOG_LEVEL" in capsys.readouterr().err
    monkeypatch.setenv("CHATQ_LOG_LEVEL", "debug")  # any case
    assert build_parser().parse_args(["status"]).root_log_level == "DEBUG"


def test_enqueue_refuses_a_model_nobody_serves_at_once(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHATQ_ALLOW_UNSERVED", "0")  # the default outside the test suite
    argv = ["enqueue", "--redis", redis_url, "--model", "nope", "Where is my order?"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no live worker serves model 'nope'" in err and "served now: none" in err
    assert main([*argv, "--allow-unserved", "--no-wait"]) == 0
    assert capsys.readouterr().out.strip()  # the queued request's id
