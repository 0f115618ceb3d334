"""FlashAttnBackend wiring, checked on CPU against a reference of flash-attn's documented API,
and on the GPU with the real package where it is installed.

flash-attn cannot be installed here (no CUDA), so this module implements the
documented semantics of the two functions the backend calls — ``flash_attn_varlen_func``
(with ``block_table``: k/v are the paged cache [num_blocks, page, KVH, D], page a multiple
of 256, per-sequence key counts from ``cu_seqlens_k``) and ``flash_attn_with_kvcache``
(``cache_seqlens``, ``block_table``, optional k/v appended in place) — with the causal mask
aligned bottom-right and GQA by head groups, as the flash-attn docstrings state. It is
injected as a fake ``flash_attn`` module for these tests only, and FlashAttnBackend is
compared with the torch reference backend and an fp64 oracle.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import torch

from gpu_engine.errors import EngineError
from gpu_engine.layers.torch_ref import TorchRefBackend
from tests.gpu_engine.paged_cases import make_case, reference, rel_err

torch.set_num_threads(2)


# ------------------------------------------------ reference of the documented semantics


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """q [sq, H, D], k/v [sk, KVH, D] -> [sq, H, D] fp32. Causal mask aligned bottom-right:
    query i sees key j iff j <= i + sk - sq; fully masked rows give zeros."""
    sq, sk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, 1)
    v = v.float().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if causal:
        keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)
    return torch.einsum("hqk,khd->qhd", p, v)


def _check_common(q: torch.Tensor, k: torch.Tensor, block_table: torch.Tensor | None) -> None:
    assert q.dtype in (torch.float16, torch.bfloat16), "flash-attn takes fp16/bf16 only"
    assert k.dtype == q.dtype and k.stride(-1) == 1
    assert q.shape[-2] % k.shape[-2] == 0
    if block_table is not None:
        assert block_table.dtype == torch.int32
        assert k.shape[1] % 256 == 0, "paged KV: page_block_size must be a multiple of 256"


def _keys(cache: torch.Tensor, block_table: torch.Tensor, b: int, n: int) -> torch.Tensor:
    return cache[block_table[b].long()].reshape(-1, *cache.shape[2:])[:n]


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False, block_table=None,
):  # fmt: skip
    _check_common(q, k, block_table)
    if dropout_p or window_size != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("not used by the backend")
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        sq, sk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        assert sq <= max_seqlen_q and sk <= max_seqlen_k
        if block_table is not None:
            kb, vb = _keys(k, block_table, b, sk), _keys(v, block_table, b, sk)
        else:
            kb, vb = k[cu_k[b] : cu_k[b + 1]], v[cu_k[b] : cu_k[b + 1]]
        out[cu_q[b] : cu_q[b + 1]] = _attend(q[cu_q[b] : cu_q[b + 1]], kb, vb, scale, causal)
    CALLS.append(("varlen", block_table is not None, causal))
    return out


def flash_attn_with_kvcache(
    q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
    cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
    alibi_slopes=None, num_splits=0, return_softmax_lse=False,
):  # fmt: skip
    _check_common(q, k_cache, block_table)
    if rotary_cos is not None or cache_batch_idx is not None or cache_leftpad is not None:
        raise NotImplementedError("not used by the backend")
    if window_size != (-1, -1) or softcap or alibi_slopes is not None or return_softmax_lse:
        raise NotImplementedError("not used by the backend")
    batch = q.shape[0]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32)
    assert cache_seqlens.dtype == torch.int32
    out = torch.empty_like(q)
    for b in range(batch):
        n = int(cache_seqlens[b])
        if k is not None:  # new keys are appended in place at cache_seqlens[b] onward
            for j in range(k.shape[1]):
                pos = n + j
                if block_table is not None:
                    blk, off = int(block_table[b, pos // k_cache.shape[1]]), pos % k_cache.shape[1]
                    k_cache[blk, off], v_cache[blk, off] = k[b, j], v[b, j]
                else:
                    k_cache[b, pos], v_cache[b, pos] = k[b, j], v[b, j]
            n += k.shape[1]
        if block_table is not None:
            kb, vb = _keys(k_cache, block_table, b, n), _keys(v_cache, block_table, b, n)
        else:
            kb, vb = k_cache[b, :n], v_cache[b, :n]
        out[b] = _attend(q[b], kb, vb, scale, causal)
    CALLS.append(("kvcache", block_table is not None, causal))
    return out


CALLS: list[tuple[str, bool, bool]] = []


@pytest.fixture
def fake_flash_attn(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Installs the reference as ``flash_attn`` and imports the backend module against it."""
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = flash_attn_varlen_func  # type: ignore[attr-defined]
    fake.flash_attn_with_kvcache = flash_attn_with_kvcache  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.delitem(sys.modules, "gpu_engine.layers.flash_attn", raising=False)
    CALLS.clear()
    module = importlib.import_module("gpu_engine.layers.flash_attn")
    yield module
    sys.modules.pop("gpu_engine.layers.flash_attn", None)
    import gpu_engine.layers as layers

    if hasattr(layers, "flash_attn"):
        delattr(layers, "flash_attn")


# ------------------------------------------------ the reference itself


def test_reference_mask_is_bottom_right_aligned_as_documented() -> None:
    # Docstring: seqlen_q=2, seqlen_k=5 -> rows [1 1 1 1 0], [1 1 1 1 1]; seqlen_q=5,
    # seqlen_k=2 -> rows 0..2 fully masked (zero output), row 3 [1 0], row 4 [1 1].
    d = 8
    k = torch.randn(5, 1, d)
    v = torch.eye(5)[:, None, :].repeat(1, 1, 2)[..., :d]  # v_j = e_j: output shows weights
    out = _attend(torch.zeros(2, 1, d), k, v, 1.0, causal=True)[:, 0, :5]
    assert torch.allclose(out[0], torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0]))
    assert torch.allclose(out[1], torch.full((5,), 0.2))
    out = _attend(torch.zeros(5, 1, d), k[:2], v[:2], 1.0, causal=True)[:, 0, :2]
    assert torch.equal(out[:3], torch.zeros(3, 2))
    assert torch.allclose(out[3], torch.tensor([1.0, 0.0]))
    assert torch.allclose(out[4], torch.tensor([0.5, 0.5]))


def test_reference_kvcache_appends_new_keys_in_place() -> None:
    page, kvh, d = 256, 1, 8
    k_cache = torch.zeros(3, page, kvh, d, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    table = torch.tensor([[2, 0]], dtype=torch.int32)
    k_new = torch.randn(1, 2, kvh, d).bfloat16()
    q = torch.randn(1, 2, 1, d).bfloat16()
    flash_attn_with_kvcache(
        q, k_cache, v_cache, k=k_new, v=k_new, cache_seqlens=torch.tensor([255], dtype=torch.int32),
        block_table=table, causal=True,
    )  # fmt: skip
    assert torch.equal(k_cache[2, 255], k_new[0, 0]) and torch.equal(k_cache[0, 0], k_new[0, 1])


# ------------------------------------------------ the backend


CASES = [
    # (specs, heads, kv_heads, head_dim, shared_blocks): prefills first, decodes last
    ([(0, 40), (300, 20), (260, 1), (511, 1)], 4, 2, 32, 0),
    ([(256, 9), (256, 300), (700, 1)], 6, 2, 16, 1),  # shared 256-token prefix block
    ([(1, 1), (255, 1), (256, 1)], 4, 4, 32, 0),  # decode only (the CUDA-graph path)
    ([(0, 3), (10, 7)], 8, 1, 16, 0),  # prefill only, MQA
]


def _run(backend: Any, case: Any, device: str) -> tuple[Any, torch.Tensor]:
    """One step of ``case`` (specs, heads, kv heads, head dim, shared blocks) on pages of 256
    through ``backend``: (the case, with its caches as the backend left them; the output)."""
    specs, h, kvh, d, shared = case
    c = make_case(
        specs, h, kvh, d, 256, torch.bfloat16, device, shared_blocks=shared, store_new=False,
        seed=7,
    )  # fmt: skip
    return c, backend.forward(c.q, c.k_new, c.v_new, c.k_cache, c.v_cache, c.meta, d**-0.5)


@pytest.mark.parametrize("case", CASES)
def test_flash_attn_backend_matches_torch_reference(fake_flash_attn: Any, case) -> None:
    _, _, kvh, d, _ = case
    scale = d**-0.5
    run = partial(_run, case=case, device="cpu")
    flash_case, flash_out = run(fake_flash_attn.FlashAttnBackend())
    flash_calls = list(CALLS)
    _, ref_out = run(TorchRefBackend())
    assert torch.isfinite(flash_out).all()
    assert rel_err(flash_out, ref_out) < 1e-2
    assert rel_err(flash_out, reference(flash_case, scale)) < 1e-2
    # Both flash-attn entry points were used, paged and causal, where the step needs them.
    meta = flash_case.meta
    expect = []
    if meta.num_prefill_seqs:
        expect.append(("varlen", True, True))
    if meta.num_decode_seqs:
        expect.append(("kvcache", True, True))
    assert flash_calls == expect
    # The flash backend (not the reference run after it, on its own case) stored this step's
    # K/V: the new slots, NaN before, now hold exactly the new keys and values.
    fc = flash_case
    for cache, new in ((fc.k_cache, fc.k_new), (fc.v_cache, fc.v_new)):
        assert torch.equal(cache.view(-1, kvh, d)[meta.slot_mapping], new)


# ------------------------------------------------ the real package, on the GPU (issue 22)

REAL_CASES = [
    # Head dims 64 and 128: what scripts/device_flash_attn.sh builds (the engine's models).
    ([(0, 40), (300, 20), (260, 1), (511, 1)], 4, 2, 128, 0),  # GQA, prefix hits, decodes
    ([(256, 9), (256, 300), (700, 1)], 6, 2, 64, 1),  # a shared block, chunked prefill
    ([(1, 1), (255, 1), (256, 1), (3000, 1)], 16, 8, 128, 0),  # decode only
    ([(0, 3), (10, 7)], 8, 1, 64, 0),  # prefill only, MQA
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", REAL_CASES)
def test_the_real_flash_attn_matches_the_reference_and_triton(case) -> None:
    """FlashAttnBackend with the real flash-attn (built on the GPU host by
    scripts/device_flash_attn.sh) against the torch reference, the Triton backend on the
    same case, and the fp64 oracle; its step's K/V stored exactly."""
    pytest.importorskip("flash_attn_2_cuda", reason="flash-attn is not installed")
    from gpu_engine.layers.flash_attn import FlashAttnBackend
    from gpu_engine.layers.triton_attn import TritonBackend

    _, _, kvh, d, _ = case
    scale = d**-0.5
    run = partial(_run, case=case, device="cuda")
    flash_case, flash_out = run(FlashAttnBackend())
    _, ref_out = run(TorchRefBackend())
    _, triton_out = run(TritonBackend())
    assert torch.isfinite(flash_out).all()
    assert rel_err(flash_out, ref_out) < 1e-2
    assert rel_err(flash_out, triton_out) < 1e-2
    assert rel_err(flash_out, reference(flash_case, scale)) < 1e-2
    fc, meta = flash_case, flash_case.meta
    for cache, new in ((fc.k_cache, fc.k_new), (fc.v_cache, fc.v_new)):
        assert torch.equal(cache.view(-1, kvh, d)[meta.slot_mapping], new)


def test_flash_attn_backend_rejects_small_pages(fake_flash_attn: Any) -> None:
    backend = fake_flash_attn.FlashAttnBackend()
    assert backend.required_block_size == 256
    c = make_case([(3, 2)], 2, 1, 16, 16, torch.bfloat16, "cpu", store_new=False)
    with pytest.raises(EngineError, match="256"):
        backend.forward(c.q, c.k_new, c.v_new, c.k_cache, c.v_cache, c.meta, 0.25)


def test_flash_attn_backend_module_needs_flash_attn(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the package the import fails, which is what makes "auto" fall back to Triton.
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.delitem(sys.modules, "gpu_engine.layers.flash_attn", raising=False)
    with pytest.raises(ImportError):
        importlib.import_module("gpu_engine.layers.flash_attn")
