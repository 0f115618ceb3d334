"""Grammar-constrained decoding: the bitmask against xgrammar's own kernel, and the engine's
structured output on a tiny random checkpoint (random weights: only the constraint can make
its output valid)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import pytest
import torch

from gpu_engine import LLM, InvalidRequestError, RefusalReason, SamplingParams, StructuredOutput
from gpu_engine.grammar import ANY_OBJECT, apply_bitmask

xgr = pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer", "minimum": 0, "maximum": 999},
        "status": {"enum": ["open", "shipped", "returned"]},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["order_id", "status", "note"],
    "additionalProperties": False,
}


def test_apply_bitmask_matches_xgrammars_kernel() -> None:
    vocab = 100
    mask = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32)
    logits = torch.randn(3, vocab)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, mask)
    got = apply_bitmask(logits.clone(), mask)
    assert torch.equal(got.isfinite(), want.isfinite())
    torch.testing.assert_close(got[got.isfinite()], logits[got.isfinite()])


def test_logits_past_the_mask_are_masked_on_constrained_rows_only() -> None:
    """A model's padded vocabulary: ids past the tokenizer's (past the mask) can never be
    sampled on a constrained row, and stay as they were on a free one."""
    logits = torch.randn(2, 100)
    mask = torch.full((2, 2), -1, dtype=torch.int32)  # 64 ids: the tokenizer's
    mask[1, 0] = 0b1010  # row 1 constrained: ids 1 and 3 (and 32..63) allowed
    got = apply_bitmask(logits.clone(), mask)
    assert torch.equal(got[0], logits[0])
    allowed = got[1].isfinite().nonzero().flatten().tolist()
    assert allowed == [1, 3, *range(32, 64)]


def test_the_mask_covers_the_tokenizer_s_ids(tiny_checkpoint: Any) -> None:
    """An engine whose logits are wider than its tokenizer (a vocabulary padded past it)
    fills masks of the tokenizer's width, and its constrained output is still valid."""
    path = tiny_checkpoint("llama", vocab_size=700)  # the tokenizer has 512 ids
    engine = LLM(str(path), device="cpu", kv_cache_tokens=1024)
    try:
        grammars = engine.engine.grammars
        assert engine.engine.model_runner.arch.vocab_size == 700
        assert grammars.mask_vocab == len(engine.engine.tokenizer) == 512
        params = SamplingParams(
            max_tokens=80, temperature=1.0, seed=3, structured=StructuredOutput.json(SCHEMA)
        )
        [out] = engine.generate(["order"], params)
        assert grammars._buffer.shape[1] == (grammars.mask_vocab + 31) // 32
        assert out.finish_reason == "stop"
        json.loads(out.text, strict=False)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Any) -> Any:
    engine = LLM(str(tiny_checkpoint("llama")), device="cpu", kv_cache_tokens=4096)
    yield engine
    engine.close()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_is_valid(llm: Any, temperature: float) -> None:
    params = SamplingParams(
        max_tokens=80, temperature=temperature, seed=3, structured=StructuredOutput.json(SCHEMA)
    )
    outs = llm.generate(["order status please", "x", "the quick brown fox"], params)
    for out in outs:
        assert out.finish_reason == "stop", out.text  # the grammar ended, then eos
        # strict=False: xgrammar's JSON strings admit raw control characters (random
        # weights pick them), which Python's strict parser refuses.
        value = json.loads(out.text, strict=False)
        assert set(value) == {"order_id", "status", "note"}
        assert (
            isinstance(value["order_id"], int)
            and value["status"] in SCHEMA["properties"]["status"]["enum"]
        )
        assert len(value["note"]) <= 12


def test_json_object_stays_a_valid_prefix(llm: Any) -> None:
    """Any JSON object: random weights may wander inside a string until max_tokens, so the
    check is that every token was one the grammar allowed (a fresh matcher accepts them)."""
    params = SamplingParams(
        max_tokens=40, temperature=1.0, seed=5, structured=StructuredOutput.json()
    )
    outs = llm.generate(["a", "b", "c", "d"], params)
    compiler = llm.engine.grammars._make_compiler()
    for out in outs:
        matcher = xgr.GrammarMatcher(
            compiler.compile_json_schema(ANY_OBJECT, strict_mode=False, any_whitespace=False)
        )
        assert all(matcher.accept_token(t) for t in out.token_ids), out.text
        assert out.text.startswith("{")
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text, strict=False), dict)


def test_regex_and_grammar(llm: Any) -> None:
    cases = [
        (
            StructuredOutput("regex", r"(yes|no), [0-9]{3}"),
            re.compile(r"(yes|no), [0-9]{3}").fullmatch,
        ),
        (
            StructuredOutput("grammar", 'root ::= "A" ("b" | "c")+ "."'),
            re.compile(r"A[bc]+\.").fullmatch,
        ),
    ]
    for structured, valid in cases:
        params = SamplingParams(max_tokens=60, temperature=1.0, seed=1, structured=structured)
        [out] = llm.generate(["say something"], params)
        assert out.finish_reason == "stop" and valid(out.text), (structured, out.text)


def test_constrained_and_free_requests_share_a_batch(llm: Any) -> None:
    free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    constrained = SamplingParams(
        max_tokens=80, temperature=0.0, structured=StructuredOutput.json(SCHEMA)
    )
    alone = llm.generate(["a b c d"], free)[0].token_ids
    mixed = llm.generate(["a b c d", "order"], [free, constrained])
    assert mixed[0].token_ids == alone  # the mask of one row leaves the others alone
    json.loads(mixed[1].text, strict=False)


def test_a_schema_that_does_not_compile_is_refused(llm: Any) -> None:
    bad = StructuredOutput("json", '{"type": "no-such-type"}')
    with pytest.raises(InvalidRequestError) as info:
        llm.engine.add_request("bad", [1, 2, 3], SamplingParams(structured=bad))
    assert info.value.reason is RefusalReason.INVALID_PARAMS
    assert "structured" in str(info.value)
    assert not llm.engine.has_unfinished()
    with pytest.raises(InvalidRequestError, match=r"structured\.kind"):
        StructuredOutput("yaml", "x")


@pytest.mark.gpu
def test_structured_output_on_cuda_matches_the_cpu_engine(tiny_checkpoint: Any) -> None:
    """The same greedy constrained requests on CUDA and on the CPU give valid JSON; with
    float32 on both, the same tokens."""
    path = str(tiny_checkpoint("llama"))
    params = SamplingParams(
        max_tokens=80, temperature=0.0, structured=StructuredOutput.json(SCHEMA)
    )
    prompts = ["order status please", "x", "the quick brown fox"]
    results = []
    for device in ("cpu", "cuda"):
        with LLM(path, device=device, dtype="float32", kv_cache_tokens=4096) as engine:
            results.append(engine.generate(prompts, params))
    for cpu, gpu in zip(*results, strict=True):
        assert gpu.finish_reason == "stop"
        json.loads(gpu.text, strict=False)
        assert gpu.token_ids == cpu.token_ids


def test_prefix_and_suffix_wrap_the_constrained_part(llm: Any) -> None:
    """A forced tool call: tags around JSON matching the call's schema."""
    call = {
        "type": "object",
        "properties": {
            "name": {"const": "lookup_order"},
            "arguments": {
                "type": "object",
                "properties": {"order_id": {"type": "integer", "minimum": 0, "maximum": 9999}},
                "required": ["order_id"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    structured = StructuredOutput.json(call, prefix="<tool_call>\n", suffix="\n</tool_call>")
    params = SamplingParams(max_tokens=80, temperature=0.0, structured=structured)
    [out] = llm.generate(["where is my order?"], params)
    assert out.finish_reason == "stop", out.text
    assert out.text.startswith("<tool_call>\n") and out.text.endswith("\n</tool_call>")
    value = json.loads(out.text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    assert value["name"] == "lookup_order" and 0 <= value["arguments"]["order_id"] <= 9999


def test_a_resumed_answer_keeps_its_grammar(llm: Any) -> None:
    """A worker that takes over a half-finished answer prefills prompt + generated tokens
    (``num_resumed_tokens`` of them): the grammar goes on from where they left it."""
    schema = StructuredOutput.json(SCHEMA)
    prompt = llm.tokenizer.encode("order status please")
    full = SamplingParams(max_tokens=80, temperature=0.0, structured=schema)
    [whole] = llm.generate([prompt], full)
    assert whole.finish_reason == "stop"
    head = whole.token_ids[:5]
    resumed = SamplingParams(
        max_tokens=80 - 5, temperature=0.0, structured=schema, num_resumed_tokens=5
    )
    [rest] = llm.generate([prompt + head], resumed)
    assert head + rest.token_ids == whole.token_ids  # greedy: the same answer
    json.loads(llm.tokenizer.decode(head + rest.token_ids, skip_special_tokens=True), strict=False)
    # Without the count the grammar would start over: a second "{" after the first.
    with pytest.raises(InvalidRequestError, match="resumed tokens"):
        llm.engine.add_request(
            "bad", prompt + [whole.token_ids[1]] * 3, replace(resumed, num_resumed_tokens=3)
        )


def _run_steps(engine: Any, requests: dict[str, Any], pipelined: bool) -> dict[str, list[int]]:
    """Every request's tokens, driving ``engine`` by pipelined_step() or step()."""
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    step = engine.pipelined_step if pipelined else engine.step
    while engine.has_unfinished():
        for out in step():
            tokens[out.request_id] += out.new_token_ids
    for out in engine.finish_pipeline():
        tokens[out.request_id] += out.new_token_ids
    return tokens


@pytest.mark.parametrize("keyed", [False, True], ids=["generators", "keyed"])
def test_pipelined_steps_fill_masks_on_the_grammar_thread(
    llm: Any, keyed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pipelined_step fills a deferred step's mask on the grammar thread while the next
    step is scheduled; the tokens are those of plain step() calls (seeded sampling: any
    mask filled from the wrong tokens, or a sample taken before its mask, changes them),
    and a seeded request's random stream is gone once it finished (rows sampled after it
    did must not make a new one). Both sources of draws: per-request generators and the
    keyed kernels (CUDA's default; interpreted here)."""
    engine = llm.engine
    monkeypatch.setattr(engine.model_runner.sampler, "keyed", keyed)
    schema = StructuredOutput.json(SCHEMA)
    requests = {
        f"r{i}": (
            llm.tokenizer.encode(f"order {i} status"),
            SamplingParams(max_tokens=60, temperature=1.0, seed=i, structured=schema)
            if i % 3
            else SamplingParams(max_tokens=20, temperature=1.0, seed=i),
        )
        for i in range(6)
    }
    engine.grammars.close()  # the module's earlier tests may have started it
    fills = engine.grammars.num_fills
    plain = _run_steps(engine, requests, pipelined=False)
    assert engine.grammars._thread is None  # step() fills on the engine's thread
    pipelined = _run_steps(engine, requests, pipelined=True)
    assert pipelined == plain
    assert engine.grammars._thread is not None
    assert engine.grammars.num_fills > fills
    for rid, (_, params) in requests.items():
        if params.structured is not None:
            text = llm.tokenizer.decode(pipelined[rid], skip_special_tokens=True)
            json.loads(text, strict=False)
    assert engine.model_runner.sampler.num_request_streams == 0
    engine.grammars.close()
    assert engine.grammars._thread is None
