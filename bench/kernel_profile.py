"""Where a stretch of GPU work spends its time, kernel by kernel (torch.profiler, CUDA only):
the table the engine and spike benchmarks print under their ``--profile`` options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def profile_kernels(work: Callable[[], Any], title: str, rows: int = 16) -> str:
    """Run ``work`` under the CUDA profiler and return a titled table of its kernels by total
    device time (kernels replayed inside CUDA graphs included)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        work()
        torch.cuda.synchronize()
    errors = []
    for key in ("device_time_total", "cuda_time_total"):  # the column's name by torch version
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=rows,
                                              max_name_column_width=70)  # fmt: skip
            return f"{title}:\n{table}"
        except Exception as err:
            errors.append(f"by {key}: {err!r}")
    return f"{title}: no profile table ({'; '.join(errors)})"
