"""The only module that touches tensors: loads the model, owns the paged KV cache, turns a
scheduled batch into (input_ids, positions, AttentionMetadata), runs the model, samples.

Decode-only steps go through ``_run_decode`` so the GPU fast path can replace it with CUDA
graph replay without touching the rest.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from gpu_engine.block_tables import BlockTableMirror, slot_ids
from gpu_engine.config import EngineConfig
from gpu_engine.context import forward_context
from gpu_engine.cuda_graphs import DecodeGraphs, MixedGraphs
from gpu_engine.errors import EngineError
from gpu_engine.fp8 import FP8_DTYPE, page_major_view
from gpu_engine.grammar import bitmask_to_device
from gpu_engine.layers import make_attention_backend
from gpu_engine.layers.base import AttentionMetadata
from gpu_engine.loader import build_model, load_hf_config, resolve_model_dir
from gpu_engine.models import LlamaArchConfig
from gpu_engine.outputs import TokenLogprobs
from gpu_engine.sampling import Drawn, History, Sampler, needs_history, resolve_pending
from gpu_engine.scheduler import ScheduledBatch
from gpu_engine.sequence import SamplingParams, Sequence
from gpu_engine.tp_group import current as current_tp_group
from gpu_engine.tp_shards import local_arch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [S] int64: token rows whose logits are sampled
    sample_seqs: list[int]  # [S] index into batch.seqs of each sampled row


@dataclass
class LaunchedStep:
    tokens: torch.Tensor | None  # [S] sampled ids, host memory (None: nothing samples)
    rows: list[int]  # [S] index into batch.seqs of each sampled row
    ready: torch.cuda.Event | None = None  # recorded after the copy into ``tokens`` (CUDA)
    # Sampled.logprobs / top_ids / top_logprobs in host memory, when a row asked for them.
    logprobs: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
    # A deferred step (``launch(defer=True)``): its logits [S, vocab] and sampled sequences,
    # until ``sample_deferred``.
    logits: torch.Tensor | None = None
    seqs: list[Sequence] | None = None
    drawn: Drawn | None = None  # its plan and random draws, made at launch

    @property
    def deferred(self) -> bool:
        return self.logits is not None


def _history(seq: Sequence) -> History:
    """The tokens a sequence's penalties look at: its prompt, and its output without the
    trailing placeholders of steps still being sampled (a resumed answer's earlier tokens,
    the prompt's last ``num_resumed_tokens``, count as output)."""
    start = len(seq.prompt_token_ids) - seq.sampling_params.num_resumed_tokens
    tokens = seq.token_ids
    return History(tokens[:start], tokens[start : len(tokens) - seq.num_pending])


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(
            config.device
            if config.device != "auto"
            else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        auto_dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = _DTYPES[auto_dtype if config.dtype == "auto" else config.dtype]
        self.model_dir = resolve_model_dir(config.model)
        self.hf_config = load_hf_config(self.model_dir)
        # This rank's share of heads / KV heads / intermediate size (all of it for one rank).
        self.arch = local_arch(LlamaArchConfig.from_hf(self.hf_config), current_tp_group().size)
        self.backend = make_attention_backend(
            config.attention_backend, self.device.type, config.fp8_kv_cache
        )
        self.kv_dtype = FP8_DTYPE if config.fp8_kv_cache else self.dtype
        self.model = build_model(
            self.arch,
            self.model_dir,
            self.dtype,
            self.device,
            self.backend,
            load_format=config.load_format,
            seed=config.seed,
            quantization=config.quantization,
        )
        self.block_size = self._block_size()
        self.sampler = Sampler(self.device, config.seed)
        self.sampler.warm_up(self.arch.vocab_size, self.dtype)  # keyed kernels compiled now
        # The last launched step's sampled tokens, on the device: the next step's input ids
        # may refer to them by placeholder before they reach the host (resolve_pending).
        self.last_tokens = torch.zeros(
            max(1, config.max_num_seqs), dtype=torch.int64, device=self.device
        )
        self.graphs: DecodeGraphs | None = None  # captured after the KV cache exists
        self.mixed_graphs: MixedGraphs | None = None
        self.num_kv_blocks = self._num_kv_blocks()
        self._allocate_kv_cache(self.num_kv_blocks)
        limit = min(
            config.max_model_len or self.arch.max_position_embeddings,
            self.arch.max_position_embeddings,
        )
        self.max_model_len = min(limit, self.num_kv_blocks * self.block_size)
        # Block tables of steps built by prepare(), kept across steps (see _padded_tables).
        self.table_mirror = BlockTableMirror(
            4 * config.max_num_seqs, -(-self.max_model_len // self.block_size)
        )
        self.graphs = self._capture_decode_graphs()
        self.mixed_graphs = self._capture_mixed_graphs()
        log.info(
            "model %s on %s (%s, weights %s), backend %s, %d KV blocks of %d tokens (%s)",
            self.model_dir,
            self.device,
            self.dtype,
            config.quantization,
            self.backend.name,
            self.num_kv_blocks,
            self.block_size,
            self.kv_dtype,
        )

    def _capture_decode_graphs(self) -> DecodeGraphs | None:
        """CUDA graphs of decode-only steps (not with enforce_eager, not on CPU, not with the
        torch reference backend, whose decode reads host-side sequence lengths)."""
        if self.device.type != "cuda" or self.config.enforce_eager or self.backend.name == "torch":
            return None
        graphs = DecodeGraphs(
            self.model,
            max_num_seqs=self.config.max_num_seqs,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            hidden_size=self.arch.hidden_size,
            dtype=self.dtype,
            device=self.device,
            last_tokens=self.last_tokens,
            shared_prefix_group=self._shared_prefix_group(),
        )
        graphs.capture()
        return graphs

    def _shared_prefix_group(self) -> int | None:
        """The GQA group size the shared-prefix kernels tile by, if they are used: Triton
        backend, prefix caching on (else no blocks are ever shared), one device."""
        cfg = self.config
        if (
            not cfg.shared_prefix_attention
            or not cfg.enable_prefix_caching
            or self.backend.name != "triton"
            or current_tp_group().size > 1
        ):
            return None
        return self.arch.num_heads // self.arch.num_kv_heads

    def _capture_mixed_graphs(self) -> MixedGraphs | None:
        """CUDA graphs of steps with prefill chunks (Triton backend, one device, with decode
        graphs; not with ``mixed_step_graphs=False``). They share the decode graphs' block
        table mirror, so a sequence keeps its row across both kinds of step."""
        if (
            self.graphs is None
            or not self.config.mixed_step_graphs
            or self.backend.name != "triton"
            or current_tp_group().size > 1
        ):
            return None
        graphs = MixedGraphs(
            self.model,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            hidden_size=self.arch.hidden_size,
            dtype=self.dtype,
            device=self.device,
            mirror=self.graphs.mirror,
            last_tokens=self.last_tokens,
        )
        graphs.capture()
        return graphs

    def _block_size(self) -> int:
        """The configured block size, unless the backend needs pages of another multiple
        (flash-attn's paged KV: 256)."""
        required = getattr(self.backend, "required_block_size", None)
        size = self.config.block_size
        if required and size % required:
            log.warning(
                "attention backend %s needs block_size %% %d == 0; using %d instead of %d",
                self.backend.name,
                required,
                required,
                size,
            )
            return int(required)
        return size

    # -- KV cache ------------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers (FP8: values plus an fp32 scale per head)."""
        a = self.arch
        per_head = a.head_dim * self.kv_dtype.itemsize
        if self.kv_dtype == FP8_DTYPE:
            per_head += 4
        return 2 * a.num_layers * a.num_kv_heads * per_head

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.kv_cache_tokens is not None:
            tokens = cfg.kv_cache_tokens
        elif self.device.type == "cuda":
            tokens = self._profile_cuda_kv_tokens()
        else:
            tokens = min(
                int(cfg.cpu_kv_cache_fraction * _available_ram_bytes()) // self.kv_bytes_per_token,
                cfg.cpu_kv_cache_max_tokens,
            )
        # Every rank allocates the same number of blocks: what the tightest rank can hold.
        min_tokens = current_tp_group().min_int(tokens, self.device)
        num_blocks = min_tokens // self.block_size
        if num_blocks < 1:
            raise EngineError(
                f"no memory left for the KV cache (this rank: {tokens} tokens, the tightest "
                f"rank: {min_tokens}); lower other GPU users or raise gpu_memory_utilization"
            )
        return num_blocks

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        a = self.arch
        shape = (a.num_layers, 2, num_blocks, self.block_size, a.num_kv_heads)
        # [layers, k/v, num_blocks, block_size, KVH, D]; zeroed so padded slots the reference
        # backend gathers and the FP8 kernels' unmasked V reads (kernels.kv_tiles) are finite
        # (masked, but NaN * 0 would still poison the output).
        self.kv_cache = torch.zeros(*shape, a.head_dim, dtype=self.kv_dtype, device=self.device)
        # FP8: one fp32 scale per (layer, k/v, slot, KV head); zeros read back as zeros.
        self.kv_scales = (
            torch.zeros(shape, dtype=torch.float32, device=self.device)
            if self.kv_dtype == FP8_DTYPE
            else None
        )
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
            if self.kv_scales is not None:  # V page-major (gpu_engine.fp8), in the same bytes
                attn.v_cache = page_major_view(attn.v_cache)
                attn.kv_scales = (self.kv_scales[i, 0], self.kv_scales[i, 1])

    @torch.inference_mode()
    def _profile_cuda_kv_tokens(self) -> int:
        """Run the largest step once with a scratch cache, then give the KV cache what is
        left of ``gpu_memory_utilization`` of the device after the activation peak."""
        cfg = self.config
        seq_len = min(
            cfg.max_num_batched_tokens, cfg.max_model_len or self.arch.max_position_embeddings
        )
        num_seqs = max(1, min(cfg.max_num_seqs, cfg.max_num_batched_tokens // seq_len))
        blocks_per_seq = -(-seq_len // self.block_size)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._allocate_kv_cache(num_seqs * blocks_per_seq)
        tables = [
            list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(num_seqs)
        ]
        inputs = self._build_inputs(
            [[0] * seq_len] * num_seqs, [0] * num_seqs, tables, sample=[True] * num_seqs
        )
        hidden = self._execute(inputs)
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        rows = max(num_seqs, cfg.max_num_seqs)
        warm = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
        self.sampler.sample(
            logits[:1].float().expand(rows, -1).contiguous(), [warm] * rows, [""] * rows
        )
        torch.cuda.synchronize(self.device)
        stats = torch.cuda.memory_stats(self.device)
        peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
        del self.kv_cache, self.kv_scales, hidden, logits
        for attn in self.model.attention_layers():
            attn.k_cache = attn.v_cache = torch.empty(0)
            attn.kv_scales = None
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        budget = int(total * cfg.gpu_memory_utilization) - used - (peak - current)
        return max(0, budget // self.kv_bytes_per_token)

    # -- inputs --------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        tokens, starts, tables, sample = [], [], [], []
        for i, seq in enumerate(batch.seqs):
            start = seq.num_computed_tokens
            end = start + batch.query_lens[i]
            tokens.append(seq.token_ids[start:end])
            starts.append(start)
            tables.append(seq.block_table)
            sample.append(end == seq.num_tokens)
        padded = self._padded_tables(batch, tables)
        inputs = self._build_inputs(tokens, starts, tables, sample, batch.num_prefill_seqs, padded)
        # Placeholders of the previous step's samples, resolved before the step's inputs go
        # anywhere (tensor-parallel ranks receive the real ids); none after a plain step().
        if any(seq.num_pending for seq in batch.seqs):
            inputs.input_ids = resolve_pending(inputs.input_ids, self.last_tokens)
        return inputs

    def _padded_tables(self, batch: ScheduledBatch, tables: list[list[int]]) -> np.ndarray | None:
        """The step's block tables [num_seqs, max_blocks] int32, zero-padded, gathered from
        the mirror (which converts only blocks appended since a sequence's last step; the
        conversion of every table was ~0.6 ms per decode step at 256 sequences); None if a
        table is wider than the mirror."""
        mirror = self.table_mirror
        mirror.reserve(len(tables))
        rows = [mirror.row(seq.request_id, t) for seq, t in zip(batch.seqs, tables, strict=True)]
        if min(rows) < 0:
            return None
        lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        padded = mirror.tables[rows, : int(lens.max())]  # a copy (fancy indexing)
        padded[np.arange(padded.shape[1]) >= lens[:, None]] = 0  # other requests' stale ids
        return padded

    def _build_inputs(
        self,
        tokens: list[list[int]],
        starts: list[int],
        tables: list[list[int]],
        sample: list[bool],
        num_prefill_seqs: int | None = None,
        padded: np.ndarray | None = None,
    ) -> StepInputs:
        bs = self.block_size
        num_seqs = len(tokens)
        if len(starts) != num_seqs or len(tables) != num_seqs or len(sample) != num_seqs:
            raise EngineError("tokens, starts, tables and sample differ in length")
        query_lens = [len(t) for t in tokens]
        input_ids = list(itertools.chain.from_iterable(tokens))
        if num_prefill_seqs is None:
            num_prefill_seqs = sum(1 for q in query_lens if q > 1)
        if padded is None:
            max_blocks = max(len(t) for t in tables)
            # [num_seqs, max_blocks] int32, zero-padded; row copies through numpy are ~3x
            # faster than torch.tensor on nested lists.
            padded = np.zeros((len(tables), max_blocks), dtype=np.int32)
            for i, t in enumerate(tables):
                padded[i, : len(t)] = t
        # Per-token positions and slots in numpy (was a Python loop over every token).
        q = np.array(query_lens, dtype=np.int64)
        start = np.array(starts, dtype=np.int64)
        cu = np.zeros(num_seqs + 1, dtype=np.int64)  # cumulative query lengths
        np.cumsum(q, out=cu[1:])
        seq_of_token = np.repeat(np.arange(num_seqs), q)
        positions = np.arange(len(input_ids), dtype=np.int64) + np.repeat(start - cu[:-1], q)
        slots = slot_ids(padded, seq_of_token, positions, bs)
        seq_lens = (start + q).tolist()
        sampled = np.array(sample, dtype=bool)
        sample_rows = cu[1:][sampled] - 1
        sample_seqs = np.flatnonzero(sampled).tolist()
        pin = self.device.type == "cuda"

        def dev(values: list[int] | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            t = torch.as_tensor(values, dtype=dtype)
            if pin:  # pinned staging: the host-to-device copy is asynchronous
                t = t.pin_memory()
            return t.to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=dev(slots, torch.int64),
            cu_seqlens_q=dev(cu, torch.int32),
            seq_lens=dev(seq_lens, torch.int32),
            block_tables=dev(padded, torch.int32),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            num_prefill_seqs=num_prefill_seqs,
            num_decode_seqs=len(query_lens) - num_prefill_seqs,
            query_lens_host=query_lens,
            seq_lens_host=seq_lens,
            num_prefill_tokens=int(cu[num_prefill_seqs]),
        )
        return StepInputs(
            dev(input_ids, torch.int64),
            dev(positions, torch.int64),
            meta,
            dev(sample_rows, torch.int64),
            sample_seqs,
        )

    # -- execution -----------------------------------------------------------------------
    def _execute(self, inputs: StepInputs) -> torch.Tensor:
        with forward_context(inputs.meta):
            if inputs.meta.num_prefill_seqs == 0:
                return self._run_decode(inputs.input_ids, inputs.positions, inputs.meta)
            return self._run_eager(inputs.input_ids, inputs.positions)

    def _run_eager(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.model(input_ids, positions)
        return hidden

    def _run_decode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Decode-only step (every query length is 1); hidden states [T, hidden], replayed
        from a captured CUDA graph when one fits (``meta`` is the current context)."""
        if self.graphs is not None and self.graphs.can_run(
            input_ids.shape[0], meta.block_tables.shape[1]
        ):
            return self.graphs.run(input_ids, positions, meta)
        return self._run_eager(input_ids, positions)

    @torch.inference_mode()
    def prefill_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [len, vocab] (fp32) at every position of one sequence, computed by one
        prefill into KV blocks 0, 1, ...: teacher forcing for accuracy checks. It overwrites
        those blocks, so no request may be running."""
        blocks = -(-len(token_ids) // self.block_size)
        if blocks > self.num_kv_blocks:
            raise EngineError(f"{len(token_ids)} tokens do not fit the KV cache")
        inputs = self._build_inputs([token_ids], [0], [list(range(blocks))], [True])
        return self.model.compute_logits(self._execute(inputs)).float()

    @torch.inference_mode()
    def forward_logits(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Logits [S, vocab] for the sequences that reach their last token this step, and
        their indices in ``batch.seqs``."""
        hidden = self._graph_decode_hidden(batch)
        if hidden is not None:  # every sequence samples its one new token
            return self.model.compute_logits(hidden), list(range(len(batch.seqs)))
        mixed = self._graph_mixed_hidden(batch)
        if mixed is not None:
            return self.model.compute_logits(mixed[0]), mixed[1]
        inputs = self.prepare(batch)
        hidden = self._execute(inputs)
        return self.model.compute_logits(hidden[inputs.sample_rows]), inputs.sample_seqs

    def _graph_decode_hidden(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """Hidden states [n, hidden] of a decode-only step through the captured graphs,
        staged from host lists without building a StepInputs; None if this step does not
        qualify (prefill chunks, a 1-token chunk that is not a sequence's last token, a
        batch or context larger than captured)."""
        graphs = self.graphs
        if graphs is None or batch.num_prefill_seqs or not batch.seqs:
            return None
        return graphs.stage_and_run(batch.seqs)

    def _graph_mixed_hidden(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]] | None:
        """Hidden states of the sampling rows of a step with prefill chunks through the
        mixed-step graphs, and their indices in ``batch.seqs``; None if it does not fit."""
        graphs = self.mixed_graphs
        if graphs is None or not batch.num_prefill_seqs:
            return None
        return graphs.stage_and_run(batch.seqs, batch.query_lens, batch.num_prefill_seqs)

    @torch.inference_mode()
    def draw(self, batch: ScheduledBatch) -> Drawn | None:
        """The sampling plan and random draws of a decode-only step (every sequence at its
        last token), made before it launches: a caller waiting on the host (a grammar mask
        being filled) draws now what ``launch(defer=True)`` would. None for other steps
        (which of their rows sample is settled at launch)."""
        seqs = batch.seqs
        if batch.num_prefill_seqs or not seqs:
            return None
        if any(s.num_computed_tokens + 1 != len(s.token_ids) for s in seqs):
            return None
        return self.sampler.draw(
            [s.sampling_params for s in seqs],
            [s.request_id for s in seqs],
            self.arch.vocab_size,
            self.device,
        )

    @torch.inference_mode()
    def launch(
        self, batch: ScheduledBatch, defer: bool = False, drawn: Drawn | None = None
    ) -> LaunchedStep:
        """Queue one step's forward pass and sampling on the device without waiting for it;
        ``collect`` returns its tokens. The host is free in between: it may schedule and
        launch the next step, whose input ids may be placeholders of this step's samples
        (``pending_token``, resolved on the device from ``last_tokens``). Nothing may change
        ``batch`` until this returns.

        ``defer``: queue the forward pass only; ``sample_deferred`` samples later, once the
        host knows what the sampling depends on (grammar masks, penalties need the tokens
        of the step before, which lands while this forward pass runs); ``drawn``: this
        step's ``draw``, if made before."""
        logits, rows = self.forward_logits(batch)
        if not rows:
            return LaunchedStep(None, rows)
        # rows are increasing indices into batch.seqs: all of them on decode steps.
        seqs = batch.seqs if len(rows) == len(batch.seqs) else [batch.seqs[i] for i in rows]
        if defer:
            # The random draws are made now (or were, by ``draw``), in launch order: the
            # deferred sampling then launches only what needs the host's mask or history.
            if drawn is None:
                drawn = self.sampler.draw(
                    [s.sampling_params for s in seqs],
                    [s.request_id for s in seqs],
                    logits.shape[-1],
                    self.device,
                )
            elif len(rows) != len(batch.seqs):
                raise EngineError("drawn for every sequence of a step that samples fewer")
            return LaunchedStep(None, rows, logits=logits, seqs=list(seqs), drawn=drawn)
        return self._sample(rows, logits, seqs, None)

    @torch.inference_mode()
    def sample_deferred(self, step: LaunchedStep, bitmask: torch.Tensor | None) -> LaunchedStep:
        """Sample a step launched with ``defer=True`` (``bitmask``: the host grammar mask of
        its rows, or None); the returned step replaces it. Must run before the next step is
        launched (that step reads these samples from ``last_tokens``)."""
        assert step.logits is not None and step.seqs is not None
        return self._sample(step.rows, step.logits, step.seqs, bitmask, step.drawn)

    def _sample(
        self,
        rows: list[int],
        logits: torch.Tensor,
        seqs: list[Sequence],
        bitmask: torch.Tensor | None,
        drawn: Drawn | None = None,
    ) -> LaunchedStep:
        params = [s.sampling_params for s in seqs]
        histories = [_history(s) for s in seqs] if any(needs_history(p) for p in params) else None
        mask = None if bitmask is None else bitmask_to_device(bitmask, self.device)
        sampled = self.sampler.sample_async(
            logits, params, [s.request_id for s in seqs], histories, mask, drawn
        )
        tokens = sampled.tokens
        self.last_tokens[: len(rows)].copy_(tokens)
        extras = None if sampled.logprobs is None else sampled[1:]
        if self.device.type != "cuda":
            return LaunchedStep(tokens, rows, logprobs=extras)  # type: ignore[arg-type]
        # Copied to pinned memory in stream order, right after the sampling: waiting for this
        # step later does not wait for a step launched after it.
        host = torch.empty(len(rows), dtype=torch.int64, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        host_extras = None if extras is None else tuple(_to_host(t) for t in extras)
        ready = torch.cuda.Event()
        ready.record()
        return LaunchedStep(host, rows, ready, logprobs=host_extras)  # type: ignore[arg-type]

    @staticmethod
    def collect_logprobs(step: LaunchedStep) -> list[TokenLogprobs] | None:
        """Each row's sampled-token logprob and its top alternatives (call after
        ``collect``); None if no row of the step asked for logprobs."""
        if step.logprobs is None:
            return None
        chosen, top_ids, top_lps = step.logprobs
        ids = top_ids.tolist() if top_ids is not None else None
        lps = top_lps.tolist() if top_lps is not None else None
        return [
            TokenLogprobs(lp, [] if ids is None else list(zip(ids[i], lps[i], strict=True)))  # type: ignore[index]
            for i, lp in enumerate(chosen.tolist())
        ]

    @staticmethod
    def collect(step: LaunchedStep) -> list[int]:
        """The sampled token of each row of a launched step (``step.rows`` says which
        sequence each belongs to); waits for the device to finish that step only."""
        if step.tokens is None:
            return []
        if step.ready is not None:
            step.ready.synchronize()
        tokens: list[int] = step.tokens.tolist()
        return tokens
