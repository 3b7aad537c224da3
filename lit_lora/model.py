"""A LLaMA-family decoder in plain PyTorch, meant to be read top to bottom.

RMSNorm -> grouped-query attention with rotary embeddings -> RMSNorm -> gated MLP, repeated, then a final
norm and the output head. Module names follow Hugging Face's `LlamaForCausalLM` (without its `model.`
prefix), so converting checkpoints is a rename of at most one prefix.

Qwen, Gemma, Phi, Granite and Mistral are the same decoder with a few differences each; every difference is
one named field of `Config` (default: what Llama does), never a subclass. convert/hf.py reads them from each
family's config.json.

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
from torch.utils.checkpoint import checkpoint, noop_context_fn

from lit_lora.errors import UserError
from lit_lora.presets import PRESETS


@dataclass
class Config:
    vocab_size: int = 32000
    dim: int = 4096  # model width C
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads (plain multi-head)
    head_dim: int | None = None  # None means dim // n_heads (Gemma and Qwen 3 set it explicitly)
    hidden_dim: int = 11008  # gated-MLP width
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    # Frequency scaling: Llama 3's {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; {"rope_type": "linear", "factor"} (Gemma 3); {"rope_type": "longrope",
    # "short_factor", "long_factor", "original_max_position_embeddings", "attention_factor"} (Phi 3); None: plain.
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096  # context length the model was trained for
    tie_embeddings: bool = False  # output head shares the token embedding matrix
    attention_bias: bool = False
    mlp_bias: bool = False
    name: str = ""
    family: str = "llama"  # the Hugging Face model_type it converts to and from (convert/hf.py)
    # --- where the families differ (each default is Llama's) ---
    qkv_bias: bool | None = None  # Qwen 2: bias on q, k and v but not on o; None: attention_bias decides all four
    qk_norm: bool = False  # Qwen 3, Gemma 3: RMSNorm over each head of q and k, before RoPE
    rope_dim: int | None = None  # Phi-4-mini: only the first rope_dim dims of a head rotate; None: all of head_dim
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + w), in fp32 (w is stored zero-centred)
    embedding_multiplier: float = 1.0  # Gemma: sqrt(dim); Granite: its embedding_multiplier
    mlp_activation: str = "silu"  # Gemma: "gelu_tanh" (GELU, tanh approximation) gates the MLP
    sandwich_norms: bool = False  # Gemma 2/3: the attention and MLP outputs are normed too, before the residual add
    attention_scale: float | None = None  # None: head_dim ** -0.5; Gemma: query_pre_attn_scalar ** -0.5; Granite
    attn_softcap: float | None = None  # Gemma 2: attention scores -> c * tanh(scores / c)
    final_softcap: float | None = None  # Gemma 2: logits -> c * tanh(logits / c)
    sliding_window: int | None = None  # Mistral, Gemma 2/3: a local layer attends this many tokens back (itself incl.)
    local_layers: list[int] | None = None  # which layers are local when sliding_window is set; None: all (Mistral)
    rope_local_base: float | None = None  # Gemma 3: local layers' RoPE base (unscaled); None: rope_base
    residual_multiplier: float = 1.0  # Granite: each block's two branches are scaled before the residual add
    logits_scaling: float = 1.0  # Granite: logits are divided by this

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.rope_dim is None:
            self.rope_dim = self.head_dim
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.mlp_activation not in ACTIVATIONS:
            raise UserError(f"unknown mlp_activation {self.mlp_activation!r}; use one of {', '.join(ACTIVATIONS)}")
        self._check_rope()

    def _check_rope(self) -> None:
        """Rotate-half RoPE pairs a head's rotated dims up in halves, and LongRoPE has one factor per pair: sizes
        that do not fit would fail (or rotate nothing) only once the model runs."""
        if self.rope_dim % 2 or not 2 <= self.rope_dim <= self.head_dim:
            raise UserError(f"rope_dim ({self.rope_dim}) must be an even number from 2 to head_dim ({self.head_dim}); "
                            f"check head_dim and partial_rotary_factor")
        s = self.rope_scaling or {}
        for key in ("short_factor", "long_factor") if s.get("rope_type") == "longrope" else ():
            if len(s[key]) != self.rope_dim // 2:
                raise UserError(f"LongRoPE's {key} has {len(s[key])} entries; the {self.rope_dim} rotated dims of a "
                                f"head (rope_dim) need {self.rope_dim // 2}, one per pair")

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

    def is_local(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window."""
        return self.sliding_window is not None and (self.local_layers is None or layer in self.local_layers)


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedProduct(torch.autograd.Function):
    """act(gate) * up, keeping only gate and up for the backward pass. Autograd would also keep act(gate), one more
    (tokens x hidden_dim) tensor per layer: about a sixth of a SmolLM2 step's saved activations. The backward
    recomputes it, an elementwise pass, with the same kernels, so the gradients are bit-identical."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            g = gate.detach().requires_grad_()
            a = ctx.act(g)
        (grad_gate,) = torch.autograd.grad(a, g, grad * up)
        return grad_gate, grad * a.detach(), None


def gated(act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up (the MLP's gated product), through GatedProduct when it will be differentiated."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return GatedProduct.apply(gate, up, act)
    return act(gate) * up


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma scales in fp32, by 1 + w
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        # Normalise in fp32 for stability, then scale in the weight's dtype (as LLaMA does).
        return self.weight * x32.to(x.dtype)


def norm(c: Config, dim: int | None = None) -> RMSNorm:
    return RMSNorm(dim or c.dim, c.norm_eps, c.norm_unit_offset)


def rope_inv_freq(config: Config, local: bool = False, long: bool = False) -> torch.Tensor:
    """Inverse frequencies (rope_dim/2,) in fp32: a local layer's (Gemma 3: its own base, unscaled), else the
    global ones with the configured scaling (`long`: LongRoPE's factors for positions past its original context)."""
    d = config.rope_dim
    base = config.rope_local_base if local and config.rope_local_base else config.rope_base
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    s = None if local else config.rope_scaling
    if not s:
        return inv_freq
    kind = s.get("rope_type", "llama3")
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "longrope":
        return inv_freq / torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"]
    )
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for `positions` ((T,) or (B, T)), shaped (T, R) or (B, 1, T, R) to broadcast over heads
    (R the rotated dims); LongRoPE scales both by its attention factor."""
    freqs = positions.float()[..., None] * inv_freq  # (..., T, R/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: first and second halves pair up
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    cos, sin = cos.to(dtype), sin.to(dtype)
    if positions.dim() == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head; the rest pass through (partial rotary)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
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
        qkv_bias = c.attention_bias if c.qkv_bias is None else c.qkv_bias
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=c.attention_bias)
        if c.qk_norm:
            self.q_norm, self.k_norm = norm(c, c.head_dim), norm(c, c.head_dim)
        self.scale = c.attention_scale if c.attention_scale is not None else c.head_dim**-0.5
        self.softcap = c.attn_softcap
        self.plain_decode = False  # fast_decode sets it: one-token steps skip SDPA's fixed cost per call
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos):
        q, k, v = self.qkv(x)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.attend(q, k, v, mask, input_pos)

    def qkv(self, x):
        """q (B, H, T, D), k and v (B, G, T, D)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q, k, v, mask, input_pos):
        """q (B, H, T, D) attends the cached keys and values and k, v (B, G, T, D); then the output projection."""
        B, _, T, _ = q.shape
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]  # only the positions written so far
        if self.softcap is not None or (self.plain_decode and T == 1 and self.kv_cache is not None):
            y = plain_attention(q, k, v, mask, self.scale, self.softcap)
        else:
            y = F.scaled_dot_product_attention(
                q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=mask is None, scale=self.scale,
                enable_gqa=self.n_heads != self.n_kv_heads,
            )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def plain_attention(q, k, v, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """Attention written out in fp32, for what SDPA cannot do (soft-capped scores) or does slowly (one query on
    CPU). q (B, H, T, D), k and v (B, G, S, D), mask bool or additive, broadcastable to (B, 1, T, S)."""
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    # The H/G query heads sharing a key/value head become rows of one product (SDPA's enable_gqa, no copies).
    scores = q.reshape(B, G, H // G * T, D).float() @ k.float().transpose(-1, -2) * scale  # (B, G, H/G*T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = causal_mask(torch.arange(S - T, S, device=q.device), S)
    bias = additive_mask(mask, scores.dtype) if mask.dtype == torch.bool else mask
    bias = bias.unsqueeze(2) if bias.dim() == 4 else bias  # (B, 1, 1, T, S) against (B, G, H/G, T, S)
    probs = torch.softmax(scores.view(B, G, H // G, T, S) + bias, dim=-1).view(B, G, H // G * T, S)
    return (probs @ v.float()).view(B, H, T, D).to(q.dtype)


class MLP(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.hidden_dim, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.dim, c.hidden_dim, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.hidden_dim, c.dim, bias=c.mlp_bias)
        self.act = ACTIVATIONS[c.mlp_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated(self.act, self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, c: Config, layer: int) -> None:
        super().__init__()
        self.input_layernorm = norm(c)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = norm(c)  # Llama: the MLP's input; sandwich norms: the attention's output
        if c.sandwich_norms:
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(c), norm(c)
        self.mlp = MLP(c)
        self.local = c.is_local(layer)
        self.residual_multiplier = c.residual_multiplier

    def forward(self, x, cos, sin, mask, input_pos):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        if hasattr(self, "pre_feedforward_layernorm"):
            x = x + self.scaled(self.post_attention_layernorm(h))
            return x + self.scaled(self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))))
        x = x + self.scaled(h)
        return x + self.scaled(self.mlp(self.post_attention_layernorm(x)))

    def scaled(self, h: torch.Tensor) -> torch.Tensor:
        # Skipped at 1.0: a multiply by one still costs a pass over the activations in every block.
        return h if self.residual_multiplier == 1.0 else h * self.residual_multiplier


class LLaMA(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = norm(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        self.inv_freq: dict = {}  # (local, long, device) -> fp32 tensor; plain attributes, never in the state dict
        self.gradient_checkpointing = False
        # What a recomputed block must restore beyond torch's generator (several adapters' own, multi_lora).
        self.recompute_context = noop_context_fn
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
                (nn.init.zeros_ if module.unit_offset else nn.init.ones_)(module.weight)
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

    def rope(self, input_pos: torch.Tensor, dtype: torch.dtype, local: bool) -> tuple[torch.Tensor, torch.Tensor]:
        s = {} if local else self.config.rope_scaling or {}
        # LongRoPE switches to its long factors once a position passes the original context, as transformers does.
        long = s.get("rope_type") == "longrope" and int(input_pos.max()) >= s["original_max_position_embeddings"]
        key = (local, long, input_pos.device)
        if key not in self.inv_freq:
            self.inv_freq[key] = rope_inv_freq(self.config, local, long).to(input_pos.device)
        return rope_cos_sin(input_pos, self.inv_freq[key], dtype, s.get("attention_factor", 1.0))

    def hidden_states(
        self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) for tokens `idx` (B, T).

        input_pos: the position of each token, (T,) or (B, T); default 0..T-1. With a KV cache it is required,
          (T,), and also says where in the cache the new keys go.
        mask: bool, or additive (0 or -inf), broadcastable to (B, 1, T, S), True where a query may attend a key;
          default causal. With a cache, S is the number of cache positions to attend (the slice [0, S)).
        """
        B, T = idx.shape
        c = self.config
        if input_pos is None:
            if self.cache_len:
                raise ValueError("input_pos is required when a KV cache is set")
            input_pos = torch.arange(T, device=idx.device)
        if self.cache_len and mask is None:
            mask = causal_mask(input_pos, int(input_pos[-1]) + 1)
        x = self.embed_tokens(idx)
        if c.embedding_multiplier != 1.0:  # rounded to the activations' dtype first, as Gemma does (Granite's 12 too)
            x = x * torch.tensor(c.embedding_multiplier, dtype=x.dtype)
        rope = {False: self.rope(input_pos, x.dtype, local=False)}
        masks = {False: mask}
        if c.sliding_window is not None:
            rope[True] = self.rope(input_pos, x.dtype, local=True) if c.rope_local_base else rope[False]
            # Keys are cache slots (with a cache) or token indices: either way, distance counts tokens.
            query_slots = input_pos if self.cache_len else torch.arange(T, device=idx.device)
            masks[True] = window_mask(mask, query_slots, mask.shape[-1] if mask is not None else T, c.sliding_window)
        for block in self.layers:
            (cos, sin), block_mask = rope[block.local], masks[block.local]
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, block_mask, input_pos, use_reentrant=False,
                               context_fn=self.recompute_context)
            else:
                x = block(x, cos, sin, block_mask, input_pos)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output head on hidden states (Granite divides the logits, Gemma 2 soft-caps them)."""
        y = self.lm_head(h)
        if self.config.logits_scaling != 1.0:
            y = y / self.config.logits_scaling
        if self.config.final_softcap is not None:
            y = torch.tanh(y / self.config.final_softcap) * self.config.final_softcap
        return y

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab)."""
        return self.logits(self.hidden_states(idx, input_pos, mask))


def causal_mask(input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(T, S) bool: the query at position p may attend keys at positions 0..p."""
    return torch.arange(kv_len, device=input_pos.device)[None, :] <= input_pos[:, None]


def window_mask(mask: torch.Tensor | None, query_slots: torch.Tensor, kv_len: int, window: int) -> torch.Tensor | None:
    """`mask` (default causal) restricted to the `window` keys up to and including each query's own slot;
    None (plain causal) when no query reaches back further than the window."""
    if mask is None and kv_len <= window:
        return None
    near = torch.arange(kv_len, device=query_slots.device) > query_slots[..., None] - window  # ([B,] T, S)
    near = near[:, None] if near.dim() == 3 else near  # per-row slots (serving): (B, 1, T, S)
    if mask is None:
        return causal_mask(query_slots, kv_len) & near
    if mask.dtype == torch.bool:
        return mask & near
    return mask.masked_fill(~near, float("-inf"))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask as an additive bias: 0 where attending is allowed, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
