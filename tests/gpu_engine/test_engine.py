"""End to end on tiny real checkpoints: greedy parity with transformers under continuous
batching (mixed lengths, chunked prefill, shared prefixes, preemption), and the LLMEngine /
LLM API (abort, deadline, capacity, stats, seeds, stop strings, chat, no tokenizer)."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from gpu_engine import (
    LLM,
    EngineError,
    InvalidRequestError,
    LLMEngine,
    RefusalReason,
    SamplingParams,
)
from tests.gpu_engine.conftest import hf_greedy
from tests.gpu_engine.test_model_runner import ARCH_IDS, ARCHS

MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 500) for _ in range(24)]
    mixed = [[rng.randrange(3, 500) for _ in range(n)] for n in (1, 5, 19, 45)]
    prefixed = [shared + [rng.randrange(3, 500) for _ in range(n)] for n in (1, 6, 11)]
    return mixed + prefixed


@pytest.mark.parametrize(("arch", "overrides"), ARCHS, ids=ARCH_IDS)
def test_greedy_generation_matches_transformers(
    tiny_checkpoint: Any, arch: str, overrides: Any
) -> None:
    path = tiny_checkpoint(arch, **overrides)
    prompts = _prompts(seed=7)
    want = [hf_greedy(path, p, MAX_TOKENS) for p in prompts]
    scenarios: dict[str, dict[str, Any]] = {
        "together": dict(kv_cache_tokens=2048),
        "chunked": dict(kv_cache_tokens=2048, block_size=8, max_num_batched_tokens=8),
        # ~7 sequences x up to 56 tokens cannot all fit in 12 blocks of 8: preemption.
        "preempt": dict(kv_cache_tokens=96, block_size=8, admission_watermark=0.0),
    }
    for name, options in scenarios.items():
        llm = LLM(str(path), **options)
        outs = llm.generate(prompts, GREEDY)
        got = [o.token_ids for o in outs]
        assert got == want, name
        assert all(o.finish_reason == "length" for o in outs)
        stats = llm.engine.stats()
        if name == "chunked":
            # Later prompts were admitted after the shared prefix had been computed.
            assert stats["prefix_cache_hit_tokens"] > 0
        if name == "preempt":
            assert stats["preemptions"] > 0
        assert stats["free_kv_tokens"] == stats["total_kv_tokens"]


def test_prefix_cache_hits_across_generate_calls(tiny_checkpoint: Any) -> None:
    path = tiny_checkpoint("qwen3")
    prompts = _prompts(seed=3)
    llm = LLM(str(path), kv_cache_tokens=1024)
    first = llm.generate(prompts[4:5], GREEDY)
    engine = llm.engine
    before = engine.stats()["prefix_cache_hit_tokens"]
    rest = llm.generate(prompts[5:], GREEDY)
    assert engine.stats()["prefix_cache_hit_tokens"] - before >= 2 * 16
    for prompt, out in zip(prompts[4:], first + rest, strict=True):
        assert out.token_ids == hf_greedy(path, prompt, MAX_TOKENS)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Any) -> LLM:
    return LLM(str(tiny_checkpoint("llama")), kv_cache_tokens=1024)


def _drain(engine: LLMEngine) -> dict[str, Any]:
    """Step until idle; per request id the tokens and the final output."""
    tokens: dict[str, list[int]] = {}
    final: dict[str, Any] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                assert out.request_id not in final, "reported finished twice"
                final[out.request_id] = out
    return {"tokens": tokens, "final": final}


def test_step_outputs_abort_deadline_and_capacity(llm: LLM) -> None:
    engine = llm.engine
    idle = engine.capacity()
    assert idle.free_kv_tokens == idle.total_kv_tokens == 1024
    assert (idle.running_seqs, idle.waiting_seqs, idle.waiting_tokens) == (0, 0, 0)
    engine.add_request("keep", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("gone", list(range(3, 40)), SamplingParams(max_tokens=50))
    engine.add_request(
        "late", [5, 6], SamplingParams(max_tokens=5), deadline_unix_s=time.time() - 1
    )
    assert engine.capacity().waiting_tokens == 3 + 37 + 2
    first = {o.request_id: o for o in engine.step()}
    assert first["late"].finished and first["late"].finish_reason == "deadline"
    assert first["late"].new_token_ids == []
    assert len(first["keep"].new_token_ids) == 1 and first["keep"].num_prompt_tokens == 3
    cap = engine.capacity()
    assert cap.running_seqs == 2 and cap.free_kv_tokens < cap.total_kv_tokens
    assert engine.abort("gone") and not engine.abort("gone") and not engine.abort("unknown")
    assert engine.capacity().free_kv_tokens > cap.free_kv_tokens  # freed at once
    result = _drain(engine)
    assert result["final"]["gone"].finish_reason == "abort"
    assert result["final"]["keep"].finish_reason == "length"
    assert len(result["tokens"]["keep"]) == 3  # 4 in all with the first step's token
    assert engine.capacity().free_kv_tokens == 1024
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad", [])
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad", [10_000])
    with pytest.raises(InvalidRequestError, match="integers") as info:
        engine.add_request("bad", [5, 6.5])
    assert info.value.reason is RefusalReason.INVALID_PROMPT  # a typed reason, not "prompt…"
    with pytest.raises(InvalidRequestError, match="integers"):
        engine.add_request("bad", ["5"])
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad", [5] * 1024)
    assert info.value.reason is RefusalReason.PROMPT_TOO_LONG


def test_eos_stops_unless_ignored(llm: LLM) -> None:
    engine = llm.engine
    assert engine.eos_token_ids == [2]
    prompt = [5, 6, 7]
    free_run = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    # Make the 3rd greedy token a stop token: generation ends right there, token included.
    stop_at = free_run[0].token_ids[2]
    out = llm.generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_at])
    )[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free_run[0].token_ids[: free_run[0].token_ids.index(stop_at) + 1]


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm: LLM) -> None:
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=12, temperature=1.2, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], seeded)[0].token_ids
    batched = llm.generate([[9, 9], [5, 6, 7], list(range(3, 30))], [other, seeded, other])
    assert batched[1].token_ids == alone
    different = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True)
    assert llm.generate([[5, 6, 7]], different)[0].token_ids != alone
    # top_k=1 is greedy whatever the temperature.
    greedy = llm.generate(
        [[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )
    top1 = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, top_k=1, ignore_eos=True))
    assert greedy[0].token_ids == top1[0].token_ids


def test_text_prompts_stop_strings_and_chat(llm: LLM) -> None:
    tok = llm.tokenizer
    assert tok is not None
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    (out,) = llm.generate(["Where is my order?"], params)
    assert out.prompt_token_ids == tok.encode("Where is my order?")
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    assert len(out.text) > 4
    stop = out.text[2:4]
    stop_params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
    (cut,) = llm.generate(["Where is my order?"], stop_params)
    assert cut.finish_reason == "stop" and cut.text == out.text[: out.text.index(stop)]
    assert len(cut.token_ids) < len(out.token_ids)
    convo = [{"role": "user", "content": "Hello!"}]
    (chat,) = llm.chat(convo, params)
    want = tok.encode(
        tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert chat.prompt_token_ids == want and len(chat.token_ids) == 16
    assert not llm.engine.has_unfinished()


def test_model_dir_without_tokenizer_takes_token_ids(tiny_checkpoint: Any, tmp_path: Path) -> None:
    src = tiny_checkpoint("qwen2")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, tmp_path / name)
    llm = LLM(str(tmp_path), kv_cache_tokens=256)
    assert llm.tokenizer is None
    (out,) = llm.generate([[5, 6, 7]], GREEDY)
    assert out.token_ids == hf_greedy(src, [5, 6, 7], MAX_TOKENS) and out.text == ""
    with pytest.raises(EngineError):
        llm.generate(["text needs a tokenizer"], GREEDY)


def test_from_options_rejects_unknown_and_bad_options(tiny_checkpoint: Any) -> None:
    with pytest.raises(EngineError, match="unknown engine option"):
        LLMEngine.from_options(str(tiny_checkpoint("llama")), kv_cache_size=5)
    with pytest.raises(EngineError):
        LLMEngine.from_options(str(tiny_checkpoint("llama")), attention_backend="magic")
    with pytest.raises(EngineError, match="not a model directory"):
        LLMEngine.from_options("/nonexistent/model")


def test_begin_and_end_step_with_a_step_in_flight(tiny_checkpoint: Any) -> None:
    """``begin_step`` launches, ``end_step`` returns what ``step`` would. A second step may
    begin while one is in flight (its inputs refer to the first one's samples on the
    device), a third may not, and steps end in the order they began. Requests added or
    aborted with steps in flight join or leave a later step."""
    path = str(tiny_checkpoint("llama"))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = {"a": [5, 6, 7, 8, 9], "b": [10, 11, 12]}

    def tokens(split: bool) -> dict[str, list[int]]:
        engine = LLMEngine.from_options(path, device="cpu", kv_cache_tokens=256)
        engine.add_request("a", prompts["a"], params)
        out: dict[str, list[int]] = {"a": [], "b": [], "c": []}
        steps: list[Any] = []
        first = True
        while engine.has_unfinished():
            if split:
                if engine.scheduler.has_unfinished():
                    steps.append(engine.begin_step())
                if first:
                    steps.append(engine.begin_step())  # a's second token, before the first
                    with pytest.raises(EngineError, match="two steps are in flight"):
                        engine.begin_step()
                    with pytest.raises(EngineError, match="not the oldest"):
                        engine.end_step(steps[1])
                    engine.add_request("b", prompts["b"], params)  # joins the next step
                    engine.add_request("c", prompts["b"], params)
                    assert engine.abort("c")  # leaves before it ran
                outs = engine.end_step(steps.pop(0))
            else:
                outs = engine.step()
                if first:
                    outs += engine.step()
                    engine.add_request("b", prompts["b"], params)
                    engine.add_request("c", prompts["b"], params)
                    assert engine.abort("c")
            first = False
            for o in outs:
                out[o.request_id] += o.new_token_ids
        return out

    # The oracle is transformers' greedy decode, not ``step``: ``step`` is made of
    # ``begin_step`` and ``end_step``, so comparing with it could not catch a shared bug.
    want = {"a": hf_greedy(path, prompts["a"], 4), "b": hf_greedy(path, prompts["b"], 4), "c": []}
    assert tokens(split=True) == want
    assert tokens(split=False) == want


def _run_all(
    engine: LLMEngine,
    requests: dict[str, tuple[list[int], SamplingParams]],
    pipelined: bool,
    abort_after: dict[str, int] | None = None,
) -> dict[str, tuple[list[int], str | None]]:
    """Every request's tokens and finish reason, stepping with ``pipelined_step`` or
    ``step``; ``abort_after[rid] = n`` aborts rid once n of its tokens were reported. Checks
    that nothing is reported after a request's final output and that no block leaks."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    reasons: dict[str, str | None] = {}
    abort_after = dict(abort_after or {})
    while engine.has_unfinished():
        outs = engine.pipelined_step() if pipelined else engine.step()
        for o in outs:
            assert o.request_id not in reasons, f"{o.request_id} reported after its end"
            tokens[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        for rid, n in list(abort_after.items()):
            if len(tokens[rid]) >= n and rid not in reasons:
                assert engine.abort(rid)
                del abort_after[rid]
        sched = engine.scheduler
        engine.block_manager.check_invariants([*sched.running, *sched.waiting])
    assert engine.finish_pipeline() == []
    assert engine.capacity().free_kv_tokens == engine.capacity().total_kv_tokens
    return {rid: (tokens[rid], reasons.get(rid)) for rid in requests}


def test_pipelined_steps_give_the_plain_loops_results(tiny_checkpoint: Any) -> None:
    """Asynchronous scheduling (``pipelined_step``: step N+1 launched before step N's tokens
    reach the host) yields exactly the tokens and finish reasons of ``step()``: greedy and
    seeded requests, max_tokens and max_model_len limits, stop tokens learnt one step late
    (the extra row is dropped), shared prefixes, chunked prefill, aborts with steps in
    flight, and preemption in a KV cache too small for all of them."""
    path = str(tiny_checkpoint("llama"))
    rng = random.Random(7)
    shared = [rng.randrange(3, 500) for _ in range(20)]
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (1, 4, 9, 30)]
    prompts += [shared + [rng.randrange(3, 500) for _ in range(n)] for n in (2, 7)]
    free = LLM(path, device="cpu", kv_cache_tokens=1024, block_size=4).generate(
        prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    )
    requests: dict[str, tuple[list[int], SamplingParams]] = {}
    for i, (prompt, res) in enumerate(zip(prompts, free, strict=True)):
        stop = [res.token_ids[2 + i % 5]]  # stops part-way, at a different step each
        requests[f"g{i}"] = (prompt, SamplingParams(max_tokens=3 + 2 * i, temperature=0.0))
        requests[f"s{i}"] = (prompt, SamplingParams(max_tokens=12, temperature=0.0,
                                                     stop_token_ids=stop))  # fmt: skip
        requests[f"r{i}"] = (prompt, SamplingParams(max_tokens=9, temperature=0.8, top_k=20,
                                                    seed=100 + i, ignore_eos=True))  # fmt: skip
    requests["long"] = ([7] * 40, SamplingParams(max_tokens=100, temperature=0.0,
                                                 ignore_eos=True))  # fmt: skip
    aborts = {"g5": 2, "r3": 4, "long": 1}
    for kv_tokens, max_seqs in ((2048, 32), (96, 6)):  # roomy; then preempting
        kw = dict(device="cpu", kv_cache_tokens=kv_tokens, block_size=4, max_num_seqs=max_seqs,
                  max_num_batched_tokens=24, max_model_len=64)  # fmt: skip
        plain = _run_all(LLMEngine.from_options(path, **kw), requests, False, aborts)
        engine = LLMEngine.from_options(path, **kw)
        piped = _run_all(engine, requests, True, aborts)
        assert piped == plain
        for i in range(len(prompts)):
            assert (
                plain[f"s{i}"][1] == "stop"
                and plain[f"s{i}"][0][-1] in requests[f"s{i}"][1].stop_token_ids
            )
            assert plain[f"g{i}"][1] in ("length", "stop", "abort")
        assert plain["long"] == (plain["long"][0], "abort")
    assert engine.stats()["preemptions"] > 0
    assert plain["r0"][1] == "length" and len(plain["r0"][0]) == 9
