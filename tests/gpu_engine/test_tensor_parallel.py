"""Tensor parallelism: TP=2 (rank 0 here, rank 1 a spawned process; gloo on CPU, NCCL on CUDA)
gives TP=1's greedy tokens, with logits within 1e-4 relative, under chunked prefill and prefix
hits, also when rank 0 has decode graphs; KV heads split or replicated; vocab shards padded;
workers gone after close, garbage collection or the engine process's death; an engine inside a
daemonic process (as the worker host runs it) starts its ranks; shapes that do not split are
config errors."""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from gpu_engine import LLM, EngineError, LLMEngine, SamplingParams
from gpu_engine.config import ConfigError
from gpu_engine.loader import iter_safetensors, safetensors_files
from gpu_engine.model_runner import ModelRunner
from gpu_engine.models import LlamaArchConfig
from gpu_engine.tp_group import TPGroup
from gpu_engine.tp_shards import iter_rank_shards, local_arch

pytestmark = pytest.mark.timeout(180)

MAX_TOKENS = 6
# Chunked prefill (45-token prompt, 16-token budget), multi-block tables (block 8).
OPTIONS: dict[str, Any] = dict(kv_cache_tokens=1024, block_size=8, max_num_batched_tokens=16)
CASES: list[tuple[str, dict[str, Any], int]] = [
    # (arch, config overrides, KV heads per rank at TP=2); the tiny configs have 4 heads, 2 KV.
    ("llama", {}, 1),
    ("qwen2", {}, 1),  # q/k/v biases (random here: the checkpoints' own are zero)
    ("qwen3", {}, 1),
    # 1 KV head for 2 ranks (replicated), a vocab that does not split evenly (rank 1's shard
    # padded), o_proj / down_proj biases (added once, after the all-reduce).
    ("llama", dict(num_key_value_heads=1, vocab_size=515, attention_bias=True, mlp_bias=True), 1),
]
CASE_IDS = ["llama", "qwen2", "qwen3", "llama-kv1-vocab515-bias"]


def with_random_biases(src: Path, dst: Path) -> Path:
    """A copy of checkpoint ``src`` whose biases are random (HF initialises them to zero, which
    would hide a bias sliced or added twice)."""
    from safetensors.torch import save_file

    if dst.exists():
        return dst
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    gen = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.randn(t.shape, generator=gen) * 0.5 if name.endswith(".bias") else t
        for name, t in iter_safetensors(src)
    }
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 500) for _ in range(24)]
    mixed = [[rng.randrange(3, 500) for _ in range(n)] for n in (1, 5, 19, 45)]
    return mixed + [shared + [rng.randrange(3, 500) for _ in range(n)] for n in (1, 6, 11)]


def greedy_with_logits(
    engine: LLMEngine, prompts: list[list[int]]
) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Drive the engine step by step through ``forward_logits`` (the path that broadcasts
    to the other ranks); per prompt, its greedy tokens and the logits of each."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    while engine.has_unfinished():
        batch = engine.scheduler.schedule(time.time())
        out, rows = engine.model_runner.forward_logits(batch)
        sampled: list[int | None] = [None] * len(batch.seqs)
        for r, i in enumerate(rows):
            sampled[i] = int(out[r].argmax())
            logits[int(batch.seqs[i].request_id)].append(out[r].clone())
        for seq, token in engine.scheduler.postprocess(batch, sampled):
            tokens[int(seq.request_id)].append(token)
    return tokens, logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting for a reaper)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_gone(pids: list[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return all(_gone(p) for p in pids)


class _EagerGraphs:
    """Stands in for rank 0's ``DecodeGraphs`` on CPU: ``run`` is the model forward (same
    collectives as a replay); the staged path must never be taken with TP."""

    def __init__(self, model: Any) -> None:
        self.model, self.num_runs = model, 0

    def can_run(self, num_seqs: int, max_blocks: int) -> bool:
        return True

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor:
        self.num_runs += 1
        hidden: torch.Tensor = self.model(input_ids, positions)
        return hidden

    def stage_and_run(self, *args: Any) -> torch.Tensor:
        raise AssertionError("staged decode skips the broadcast to the other ranks")


@pytest.mark.parametrize(("arch", "overrides", "kv_heads_per_rank"), CASES, ids=CASE_IDS)
def test_tp2_matches_tp1(
    tiny_checkpoint: Any, arch: str, overrides: dict[str, Any], kv_heads_per_rank: int
) -> None:
    path = tiny_checkpoint(arch, **overrides)
    if arch == "qwen2" or overrides:
        path = with_random_biases(path, path.with_name(path.name + "-biased"))
        assert any(n.endswith(".bias") and t.any() for n, t in iter_safetensors(path))
    path = str(path)
    prompts = _prompts(seed=11)
    assert max(len(p) for p in prompts) > OPTIONS["max_num_batched_tokens"]  # chunked prefill

    one = LLM(path, **OPTIONS)
    # TP=1 is the single-device path: no process group, plain runner, single-rank layers.
    assert not dist.is_initialized() and type(one.engine.model_runner) is ModelRunner
    assert one.engine.model_runner.model.model.layers[0].mlp.down_proj.tp.size == 1
    want_tokens, want_logits = greedy_with_logits(one.engine, prompts)
    want_generate = [o.token_ids for o in one.generate(prompts, _greedy())]

    with LLM(path, tensor_parallel_size=2, **OPTIONS) as two:
        runner = two.engine.model_runner
        pids = runner.worker_pids
        assert len(pids) == 1 and not _gone(pids[0])
        assert runner.arch.num_heads == 2 and runner.arch.num_kv_heads == kv_heads_per_rank
        assert runner.kv_cache.shape[-2] == kv_heads_per_rank  # this rank's share of the cache
        assert runner.num_kv_blocks == one.engine.model_runner.num_kv_blocks
        got_tokens, got_logits = greedy_with_logits(two.engine, prompts)
        assert got_tokens == want_tokens
        for got, want in zip(got_logits, want_logits, strict=True):
            assert len(got) == len(want) == MAX_TOKENS
            for g, w in zip(got, want, strict=True):
                assert g.shape == w.shape and rel_err(g, w) < 1e-4
        # LLM.generate (sampler on rank 0) with decode steps through rank 0's graphs.
        runner.graphs = graphs = _EagerGraphs(runner.model)  # type: ignore[assignment]
        assert [o.token_ids for o in two.generate(prompts, _greedy())] == want_generate
        assert graphs.num_runs >= MAX_TOKENS - 1
        # Asynchronous scheduling: rank 0 resolves the placeholders of the step in flight
        # before the step's inputs are broadcast, so every rank computes the same tokens.
        for i, prompt in enumerate(prompts):
            two.engine.add_request(f"p{i}", prompt, _greedy())
        piped: dict[str, list[int]] = {}
        while two.engine.has_unfinished():
            for o in two.engine.pipelined_step():
                piped.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert [piped[f"p{i}"] for i in range(len(prompts))] == want_generate
        stats = two.engine.stats()
        assert stats["prefix_cache_hit_tokens"] > 0
        assert stats["free_kv_tokens"] == stats["total_kv_tokens"]
        # A forward path that skips prepare() is an error, not a silent hang.
        hidden = runner.arch.hidden_size
        runner._graph_decode_hidden = lambda batch: torch.zeros(0, hidden)  # type: ignore
        two.engine.add_request("x", [5, 6, 7], _greedy())
        with pytest.raises(EngineError, match="skipped prepare"):
            two.engine.step()
        del runner._graph_decode_hidden
    assert _wait_gone(pids, 0.0), "close() returned with a worker still running"
    assert not dist.is_initialized()
    with pytest.raises(EngineError, match="closed"):
        two.generate(prompts[:1], _greedy())


def _greedy() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def test_workers_stop_when_the_engine_is_garbage_collected(tiny_checkpoint: Any) -> None:
    engine = LLMEngine.from_options(
        str(tiny_checkpoint("qwen3")), tensor_parallel_size=2, kv_cache_tokens=256
    )
    pids = engine.model_runner.worker_pids
    assert engine.step() == [] and not _gone(pids[0])
    del engine
    gc.collect()
    assert _wait_gone(pids, 5.0)
    assert not dist.is_initialized()


def _generate_in_daemon(path: str, conn: Any) -> None:
    """Child of ``test_engine_in_a_daemonic_process_can_spawn_its_ranks``."""
    with LLM(path, tensor_parallel_size=2, **OPTIONS) as llm:
        out = llm.generate(_prompts(seed=4)[:3], _greedy())
        conn.send_bytes(repr([o.token_ids for o in out]).encode())


def test_engine_in_a_daemonic_process_can_spawn_its_ranks(tiny_checkpoint: Any) -> None:
    """The worker host runs its engine in a daemonic spawned process (workers.engine_process),
    where multiprocessing normally refuses to start children."""
    path = str(tiny_checkpoint("llama"))
    want = [o.token_ids for o in LLM(path, **OPTIONS).generate(_prompts(seed=4)[:3], _greedy())]
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_generate_in_daemon, args=(path, send), daemon=True)
    proc.start()
    send.close()
    try:
        assert recv.poll(120), "no result from the daemonic engine process"
        assert recv.recv_bytes().decode() == repr(want)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


_ENGINE_SCRIPT = """
import sys, time
from gpu_engine import LLM
llm = LLM(sys.argv[1], tensor_parallel_size=2, kv_cache_tokens=256)
print(llm.engine.model_runner.worker_pids[0], flush=True)
if sys.argv[2] == "exit":
    sys.exit(0)  # without close(): the interpreter-exit hook stops the worker
time.sleep(120)
"""


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_workers_end_with_the_engine_process(tiny_checkpoint: Any, end: str) -> None:
    """Interpreter exit without close() (the atexit safety net), or SIGKILL of the engine
    process (no EXIT is ever sent: the worker notices its parent is gone on its own)."""
    path = str(tiny_checkpoint("llama"))
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _ENGINE_SCRIPT, path, end],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        worker = int(proc.stdout.readline())
        assert not _gone(worker)
        if end == "exit":
            assert proc.wait(60) == 0
            assert _gone(worker)  # reaped before the engine process finished exiting
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert _wait_gone([worker], 10.0)


def test_shapes_that_do_not_split_are_config_errors(tiny_checkpoint: Any) -> None:
    arch = LlamaArchConfig.from_hf(
        dict(
            model_type="llama", vocab_size=100, hidden_size=96, intermediate_size=192,
            num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=3,
        )
    )  # fmt: skip
    assert local_arch(arch, 1) is arch
    assert (local_arch(arch, 3).num_heads, local_arch(arch, 3).num_kv_heads) == (2, 1)
    assert local_arch(arch, 6).num_kv_heads == 1  # 3 KV heads replicated twice
    for size, problem in [(2, "num_key_value_heads=3"), (4, "num_attention_heads=6")]:
        with pytest.raises(ConfigError, match=problem):
            local_arch(arch, size)
    # Checked before anything is spawned.
    with pytest.raises(ConfigError, match="num_attention_heads=4"):
        LLM(str(tiny_checkpoint("llama")), tensor_parallel_size=3)
    assert multiprocessing.active_children() == [] and not dist.is_initialized()


def test_rank_shards_reassemble_the_checkpoint(tiny_checkpoint: Any) -> None:
    """Each rank's slices, read with ``get_slice``, put back together are the full tensors
    (KV heads replicated, vocab padded, row-parallel biases whole on every rank)."""
    path = tiny_checkpoint(
        "llama", num_key_value_heads=1, vocab_size=515, attention_bias=True, mlp_bias=True
    )
    full = dict(iter_safetensors(path))
    shards = [
        dict(iter_rank_shards(safetensors_files(path), 16, TPGroup(rank=r, size=2)))
        for r in range(2)
    ]
    for name, tensor in full.items():
        parts = [s[name] for s in shards]
        if any(k in name for k in ("q_proj", "gate_proj", "up_proj")):
            assert torch.equal(torch.cat(parts), tensor), name
        elif "k_proj" in name or "v_proj" in name:  # one KV head: both ranks hold it
            assert all(torch.equal(p, tensor) for p in parts), name
        elif ("o_proj" in name or "down_proj" in name) and name.endswith("weight"):
            assert torch.equal(torch.cat(parts, dim=1), tensor), name
        elif "embed_tokens" in name or "lm_head" in name:
            assert [p.shape[0] for p in parts] == [258, 258]
            joined = torch.cat(parts)
            assert torch.equal(joined[:515], tensor) and not joined[515:].any(), name
        else:
            assert all(torch.equal(p, tensor) for p in parts), name
    # 4 ranks, 2 KV heads: ranks 0-1 hold KV head 0, ranks 2-3 KV head 1 (16 rows each).
    k_proj = "model.layers.0.self_attn.k_proj.weight"
    path = tiny_checkpoint("llama")
    full_k = dict(iter_safetensors(path))[k_proj]
    for r in range(4):
        part = dict(iter_rank_shards(safetensors_files(path), 16, TPGroup(rank=r, size=4)))
        assert torch.equal(part[k_proj], full_k[16 * (r // 2) : 16 * (r // 2 + 1)]), r


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"
)
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_tp2_matches_tp1_on_cuda(tiny_checkpoint: Any, kv_heads: int) -> None:
    """NCCL, the Triton backend, fused kernels and decode CUDA graphs (all-reduces captured),
    fp32: TP=1's greedy tokens, logits within 1e-4."""
    path = str(
        tiny_checkpoint(
            "qwen3", hidden_size=256, intermediate_size=512, num_attention_heads=4,
            num_key_value_heads=kv_heads, head_dim=128,
        )
    )  # fmt: skip
    options: dict[str, Any] = dict(
        device="cuda:0", dtype="float32", attention_backend="triton", **OPTIONS
    )
    prompts = _prompts(seed=5)
    one = LLMEngine.from_options(path, **options)
    assert one.model_runner.graphs is not None
    want_tokens, want_logits = greedy_with_logits(one, prompts)
    del one
    with LLMEngine.from_options(path, tensor_parallel_size=2, **options) as two:
        assert two.model_runner.graphs is not None
        pids = two.model_runner.worker_pids
        got_tokens, got_logits = greedy_with_logits(two, prompts)
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        assert all(rel_err(g, w) < 1e-4 for g, w in zip(got, want, strict=True))
    assert _wait_gone(pids, 0.0)
