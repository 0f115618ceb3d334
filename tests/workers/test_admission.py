"""The cost budget that sizes each pull from the engine's capacity snapshot."""

from __future__ import annotations

from typing import Any

from gpu_engine.outputs import EngineCapacity as Capacity
from gpu_engine.sequence import SamplingParams
from producer.contract.codec import make_envelope
from workers.admission import WARMUP_COMPLETIONS, Admission
from workers.detokenizer import IncrementalDetokenizer
from workers.lanes import Entry
from workers.request import InflightRequest


class _NoDecode:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "x" * len(ids)


def _req(adm: Admission, rid: str, prompt: int, max_tokens: int) -> InflightRequest:
    env = make_envelope(
        [{"role": "user", "content": "hi"}],
        model="m",
        params=SamplingParams(max_tokens=max_tokens),
        request_id=rid,
    )
    return InflightRequest(
        env=env,
        entry=Entry("s", "1-0", {}, "normal"),
        prompt_ids=[1] * prompt,
        cost_tokens=adm.cost_tokens(prompt, max_tokens),
        level=1,
        detok=IncrementalDetokenizer(_NoDecode(), [], ()),
    )


def _cap(total: int, waiting: int = 0) -> Capacity:
    return Capacity(
        free_kv_tokens=total,
        total_kv_tokens=total,
        waiting_tokens=waiting,
        running_seqs=0,
        waiting_seqs=0,
        max_num_seqs=8,
    )


def test_budget_is_kv_cache_plus_headroom_and_count_is_bounded() -> None:
    adm = Admission(_cap(1000), max_num_seqs=8, inflight_factor=1.5, headroom_tokens=200)
    assert adm.max_requests == 12
    admitted = 0
    while adm.pull_count() > 0:
        adm.admit(_req(adm, f"r{admitted}", prompt=100, max_tokens=100))
        admitted += 1
    # 200 tokens each: 6 fit in 1000 + 200; a 7th would overshoot the budget.
    assert admitted == 6
    assert adm.committed_tokens == 1200
    adm.release(next(iter(adm.admitted.values())))
    assert adm.pull_count() == 1
    assert adm.changed.is_set()


def test_a_host_process_gets_its_share_of_both_bounds() -> None:
    """One of two host processes: half of (KV cache + headroom) and half of the count."""
    adm = Admission(_cap(1000), max_num_seqs=8, inflight_factor=1.5, headroom_tokens=200, share=0.5)
    assert adm.max_requests == 6 and adm.budget_tokens == 600
    admitted = 0
    while adm.pull_count() > 0:
        adm.admit(_req(adm, f"r{admitted}", prompt=100, max_tokens=100))
        admitted += 1
    assert admitted == 3  # 200 tokens each in 600
    # A request that fits the whole KV cache is still accepted by this host.
    assert adm.fits_alone(500, 500)


def test_count_limit_binds_for_small_requests() -> None:
    adm = Admission(_cap(100_000), max_num_seqs=4, inflight_factor=1.0, headroom_tokens=0)
    for i in range(4):
        adm.admit(_req(adm, f"r{i}", prompt=5, max_tokens=5))
    assert adm.pull_count() == 0


def test_an_idle_worker_always_pulls_at_least_one() -> None:
    adm = Admission(_cap(64), max_num_seqs=4, inflight_factor=1.0, headroom_tokens=0)
    assert adm.pull_count() >= 1


def test_engine_backlog_pauses_pulls() -> None:
    adm = Admission(_cap(100_000), max_num_seqs=64, inflight_factor=1.0, headroom_tokens=256)
    adm.admit(_req(adm, "r0", prompt=10, max_tokens=10))
    assert adm.pull_count() > 0
    adm.update(_cap(100_000, waiting=10_000))  # the engine reports a long waiting queue
    assert adm.pull_count() == 0


def test_expected_output_learns_from_completions() -> None:
    adm = Admission(_cap(100_000), max_num_seqs=64, inflight_factor=1.0, headroom_tokens=0)
    assert adm.expected_output_tokens(200) == 200  # no history: assume max_tokens
    for i in range(WARMUP_COMPLETIONS * 4):
        req = _req(adm, f"r{i}", prompt=10, max_tokens=200)
        adm.admit(req)
        req.detok.num_tokens = 20  # answers use a tenth of max_tokens
        adm.release(req)
    expected = adm.expected_output_tokens(200)
    assert 20 < expected < 200
    assert adm.committed_tokens == 0 and not adm.admitted


def test_fits_alone() -> None:
    adm: Any = Admission(_cap(1000), max_num_seqs=4, inflight_factor=1.0, headroom_tokens=0)
    assert adm.fits_alone(500, 500)
    assert not adm.fits_alone(900, 200)
