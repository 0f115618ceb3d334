"""Figures, table and plot for bench/spike.py."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

Figures = dict[str, Any]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def summarize(
    run: dict[str, Any], alone: dict[str, Any], args: Any, capacity_rps: float
) -> Figures:
    recs = [r for r in run["records"] if "error" not in r]
    calm = [r for r in recs if r["phase"] == "calm"]
    burst = [r for r in recs if r["phase"] == "burst"]
    samples = run["samples"]
    burst_start = run["calm_s"]
    busy = [s["t_s"] for s in samples if s["t_s"] > burst_start and s["queued"] > 0]
    drained_at = max(busy) if busy else burst_start
    window = (burst_start + 2.0, drained_at)
    in_window = [r for r in recs if window[0] <= r["done_s"] <= window[1]]
    span = max(window[1] - window[0], 1e-9)
    sat_tok_s = sum(r["tokens"] for r in in_window) / span if in_window else float("nan")
    burst_end = burst_start + run["burst_s"]

    def util_in(key: str, start: float, end: float) -> list[float]:
        return [s[key] for s in samples if key in s and start <= s["t_s"] <= end]

    util = util_in("gpu_util", *window)
    # NVML's own samples (several a second) averaged per reading: the single current value
    # read once a second swings by tens of points from one second to the next while the
    # throughput holds, so the mean over the window is the figure, and this one checks it.
    util_avg = util_in("gpu_util_avg", *window)
    util_burst = util_in("gpu_util", window[0], burst_end)
    util_avg_burst = util_in("gpu_util_avg", window[0], burst_end)
    prompt = sum(r["prompt_tokens"] for r in recs)
    cached = sum(r["cached_tokens"] for r in recs)
    added_calm = [r["e2e_ms"] - r["engine_ms"] for r in calm if r.get("engine_ms")]
    counts = run["counts"]
    submitted = counts["submitted"]
    lost = submitted - len(run["records"])
    f: Figures = {
        "capacity_req_s": capacity_rps,
        "engine_alone_tok_s": alone["tok_s"],
        # Both saturated: the engine alone while requests still waited for a slot, the queue
        # from 2 s into the burst until the backlog was empty.
        "engine_alone_saturated_tok_s": alone.get("tok_s_saturated", alone["tok_s"]),
        "queue_saturated_tok_s": sat_tok_s,
        "queue_over_engine": sat_tok_s / alone.get("tok_s_saturated", alone["tok_s"]),
        "ttft_ms": {
            ph: (pct([r["ttft_ms"] for r in rs], 50), pct([r["ttft_ms"] for r in rs], 99))
            for ph, rs in (("calm", calm), ("burst", burst))
        },
        "e2e_ms": {
            ph: (pct([r["e2e_ms"] for r in rs], 50), pct([r["e2e_ms"] for r in rs], 99))
            for ph, rs in (("calm", calm), ("burst", burst))
        },
        "queue_added_calm_ms": (pct(added_calm, 50), pct(added_calm, 99)),
        "submitted": submitted,
        "completed": len(recs),
        "lost": lost,
        "duplicated": counts["duplicates"],
        "errored": counts["errors"],
        "queue_full_retries": counts["queue_full"],
        "drain_after_burst_s": max(0.0, drained_at - burst_end),
        "peak_backlog_requests": max((s["queued"] for s in samples), default=0),
        "peak_backlog_tokens": max((s["backlog_tokens"] for s in samples), default=0),
        "prefix_hit_rate": cached / prompt if prompt else float("nan"),
        "ttft_prefix_hit_ms": statistics.median(alone["ttft_hit_ms"]),
        "ttft_prefix_miss_ms": statistics.median(alone["ttft_miss_ms"]),
        "gpu_util_burst_mean": _mean(util),
        "gpu_util_burst_min": min(util) if util else float("nan"),
        "gpu_util_burst_median": statistics.median(util) if util else float("nan"),
        "gpu_util_burst_only_mean": _mean(util_burst),
        "gpu_util_avg_mean": _mean(util_avg),
        "gpu_util_avg_burst_only_mean": _mean(util_avg_burst),
    }
    t = f["ttft_ms"]
    e = f["e2e_ms"]
    f["table"] = [
        "| figure | value |",
        "|---|---|",
        f"| engine alone ({alone['requests']} of the same requests, all at once) | "
        f"{f['engine_alone_tok_s']:,.0f} tok/s, {capacity_rps:.1f} req/s |",
        f"| engine alone, saturated (until the last request got a slot) | "
        f"{f['engine_alone_saturated_tok_s']:,.0f} tok/s |",
        f"| through the queue, saturated | {sat_tok_s:,.0f} tok/s |",
        f"| queue ÷ engine alone | {f['queue_over_engine']:.1%} |",
        f"| TTFT p50 / p99, calm | {t['calm'][0]:.0f} / {t['calm'][1]:.0f} ms |",
        f"| TTFT p50 / p99, burst | {t['burst'][0]:.0f} / {t['burst'][1]:.0f} ms |",
        f"| end-to-end p50 / p99, calm | {e['calm'][0]:.0f} / {e['calm'][1]:.0f} ms |",
        f"| end-to-end p50 / p99, burst | {e['burst'][0]:.0f} / {e['burst'][1]:.0f} ms |",
        f"| latency the queue adds at calm, p50 / p99 | {f['queue_added_calm_ms'][0]:.2f} / "
        f"{f['queue_added_calm_ms'][1]:.2f} ms |",
        f"| requests submitted / completed | {submitted} / {len(recs)} |",
        f"| lost / duplicated / errored | {lost} / {counts['duplicates']} / {counts['errors']} |",
        f"| peak backlog | {f['peak_backlog_requests']} requests, "
        f"{f['peak_backlog_tokens']:,} tokens |",
        f"| time to drain after the burst | {f['drain_after_burst_s']:.1f} s |",
        f"| prefix-cache hit rate (prompt tokens) | {f['prefix_hit_rate']:.1%} |",
        f"| TTFT one request, prefix hit / miss | {f['ttft_prefix_hit_ms']:.1f} / "
        f"{f['ttft_prefix_miss_ms']:.1f} ms |",
        f"| GPU utilisation during burst+drain, mean (min) | {f['gpu_util_burst_mean']:.1f}% "
        f"({f['gpu_util_burst_min']:.0f}%) |",
        f"| GPU utilisation during burst+drain, median | {f['gpu_util_burst_median']:.0f}% |",
        f"| GPU utilisation during the burst, mean | {f['gpu_util_burst_only_mean']:.1f}% |",
    ]
    if util_avg:
        f["table"].append(
            f"| GPU utilisation, NVML samples averaged: burst+drain / burst, mean | "
            f"{f['gpu_util_avg_mean']:.1f}% / {f['gpu_util_avg_burst_only_mean']:.1f}% |"
        )
    return f


def plot(run: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot written")
        return
    samples = run["samples"]
    ts = [s["t_s"] for s in samples]
    fig, ax = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    ax[0].plot(ts, [s["queued"] for s in samples], label="queued")
    ax[0].plot(ts, [s["pending"] for s in samples], label="pending (in a worker)")
    ax[0].set_ylabel("requests")
    ax[0].legend()
    ax[1].plot(ts, [s["tok_s"] for s in samples], label="output tok/s (at completion)")
    if samples and "gpu_util" in samples[0]:
        ax1b = ax[1].twinx()
        ax1b.plot(ts, [s.get("gpu_util", 0) for s in samples], color="tab:red", alpha=0.5)
        ax1b.set_ylabel("GPU util %")
    ax[1].set_ylabel("tokens/s")
    buckets: dict[int, list[float]] = {}
    for r in run["records"]:
        if "ttft_ms" in r:
            buckets.setdefault(int(r["done_s"]), []).append(r["ttft_ms"])
    xs = sorted(buckets)
    ax[2].plot(xs, [pct(buckets[x], 50) for x in xs], label="TTFT p50")
    ax[2].plot(xs, [pct(buckets[x], 99) for x in xs], label="TTFT p99")
    ax[2].set_ylabel("ms")
    ax[2].set_yscale("log")
    ax[2].set_xlabel("seconds")
    ax[2].legend()
    for a in ax:
        a.axvspan(run["calm_s"], run["calm_s"] + run["burst_s"], color="orange", alpha=0.15)
    fig.suptitle("chatq spike: calm → 20x burst (shaded) → recovery")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
