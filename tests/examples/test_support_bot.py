"""examples/support_bot: the shop's tools on SQLite, the bot's turns through a real gateway
and worker, and the chat page in a real browser (Debian's chromium, headless, driven by
playwright; a screenshot path is printed for CI's artifacts).

The workers serve scripted checkpoints (``testkit.checkpoints.build_scripted_checkpoint``):
the answer text and the escalation call are the script's, while the order lookup is the
bot's forced tool call, which constrained decoding makes valid (its order id one of those
the customer wrote).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.support_bot.shop import Shop
from testkit.checkpoints import build_scripted_checkpoint
from tests.gateway.conftest import GatewayProcess, create_key
from tests.workers.conftest import REPO, ThreadWorker, tiny_settings
from workers.redis_server import RedisServer, free_port

pytestmark = pytest.mark.timeout(300)

ANSWER = ["Good news:", " your order", " is on its way", " and arrives soon."]
ESCALATE = ["<tool_call>", '\n{"name": "escalate", "arguments": {"summary": "refund"}}\n',
            "</tool_call>"]  # fmt: skip
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_shop_looks_orders_up_and_starts_returns() -> None:
    shop = Shop()
    order = json.loads(shop.run("lookup_order", '{"order_id": "NW-1001"}'))
    assert order["status"] == "shipped" and order["return_started"] is False
    refused = json.loads(shop.run("start_return", '{"order_id": "NW-1001", "reason": "x"}'))
    assert "only delivered orders" in refused["error"]
    started = json.loads(shop.run("start_return", '{"order_id": "NW-1002", "reason": "size"}'))
    assert started["return"] == "started"
    assert json.loads(shop.run("lookup_order", '{"order_id": "NW-1002"}'))["return_started"]
    assert "no order" in json.loads(shop.run("lookup_order", '{"order_id": "NW-9999"}'))["error"]
    assert "not JSON" in json.loads(shop.run("lookup_order", "{"))["error"]
    assert "missing" in json.loads(shop.run("start_return", "{}"))["error"]
    shop.close()


@contextlib.contextmanager
def bot_process(gateway: GatewayProcess, key: str, model: str, log: Path) -> Iterator[str]:
    """``python -m examples.support_bot --gateway ...`` (the one command, against a gateway)."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "examples.support_bot", "--gateway", gateway.url,
             "--api-key", key, "--model", model, "--port", str(port)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log.read_text()
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/", timeout=1).status_code == 200:
                        break
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.wait(15)


@pytest.fixture(scope="module")
def stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Any]]:
    """Two scripted workers (an answer; an escalation), a gateway, a key; ``bot(model)``
    starts the bot against them."""
    url = redis_server.url
    logs = tmp_path_factory.mktemp("bot-logs")
    with contextlib.ExitStack() as stack:
        for model, script in (("bot-answer", ANSWER), ("bot-escalate", ESCALATE)):
            ckpt = build_scripted_checkpoint(tmp_path_factory.mktemp(model), script)
            settings = tiny_settings(url, ckpt, name=f"w-{model}", served_model_name=model)
            stack.callback(ThreadWorker(settings).start().stop)
        key = create_key(url, "support-bot")  # before the gateway, which needs a key
        gateway = GatewayProcess(url, logs / "gateway.log")
        stack.callback(gateway.stop)
        gateway.wait_ready()

        def bot(model: str) -> str:
            return stack.enter_context(bot_process(gateway, key, model, logs / f"{model}.log"))

        yield bot


def _turn(url: str, text: str) -> list[tuple[str, dict[str, Any]]]:
    body = {"messages": [{"role": "user", "content": text}]}
    events = []
    with httpx.stream("POST", url + "/api/chat", json=body, timeout=120) as response:
        assert response.status_code == 200
        for block in response.read().decode().split("\n\n"):
            if block.strip():
                kind, data = block.split("\n", 1)
                events.append((kind.removeprefix("event: "), json.loads(data[6:])))
    return events


def test_an_order_number_is_looked_up_then_answered(stack: Callable[[str], str]) -> None:
    url = stack("bot-answer")
    events = _turn(url, "Hi! Where is my order NW-1001?")
    tools = [d for k, d in events if k == "tool"]
    assert [t["name"] for t in tools] == ["lookup_order"]
    assert json.loads(tools[0]["arguments"]) == {"order_id": "NW-1001"}
    assert json.loads(tools[0]["result"])["status"] == "shipped"
    assert "".join(d["delta"] for k, d in events if k == "text") == "".join(ANSWER)
    assert events[-1][0] == "done"
    bad = httpx.post(url + "/api/chat", json={"messages": [{"role": "robot", "content": "x"}]})
    assert bad.status_code == 400


def test_the_model_calling_escalate_hands_over_to_a_person(stack: Callable[[str], str]) -> None:
    events = _turn(stack("bot-escalate"), "I want to talk to a person about a refund.")
    assert [k for k, _ in events] == ["tool", "handover"]
    assert events[1][1] == {"handed_over": True, "summary": "refund"}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_chat_page_in_a_browser(stack: Callable[[str], str], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url = stack("bot-answer")
    # CI keeps what lands in CHATQ_ARTIFACTS (the path is printed below, for its log).
    shot = Path(os.environ.get("CHATQ_ARTIFACTS", tmp_path)) / "support_bot.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#question", "Where is my order NW-1001?")
        page.press("#question", "Enter")
        page.wait_for_selector(".assistant[data-state=done]", timeout=120_000)
        answer = page.locator(".assistant").first
        assert answer.text_content() == "".join(ANSWER)
        assert int(answer.get_attribute("data-deltas") or 0) >= 1  # streamed in as deltas
        assert "lookup_order" in (page.locator(".tool").first.text_content() or "")
        # The conversation goes on: the page sends the earlier turns with the next one.
        page.fill("#question", "Thanks!")
        page.press("#question", "Enter")
        page.wait_for_function(
            "document.querySelectorAll('.assistant[data-state=done]').length == 2"
        )
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    print(f"support bot screenshot: {shot}")
    assert shot.stat().st_size > 0
