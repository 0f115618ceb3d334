"""Llama-family decoder: Llama / SmolLM2, Qwen2 / Qwen2.5 (qkv bias), Qwen3 (per-head q/k
RMSNorm, explicit head_dim), DeepSeek-R1-Distill-{Llama,Qwen}.

Shapes are flattened over the batch: every tensor is [num_tokens, ...], one step's tokens of
all sequences back to back; attention metadata comes from the forward context. q/k/v and
gate/up projections are fused (one matmul each); ``load_weights`` splices the HF tensors in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gpu_engine.errors import EngineError
from gpu_engine.layers.activation import SiluAndMul
from gpu_engine.layers.attention import Attention
from gpu_engine.layers.base import AttentionBackend
from gpu_engine.layers.norm import RMSNorm
from gpu_engine.layers.parallel import ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from gpu_engine.layers.rotary import RotaryEmbedding

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class LlamaArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_parameters: dict[str, Any]
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaArchConfig:
        """Read a HF ``config.json`` dict (transformers 4.x ``rope_scaling``/``rope_theta`` or
        5.x ``rope_parameters``)."""
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise EngineError(
                f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise EngineError(f"hidden_act {cfg.get('hidden_act')!r} is not supported")
        num_heads = int(cfg["num_attention_heads"])
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope_parameters=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias (and no o bias); Llama/Qwen3 follow attention_bias.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )


class LlamaAttention(nn.Module):
    def __init__(
        self, cfg: LlamaArchConfig, backend: AttentionBackend, rotary_emb: RotaryEmbedding
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias)
        self.o_proj = RowParallelLinear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rotary_emb = rotary_emb  # shared by all layers (one cos/sin table)
        self.attn = Attention(
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5, backend
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        o = self.attn(q, k, v)  # [T, H, D]
        return self.o_proj(o.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaArchConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: LlamaArchConfig, backend: AttentionBackend, rotary_emb: RotaryEmbedding
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, backend, rotary_emb)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: this layer's input before its residual add ([T, hidden]); residual: the running
        residual stream (None for the first layer). Each add is fused into the following
        RMSNorm (same rounding as ``h = residual + x`` in the model dtype)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaArchConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        # One table for every layer: [max_position, head_dim] cos and sin in fp32 (tens of MB
        # for long-context models, so never per layer).
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_parameters)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, backend, rotary) for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        h, _ = self.norm(h, residual)
        return h


# HF checkpoint name -> (our fused parameter, shard index within it).
_PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaArchConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, backend)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] (only positions that sample) -> logits [N, vocab]."""
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def _shard_bounds(self, fused: str, shard: int) -> tuple[int, int]:
        cfg = self.config
        if fused == "gate_up_proj":
            return shard * cfg.intermediate_size, cfg.intermediate_size
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [(0, q), (q, kv), (q + kv, kv)][shard]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in (cast to our dtype/device); error on missing/unknown."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the embedding is the head
            parts = name.split(".")
            packed = next((p for p in parts if p in _PACKED), None)
            if packed is not None:
                fused, shard = _PACKED[packed]
                target = ".".join(fused if p == packed else p for p in parts)
                offset, size = self._shard_bounds(fused, shard)
                param = self._param(params, target)
                if tensor.shape[0] != size:
                    raise EngineError(f"{name}: expected {size} rows, got {tuple(tensor.shape)}")
                param.narrow(0, offset, size).copy_(tensor)
                loaded.add(f"{target}#{shard}")
            else:
                param = self._param(params, name)
                if param.shape != tensor.shape:
                    raise EngineError(f"{name}: shape {tuple(tensor.shape)} != {param.shape}")
                param.copy_(tensor)
                loaded.add(name)
        missing = [n for n in params if not self._is_loaded(n, loaded)]
        if missing:
            raise EngineError(f"checkpoint is missing weights: {missing[:8]}")

    @staticmethod
    def _param(params: dict[str, nn.Parameter], name: str) -> nn.Parameter:
        if name not in params:
            raise EngineError(f"unexpected weight {name!r} in checkpoint")
        return params[name]

    @staticmethod
    def _is_loaded(name: str, loaded: set[str]) -> bool:
        if name in loaded:
            return True
        if ".qkv_proj." in name:
            return all(f"{name}#{i}" in loaded for i in range(3))
        if ".gate_up_proj." in name:
            return all(f"{name}#{i}" in loaded for i in range(2))
        return False
