"""The stack's files, checked without Docker: compose.yaml, Redis config and ACL, the
Prometheus config and rules, the Grafana dashboard, and the k8s manifests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.metric_names import exported_names, recorded_names, used_names

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _rules() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())
    return rules


def _recorded() -> set[str]:
    return {r["record"] for g in _rules()["groups"] for r in g["rules"] if "record" in r}


def _check_names(where: str, text: str) -> None:
    unknown = used_names(text) - exported_names()
    assert not unknown, f"{where} uses metrics chatq does not export: {sorted(unknown)}"
    unrecorded = recorded_names(text) - _recorded()
    assert not unrecorded, f"{where} uses recording rules that do not exist: {unrecorded}"


def test_dashboard_and_rules_use_only_exported_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana/chatq-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    for expr in exprs:
        _check_names("the dashboard", expr)
    for group in _rules()["groups"]:
        for rule in group["rules"]:
            _check_names(f"rule {rule.get('record') or rule.get('alert')}", rule["expr"])


def test_dashboard_shows_the_seed_figures_and_uses_its_variables() -> None:
    dash = json.loads((DEPLOY / "grafana/chatq-dashboard.json").read_text())
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for figure in ("qps", "latency", "error rate", "gpu utilisation", "memory bandwidth",
                   "temperature", "cost per million"):  # fmt: skip
        assert figure in titles, figure
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"model", "gpu_hour_price"}
    used = set(re.findall(r"\$([a-z_]+)", json.dumps(dash["panels"])))
    assert used - {"__rate_interval"} <= variables
    source = (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    assert uids == {"prometheus"} and "uid: prometheus" in source


def test_compose_services_are_healthchecked_local_and_ordered() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert {
        "redis", "gateway", "webhooks", "worker", "exporter", "prometheus", "grafana", "gpu-worker"
    } <= set(services)  # fmt: skip
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name}: no health check"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} not on 127.0.0.1"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, f"{name} → {dep}: {cond}"
    gpu = services["gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert any("/models/model" in v for v in gpu["volumes"]) and "CHATQ_MODEL" in str(gpu)
    assert "--gpus" in gpu["command"]
    assert "profiles" not in services["worker"]


def test_redis_config_persists_never_evicts_and_turns_the_default_user_off() -> None:
    conf = (DEPLOY / "redis/redis.conf").read_text()
    lines = {tuple(ln.split(None, 1)) for ln in conf.splitlines() if ln and ln[0] != "#"}
    assert ("appendonly", "yes") in lines and ("appendfsync", "everysec") in lines
    assert ("maxmemory-policy", "noeviction") in lines
    assert "always" in conf  # the file says what `always` would change
    acl = [ln for ln in (DEPLOY / "redis/users.acl.template").read_text().splitlines()
           if ln.startswith("user ")]  # fmt: skip
    users = {ln.split()[1]: ln for ln in acl}
    assert set(users) == {"default", "producer", "gateway", "webhooks", "worker", "operator"}
    assert " off " in users["default"] + " "
    for role in ("producer", "gateway", "webhooks", "worker", "operator"):
        assert "-@all" in users[role] and "~*" not in users[role].split(), role
    for role in ("producer", "gateway"):  # producers never write results
        assert "%R~chatq:res:*" in users[role].split(), role


def test_prometheus_scrapes_every_chatq_process() -> None:
    conf = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    assert set(jobs) == {"chatq-exporter", "chatq-worker", "chatq-gpu-worker", "chatq-gateway"}
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    assert compose["services"]["worker"]["environment"]["CHATQ_METRICS_PORT"] == "9300"
    assert jobs["chatq-worker"]["dns_sd_configs"][0]["port"] == 9300


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def test_k8s_manifests_parse_and_use_only_exported_metrics() -> None:
    docs = _manifests()
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in docs}
    assert ("Deployment", "chatq-worker") in kinds and ("Deployment", "chatq-exporter") in kinds
    deployments = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "Deployment"}
    for name, dep in deployments.items():
        spec = dep["spec"]
        assert (
            spec["selector"]["matchLabels"].items()
            <= spec["template"]["metadata"]["labels"].items()
        )
        for c in spec["template"]["spec"]["containers"]:
            ports = {p["name"] for p in c["ports"]}
            assert c["livenessProbe"]["httpGet"]["path"] == "/health", name
            assert c["readinessProbe"]["httpGet"]["path"] == "/ready", name
            assert c["readinessProbe"]["httpGet"]["port"] in ports, name
    scaled = [d for _, d in docs if d["kind"] == "ScaledObject"]
    assert len(scaled) == 1
    assert scaled[0]["spec"]["scaleTargetRef"]["name"] in deployments
    queries = [t["metadata"]["query"] for t in scaled[0]["spec"]["triggers"]]
    assert any("chatq_queue_backlog_seconds" in q for q in queries)
    for file, doc in docs:
        _check_names(f"deploy/k8s/{file}", yaml.safe_dump(doc))
