"""The compose stack for real: build the images (base made by debootstrap), bring the stack
up, send chats from this machine with ``producer.ChatClient`` (producer user, Redis on
127.0.0.1) and through the gateway with the official ``openai`` client (plain and streamed),
and get answers from the CPU worker on the embedded SmolLM2; check every service
healthy; lint the worker's /metrics and the rules with the stack's own promtool; evaluate
EVERY PromQL expression of the dashboard and of the recording and alert rules in the stack's
Prometheus during the load (each must evaluate, and return data unless it reads GPU metrics:
there is no GPU here); then ``down`` cleanly.

Runs when a Docker engine and compose answer; ``CHATQ_STACK_TEST=required`` (set by
``.ci/run``) turns "no Docker" into a failure instead of a skip. Grafana's image needs a
container registry, which CI does not have: Grafana is not started here; its dashboard's
queries are what this test runs. Phase times are printed (``-s``) and written to
``$CHATQ_STACK_TIMES`` when set.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai import OpenAI

from producer import ChatClient
from workers.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]
PROJECT = "chatqci"
SERVICES = ("redis", "worker", "gateway", "webhooks", "exporter", "prometheus")  # no grafana:
# see the docstring
PRODUCER_PASSWORD = "ci-producer-secret"
# Dashboard variables as Grafana would fill them.
VARIABLES = {"$__rate_interval": "1m", "$model": ".*", "$gpu_hour_price": "2.5"}


def _compose_cmd() -> list[str] | None:
    if shutil.which("docker") is None:
        return None
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return None
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


class Stack:
    """``docker compose -p chatqci`` with this test's ports and images."""

    def __init__(self, compose: list[str]) -> None:
        self.compose = compose
        self.redis_port, self.prom_port, self.exporter_port = free_port(), free_port(), free_port()
        self.gateway_port = free_port()
        base = os.environ.get("CHATQ_BASE_IMAGE", "local/debian:bookworm")
        self.env = {
            **os.environ,
            "CHATQ_BASE_IMAGE": base, "CHATQ_DEBIAN_IMAGE": base, "CHATQ_TAG": "ci",
            "CHATQ_REDIS_PORT": str(self.redis_port),
            "CHATQ_PROMETHEUS_PORT": str(self.prom_port),
            "CHATQ_EXPORTER_PORT": str(self.exporter_port),
            "CHATQ_GATEWAY_PORT": str(self.gateway_port),
            "CHATQ_REDIS_PRODUCER_PASSWORD": PRODUCER_PASSWORD,
            "CHATQ_REDIS_GATEWAY_PASSWORD": "ci-gateway-secret",
            "CHATQ_REDIS_WEBHOOKS_PASSWORD": "ci-webhooks-secret",
            "CHATQ_REDIS_WORKER_PASSWORD": "ci-worker-secret",
            "CHATQ_REDIS_OPERATOR_PASSWORD": "ci-operator-secret",
            # one torch thread: on 2 cores shared with dockerd, Prometheus and this test,
            # a second thread only spins
            "CHATQ_WORKER_THREADS": "1",
        }  # fmt: skip
        self.times: dict[str, float] = {}

    def run(self, *args: str, timeout_s: float = 1200, check: bool = True) -> str:
        proc = subprocess.run(
            [*self.compose, "-p", PROJECT, *args], cwd=REPO, env=self.env, capture_output=True,
            text=True, timeout=timeout_s,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n"
                                 f"{proc.stderr[-4000:]}")  # fmt: skip
        return proc.stdout

    def timed(self, phase: str, started: float) -> None:
        self.times[phase] = round(time.monotonic() - started, 1)

    def container(self, service: str) -> str:
        return self.run("ps", "-q", service).strip()

    def health(self, service: str) -> str:
        out = subprocess.run(
            ["docker", "inspect", "--format", "{{.State.Health.Status}}", self.container(service)],
            capture_output=True, text=True,
        )  # fmt: skip
        return out.stdout.strip()

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "60", check=False)

    def prom(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.prom_port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    compose = _compose_cmd()
    if compose is None:
        if os.environ.get("CHATQ_STACK_TEST") == "required":
            pytest.fail("CHATQ_STACK_TEST=required but no Docker engine + compose answer")
        pytest.skip("needs a Docker engine and compose (see .ci/run)")
    s = Stack(compose)
    t0 = time.monotonic()
    subprocess.run(["bash", "scripts/stack.sh", "prepare"], cwd=REPO, env=s.env, check=True)
    s.timed("prepare (base image, wheel)", t0)
    t = time.monotonic()
    s.run("build", "redis", "prometheus", "worker")
    s.timed("build images", t)
    try:
        t = time.monotonic()
        s.run("up", "-d", *SERVICES)
        _until(lambda: all(s.health(x) == "healthy" for x in SERVICES), 300, "healthy stack", s)
        s.timed("up until healthy", t)
        yield s
    finally:
        t = time.monotonic()
        s.run("down", "-v", "--remove-orphans", timeout_s=120)
        s.timed("down", t)
        s.times["total"] = round(time.monotonic() - t0, 1)
        print(f"\nstack test phases (s): {json.dumps(s.times)}")
        if os.environ.get("CHATQ_STACK_TIMES"):
            Path(os.environ["CHATQ_STACK_TIMES"]).write_text(json.dumps(s.times, indent=1))


def _until(cond: Any, timeout_s: float, what: str, s: Stack) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{s.logs()}")
        time.sleep(1)


CHATS = [
    "Where is my order #1234?", "Can I change my delivery address?", "My parcel arrived broken.",
    "How do I return a jacket?", "Is the blue kettle in stock?", "Cancel my subscription.",
]  # fmt: skip
SYSTEM = {"role": "system", "content": "You are the shop's helpful customer-service assistant."}


async def _load(url: str, duration_s: float, users: int = 4) -> list[str]:
    """Chats for ``duration_s`` from ``users`` concurrent users, each sending its next chat
    when the last is answered; answer lengths vary, so answers (and the drain rate the
    workers measure from them) arrive spread out, not in lockstep."""
    answers: list[str] = []
    deadline = time.monotonic() + duration_s

    async def user(client: ChatClient, k: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            chat = [SYSTEM, {"role": "user", "content": CHATS[(k + n) % len(CHATS)]}]
            rid = await client.submit(chat, model="smollm2", max_tokens=6 + 5 * ((k + n) % 4))
            answers.append((await client.result(rid, timeout_s=180)).text)
            n += 1

    async with ChatClient(url) as client:
        await asyncio.gather(*(user(client, k) for k in range(users)))
    return answers


def _chat_through_the_gateway(port: int, api_key: str) -> None:
    """The official openai client against the stack's gateway with a tenant's key: one
    answer whole, one streamed; both from the worker in the stack."""
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0)
    models = [m.id for m in client.models.list().data]
    assert models == ["smollm2"], models
    messages: Any = [SYSTEM, {"role": "user", "content": CHATS[0]}]
    whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8)
    assert whole.choices[0].message.content and whole.usage and whole.usage.completion_tokens
    stream = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=8, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.strip(), "the streamed answer was empty"
    client.close()


def _expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every dashboard target and every rule, variables filled in."""
    out: list[tuple[str, str]] = []
    dash = json.loads((REPO / "deploy/grafana/chatq-dashboard.json").read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in VARIABLES.items():
                expr = expr.replace(var, value)
            out.append((f"dashboard: {panel['title']}", expr))
    rules = yaml.safe_load((REPO / "deploy/prometheus/rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                out.append((f"rule {rule['record']}", rule["expr"]))
            else:
                name = rule["alert"]
                # A quiet alert returns nothing; its full expression must evaluate, and its
                # signal (the side before the threshold) must return data.
                out.append((f"alert {name} (quiet: may be empty)", rule["expr"]))
                signal = re.match(r"^(.*\S)\s*(>|<|>=|<=|==|!=)\s*[0-9.e+-]+\s*$", rule["expr"],
                                  re.S)  # fmt: skip
                assert signal, f"alert {name}: expr is not '<signal> <op> <threshold>'"
                out.append((f"alert {name} signal", signal.group(1)))
    return out


def _may_be_empty(where: str, expr: str) -> bool:
    """GPU metrics (no GPU here) and alerts that are not firing."""
    return "chatq_gpu_" in expr or "ChatqGpu" in where or "(quiet: may be empty)" in where


def _evaluate_all(s: Stack) -> list[str]:
    """Problems with the expressions now (empty: every one evaluates and has data)."""
    problems: list[str] = []
    for where, expr in _expressions():
        try:
            reply = s.prom("/api/v1/query", query=expr)
        except urllib.error.HTTPError as err:
            problems.append(f"{where}: HTTP {err.code} {err.read()[:300]!r}: {expr}")
            continue
        if reply.get("status") != "success":
            problems.append(f"{where}: {reply}: {expr}")
        elif not reply["data"]["result"] and not _may_be_empty(where, expr):
            problems.append(f"{where}: no data: {expr}")
    return problems


@pytest.mark.timeout(2400)
def test_compose_stack_answers_chats_and_every_query_has_data(stack: Stack) -> None:
    url = f"redis://producer:{PRODUCER_PASSWORD}@127.0.0.1:{stack.redis_port}/0"
    t = time.monotonic()
    answers = asyncio.run(_load(url, 1))
    assert answers and all(a.strip() for a in answers), answers
    stack.timed("first chats answered", t)
    t = time.monotonic()
    # A tenant key made inside the stack, as an operator would (the gateway's Redis user).
    api_key = stack.run("exec", "-T", "gateway", "chatq", "keys", "create", "--tenant", "ci")
    _chat_through_the_gateway(stack.gateway_port, api_key.strip().splitlines()[-1])
    stack.timed("chats through the gateway", t)

    # Load for a while (rates need two scrapes in their window), then every expression.
    t = time.monotonic()
    problems: list[str] = ["not evaluated yet"]
    deadline = time.monotonic() + 420
    while problems and time.monotonic() < deadline:
        answers += asyncio.run(_load(url, 20))
        problems = _evaluate_all(stack)
    assert not problems, "\n".join(problems)
    stack.timed("load until every expression has data", t)

    targets = stack.prom("/api/v1/targets")["data"]["activeTargets"]
    up = {
        t["labels"]["job"]: t["health"] for t in targets if t["labels"]["job"] != "chatq-gpu-worker"
    }
    assert up == {"chatq-exporter": "up", "chatq-worker": "up", "chatq-gateway": "up"}, targets
    rules = stack.prom("/api/v1/rules")["data"]["groups"]
    bad = [r["name"] for g in rules for r in g["rules"] if r.get("health") != "ok"]
    assert not bad, f"rules not healthy in Prometheus: {bad}"
    assert all(stack.health(x) == "healthy" for x in SERVICES)
    _promtool(stack)
    print(f"\nstack: {len(answers)} chats answered, e.g. {answers[0]!r}")


def _promtool(s: Stack) -> None:
    """The stack's own promtool: rules, config, and the worker's /metrics exposition."""
    s.run("exec", "-T", "prometheus", "promtool", "check", "rules", "/etc/prometheus/rules.yml")
    metrics = s.run("exec", "-T", "worker", "python3", "-c",
                    "import urllib.request as u; print(u.urlopen("
                    "'http://127.0.0.1:9300/metrics').read().decode(), end='')")  # fmt: skip
    assert "chatq_generation_tokens_total" in metrics
    lint = subprocess.run(
        ["docker", "exec", "-i", s.container("prometheus"), "promtool", "check", "metrics"],
        input=metrics, capture_output=True, text=True,
    )  # fmt: skip
    assert lint.returncode == 0, f"promtool check metrics:\n{lint.stdout}\n{lint.stderr}"
