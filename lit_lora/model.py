"""A LLaMA-family decoder in plain PyTorch, meant to be read top to bottom.

RMSNorm -> grouped-query attention with rotary embeddings -> RMSNorm -> SwiGLU MLP, repeated, then a final
norm and the output head. Module names follow Hugging Face's `LlamaForCausalLM` (without its `model.`
prefix), so converting checkpoints is a rename of at most one prefix.

Shapes: B batch, T new tokens, S key length (T, or the cache length when generating), H query heads,
G key/value heads (groups), D head size, C model width.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lit_lora.errors import UserError


@dataclass
class Config:
    vocab_size: int = 32000
    dim: int = 4096  # model width C
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads (plain multi-head)
    head_dim: int | None = None  # None means dim // n_heads
    hidden_dim: int = 11008  # SwiGLU width
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    # Llama-3 frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict[str, float] | None = None
    max_seq_len: int = 4096  # context length the model was trained for
    tie_embeddings: bool = False  # output head shares the token embedding matrix
    attention_bias: bool = False
    mlp_bias: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        key = name.lower()
        if key not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], "name": name, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], name: str = "") -> "Config":
        """From a Hugging Face `config.json` of a LlamaForCausalLM (or the same layout under another name)."""
        archs, model_type = hf.get("architectures") or [], hf.get("model_type")
        type_ok, archs_ok = model_type in HF_MODEL_TYPES, any(a in HF_ARCHITECTURES for a in archs)
        if not type_ok and not archs_ok:
            raise UserError(
                f"unsupported architecture {archs or model_type!r}: lit-lora reads LLaMA-layout models "
                f"({', '.join(HF_ARCHITECTURES)})"
            )
        others = [a for a in archs if a not in HF_ARCHITECTURES]
        if others or (model_type is not None and not type_ok):  # one says LLaMA, the other something else
            raise UserError(
                f"config.json contradicts itself: model_type {model_type!r} but architectures {archs}; lit-lora "
                f"reads LLaMA-layout models only ({', '.join(HF_ARCHITECTURES)}), so check which model this is"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"unsupported hidden_act {hf['hidden_act']!r}: LLaMA uses silu")
        # transformers 5 writes rope settings under "rope_parameters"; older versions use rope_theta/rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        base = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        kind = rope.pop("rope_type", rope.pop("type", "default"))
        if kind not in ("default", "llama3"):
            raise UserError(f"unsupported rope scaling type {kind!r}: lit-lora supports plain and llama3 RoPE")
        scaling = None
        if kind == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            scaling = {k: float(rope[k]) for k in keys}
        n_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            hidden_dim=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_base=float(base),
            rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            name=name,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` transformers needs to load this model as LlamaForCausalLM."""
        rope: dict[str, Any] = {"rope_type": "llama3", **self.rope_scaling} if self.rope_scaling else {}
        if rope:
            rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_base,
            "rope_scaling": rope or None,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
        }


HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
HF_MODEL_TYPES = ("llama", "mistral")  # the model_type values of those architectures

# The Llama 3 scaling constants every released Llama 3.x model uses (only `factor` varies between them).
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0}
_SMOLLM2 = dict(vocab_size=49152, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True)
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(_SMOLLM2, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, rope_base=100000.0),
    "smollm2-360m": dict(_SMOLLM2, dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560, rope_base=100000.0),
    "smollm2-1.7b": dict(_SMOLLM2, dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192, rope_base=130000.0),
    "tinyllama-1.1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048),
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=4096),
    "llama-2-13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, max_seq_len=4096),
    "llama-3.2-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                         rope_base=500000.0, rope_scaling=dict(LLAMA3_ROPE, factor=32.0), max_seq_len=131072, tie_embeddings=True),
    "llama-3.2-3b": dict(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192,
                         rope_base=500000.0, rope_scaling=dict(LLAMA3_ROPE, factor=32.0), max_seq_len=131072, tie_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                         rope_base=500000.0, rope_scaling=dict(LLAMA3_ROPE, factor=8.0), max_seq_len=131072),
    # Mistral-7B-v0.1's layout; its 4096-token sliding window is not applied (attention is full-context).
    "mistral-7b-v0.1": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, max_seq_len=32768),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability, then scale in the weight's dtype (as LLaMA does).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: Config) -> torch.Tensor:
    """Inverse frequencies (D/2,) in fp32, with Llama-3 scaling of the low frequencies when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    s = config.rope_scaling
    if s:
        low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
        high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
        smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
            s["high_freq_factor"] - s["low_freq_factor"]
        )
        smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for `positions` ((T,) or (B, T)), shaped (T, D) or (B, 1, T, D) to broadcast over heads."""
    freqs = positions.float()[..., None] * inv_freq  # (..., T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: first and second halves pair up
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    if positions.dim() == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Preallocated keys and values (B, G, S_max, D), written at the positions of the new tokens."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=c.attention_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.attend(q, k, v, mask, input_pos)

    def attend(self, q, k, v, mask, input_pos):
        """q (B, H, T, D) attends the cached keys and values and k, v (B, G, T, D); then the output projection."""
        B, _, T, _ = q.shape
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]  # only the positions written so far
        y = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=mask is None,
            enable_gqa=self.n_heads != self.n_kv_heads,
        )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.hidden_dim, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.dim, c.hidden_dim, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.hidden_dim, c.dim, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, input_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaMA(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        self.inv_freq = rope_inv_freq(config)  # a plain attribute: never cast to bf16, never in the state dict
        self.gradient_checkpointing = False
        self.cache_len = 0  # >0 once set_kv_cache() has allocated caches

    def tie_weights(self) -> None:
        """Share the head with the embedding when configured (call again after assigning new tensors)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self, seed: int | None = None) -> None:
        """Random init for models trained or tested from scratch (checkpoints overwrite all of it)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    w = torch.randn(module.weight.shape, generator=gen) * 0.02
                    module.weight.copy_(w)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.tie_weights()

    def set_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Allocate (or, with batch_size=0, free) a key/value cache of `max_len` positions in every layer."""
        max_len = min(max_len or self.config.max_seq_len, self.config.max_seq_len)
        param = self.embed_tokens.weight
        for block in self.layers:
            attn = block.self_attn
            attn.kv_cache = None if batch_size == 0 else KVCache(
                batch_size, max_len, attn.n_kv_heads, attn.head_dim, dtype or param.dtype, param.device
            )
        self.cache_len = 0 if batch_size == 0 else max_len

    def hidden_states(
        self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) for tokens `idx` (B, T).

        input_pos: the position of each token, (T,) or (B, T); default 0..T-1. With a KV cache it is required,
          (T,), and also says where in the cache the new keys go.
        mask: bool, broadcastable to (B, 1, T, S), True where a query may attend a key; default causal.
          With a cache, S is the number of cache positions to attend (the slice [0, S)).
        """
        B, T = idx.shape
        if input_pos is None:
            if self.cache_len:
                raise ValueError("input_pos is required when a KV cache is set")
            input_pos = torch.arange(T, device=idx.device)
        if self.cache_len and mask is None:
            mask = causal_mask(input_pos, int(input_pos[-1]) + 1)
        if self.inv_freq.device != idx.device:
            self.inv_freq = self.inv_freq.to(idx.device)
        x = self.embed_tokens(idx)
        cos, sin = rope_cos_sin(input_pos, self.inv_freq, x.dtype)
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, input_pos)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab)."""
        return self.lm_head(self.hidden_states(idx, input_pos, mask))


def causal_mask(input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(T, S) bool: the query at position p may attend keys at positions 0..p."""
    return torch.arange(kv_len, device=input_pos.device)[None, :] <= input_pos[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask as an additive bias: 0 where attending is allowed, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
