"""Gateway and webhook settings: environment, CLI, validation, round trip to env."""

from __future__ import annotations

import argparse

import pytest

from gateway.errors import ConfigError
from gateway.settings import GatewaySettings, WebhookSettings, add_arguments


def test_env_and_cli() -> None:
    env = {
        "CHATQ_PORT": "9001",
        "CHATQ_ALLOW_ANONYMOUS": "true",
        "CHATQ_WEBHOOK_ALLOW_HOSTS": "a.example, .b.example",
    }
    s = GatewaySettings.from_env(env)
    assert s.port == 9001 and s.allow_anonymous
    assert s.callback_policy.allow_hosts == ("a.example", ".b.example")
    assert GatewaySettings.from_env(s.to_env()) == s
    parser = argparse.ArgumentParser()
    add_arguments(parser, GatewaySettings)
    args = parser.parse_args(["--workers", "4", "--redis", "redis://h:1/0", "--allow-anonymous"])
    cli = GatewaySettings.from_args(args)
    assert (cli.workers, cli.redis_url, cli.allow_anonymous) == (4, "redis://h:1/0", True)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"CHATQ_PORT": "x"}, "port"),
        ({"CHATQ_WORKERS": "0"}, "workers"),
        ({"CHATQ_ALLOW_ANONYMOUS": "maybe"}, "allow_anonymous"),
        ({"CHATQ_REDIS_URL": "http://x"}, "redis_url"),
        ({"CHATQ_REDIS_URL": "redis+cluster://h:7000,h:7001"}, "redis_url"),
        ({"CHATQ_REQUEST_TIMEOUT_S": "0"}, "request_timeout_s"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError) as err:
        GatewaySettings.from_env(env)
    assert err.value.param == name


def test_webhook_settings() -> None:
    s = WebhookSettings.from_env({"CHATQ_WEBHOOK_BACKOFF_S": "0.5", "CHATQ_BURST": "1"})
    assert s.webhook_backoff_s == 0.5 and s.burst
    with pytest.raises(ConfigError):
        WebhookSettings.from_env({"CHATQ_WEBHOOK_CONCURRENCY": "0"})
    with pytest.raises(ConfigError, match="not a cluster") as err:
        WebhookSettings.from_env({"CHATQ_REDIS_URL": "redis+cluster://h:7000"})
    assert err.value.param == "redis_url"
