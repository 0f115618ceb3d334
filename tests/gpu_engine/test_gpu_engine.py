"""The engine on a CUDA device (``pytest -m gpu``; skipped without one).

- CUDA-graph decode produces exactly the tokens of eager decode (fp32, mixed lengths,
  batch sizes on and between captured sizes).
- End-to-end greedy parity with transformers on tiny random-weight checkpoints in fp32,
  through the Triton backend and the fused kernels.
- Random weights (``load_format="random"``) build on the device and run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_engine import LLM, SamplingParams
from tests.gpu_engine.conftest import hf_model

pytestmark = pytest.mark.gpu

ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    # Head dims and GQA groups like the real models (64/128, group 2-4), tiny otherwise.
    "llama": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2),
    "qwen2": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=1),
    "qwen3": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=128),
}  # fmt: skip


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 70, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (n_tok,), generator=g).tolist() for n_tok in lengths]


def _llm(path: Path, **kw: Any) -> LLM:
    opts = dict(device="cuda", dtype="float32", attention_backend="triton", kv_cache_tokens=16384)
    opts.update(kw)
    return LLM(str(path), **opts)


@pytest.mark.parametrize("num_seqs", [1, 8, 13])
def test_cuda_graph_decode_matches_eager_tokens(tiny_checkpoint: Any, num_seqs: int) -> None:
    path = tiny_checkpoint("qwen3", **ARCH_OVERRIDES["qwen3"])
    prompts = _prompts(num_seqs, 500, seed=num_seqs)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    graph_llm = _llm(path, max_num_seqs=16)
    runner = graph_llm.engine.model_runner
    assert runner.graphs is not None and 16 in runner.graphs.graphs
    graph_out = [o.token_ids for o in graph_llm.generate(prompts, params)]
    del graph_llm
    eager_out = [o.token_ids for o in _llm(path, enforce_eager=True).generate(prompts, params)]
    assert graph_out == eager_out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_parity_with_transformers_fp32(tiny_checkpoint: Any, arch: str) -> None:
    path = tiny_checkpoint(arch, **ARCH_OVERRIDES[arch])
    prompts = [list(range(3, 63)), *_prompts(6, 500, seed=1)]
    prompts.append([*prompts[0][:40], 5, 6, 7])  # shares 2 full blocks: prefix-cache hit
    max_new = 20
    llm = _llm(path, max_num_batched_tokens=64)  # small budget: chunked prefill
    ours = llm.generate(
        prompts, SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    )
    model = hf_model(path).to("cuda")
    try:
        for prompt, out in zip(prompts, ours, strict=True):
            with torch.no_grad():
                ref = model.generate(
                    torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=max_new
                )
            assert out.token_ids == ref[0, len(prompt) :].tolist()
    finally:
        model.to("cpu")


def test_random_weights_build_on_device_and_generate(tmp_path: Path) -> None:
    cfg = dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=512,
        intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024,
        tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0,
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(tmp_path), load_format="random", kv_cache_tokens=4096)
    runner = llm.engine.model_runner
    assert runner.dtype == torch.bfloat16 and runner.backend.name in ("triton", "flash_attn")
    w = runner.model.model.layers[0].mlp.down_proj.weight
    assert w.is_cuda and 0.015 < float(w.float().std()) < 0.025
    out = llm.generate([[1, 2, 3]] * 3, SamplingParams(max_tokens=5, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [5, 5, 5]


@pytest.mark.parametrize("mixed_graphs", [True, False], ids=["mixed-graphs", "eager-mixed"])
def test_pipelined_steps_match_plain_steps(tiny_checkpoint: Any, mixed_graphs: bool) -> None:
    """Asynchronous scheduling on the device (decode and mixed-step graphs resolving
    placeholders in the graph, double-buffered staging, tokens copied back in stream order):
    the tokens and finish reasons of ``step()``, with stop tokens learnt one step late,
    aborts with steps in flight and preemption in a small KV cache."""
    from gpu_engine import LLMEngine
    from tests.gpu_engine.test_engine import _run_all

    path = tiny_checkpoint("qwen3", **ARCH_OVERRIDES["qwen3"])
    prompts = _prompts(24, 500, seed=3)
    free = _llm(path, max_num_seqs=16).generate(
        prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    )
    requests: dict[str, tuple[list[int], SamplingParams]] = {}
    for i, (prompt, res) in enumerate(zip(prompts, free, strict=True)):
        if i % 3 == 0:  # stops part-way on a token of its own greedy run
            params = SamplingParams(max_tokens=16, temperature=0.0,
                                    stop_token_ids=[res.token_ids[3 + i % 7]])  # fmt: skip
        elif i % 3 == 1:
            params = SamplingParams(max_tokens=5 + i, temperature=0.0, ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=12, temperature=0.7, top_p=0.9, seed=i,
                                    ignore_eos=True)  # fmt: skip
        requests[f"q{i}"] = (prompt, params)
    aborts = {"q4": 3, "q11": 1}
    opts = dict(device="cuda", dtype="float32", attention_backend="triton", max_num_seqs=16,
                max_num_batched_tokens=96, mixed_step_graphs=mixed_graphs)  # fmt: skip
    for kv_tokens in (16384, 512):  # roomy; then preempting
        plain = _run_all(
            LLMEngine.from_options(str(path), kv_cache_tokens=kv_tokens, **opts),
            requests, False, aborts,
        )  # fmt: skip
        engine = LLMEngine.from_options(str(path), kv_cache_tokens=kv_tokens, **opts)
        piped = _run_all(engine, requests, True, aborts)
        assert piped == plain
        runner = engine.model_runner
        assert runner.graphs is not None and runner.graphs.num_replays > 0
        if mixed_graphs:
            assert runner.mixed_graphs is not None and runner.mixed_graphs.num_replays > 0
        assert sum(r == "stop" for _, r in plain.values()) >= 6
    assert engine.stats()["preemptions"] > 0


def test_kv_cache_is_sized_from_gpu_memory_utilization(tiny_checkpoint: Any) -> None:
    """Without ``kv_cache_tokens``, the KV cache gets what is left of
    ``gpu_memory_utilization`` of the device: raising it by 0.1 adds 0.1 of the device's
    memory worth of tokens (the rest of the budget, weights and activations, is the same)."""
    import gc

    from gpu_engine import LLMEngine

    path = str(tiny_checkpoint("llama", **ARCH_OVERRIDES["llama"]))
    tokens: dict[float, int] = {}
    per_token = 0
    for utilization in (0.1, 0.2):
        engine = LLMEngine.from_options(path, device="cuda", gpu_memory_utilization=utilization)
        tokens[utilization] = engine.capacity().total_kv_tokens
        per_token = engine.model_runner.kv_bytes_per_token
        engine.close()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    print(f"KV tokens {tokens}, {per_token} B/token, device {total / 2**30:.1f} GiB")
    assert tokens[0.1] > 0
    assert tokens[0.2] - tokens[0.1] == pytest.approx(0.1 * total / per_token, rel=0.02)
