"""``GET /metrics``: per-tenant counters in Prometheus text format.

The counters live in Redis (the ADMIT script counts every admission and refusal), so every
gateway process and replica reports the same cluster-wide totals: scrape any one of them
(summing over replicas would count each request once per replica).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily

if TYPE_CHECKING:
    from gateway.service import Gateway

_COUNTERS = {
    "requests": "requests admitted",
    "cost_tokens": "tokens admitted (prompt estimate + n x max_tokens)",
    "refused_rpm": "requests refused by the requests-per-minute limit",
    "refused_tpm": "requests refused by the tokens-per-minute limit",
    "refused_concurrency": "requests refused by the concurrency limit",
    "refused_too_large": "requests costing more than the tokens-per-minute limit",
}


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def tenant_counters(gw: Gateway) -> dict[str, dict[str, int]]:
    """Every tenant's counters, by tenant name."""
    members: Any = await gw.redis.smembers(gw.keys.tenants)  # type: ignore[misc]
    tenants = sorted(_s(m) for m in members)
    pipe = gw.redis.pipeline(transaction=False)
    for t in tenants:
        pipe.hgetall(gw.keys.tenant_stats(t))
    rows = await pipe.execute()
    return {
        t: {_s(k): int(v) for k, v in row.items()} for t, row in zip(tenants, rows, strict=True)
    }


class _Snapshot:
    def __init__(self, counters: dict[str, dict[str, int]]) -> None:
        self.counters = counters

    def collect(self) -> Any:
        for name, text in _COUNTERS.items():
            fam = CounterMetricFamily(f"chatq_gateway_tenant_{name}", text, labels=["tenant"])
            for tenant, row in self.counters.items():
                fam.add_metric([tenant], row.get(name, 0))
            yield fam


async def render_metrics(gw: Gateway) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(await tenant_counters(gw)))  # type: ignore[arg-type]
    return generate_latest(registry)
