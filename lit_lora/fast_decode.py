"""Speed-only transforms of a loaded model for decoding, with the same math: fused projections and
weights pre-packed for oneDNN. Decoding one token is matrix-vector work bound by memory bandwidth, so one
larger product that streams the weights in a blocked layout beats several small ones.

`prepare_for_generation` applies them; `repack` rebuilds the packed weights after an adapter was merged or
restored. The decode loop itself is in generate.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lit_lora.lora import LoRALinear
from lit_lora.model import MLP, Attention, Config, LLaMA
from lit_lora.quantize import Int8Linear


def fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One linear computing `linears` side by side (outputs concatenated).

    The originals' weights become views into the fused weight, so writing to them (merging an adapter,
    restoring the base) updates the fused layer too, and no second copy is kept.
    """
    fused = nn.Linear(linears[0].in_features, sum(l.out_features for l in linears),
                      bias=linears[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(torch.cat([l.weight.detach() for l in linears]), requires_grad=False)
    for layer, view in zip(linears, fused.weight.split([l.out_features for l in linears])):
        layer.weight = nn.Parameter(view, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([l.bias.detach() for l in linears]), requires_grad=False)
        for layer, view in zip(linears, fused.bias.split([l.out_features for l in linears])):
            layer.bias = nn.Parameter(view, requires_grad=False)
    return fused


class FusedAttention(Attention):
    """Attention shaped for decoding: q, k and v from one matmul (a single-token step is a matrix-vector
    product bound by memory bandwidth, and one larger product streams the weights faster than three small
    ones), and the plain fp32 attention for the one-token step, where SDPA's CPU kernel has a large fixed cost
    per call that grows with the cache length."""

    def __init__(self, attn: Attention, config: Config) -> None:
        with torch.device("meta"):  # the parent sets every field; its fresh projections are replaced below
            super().__init__(config)
        for name, module in attn.named_children():  # the projections, and q_norm / k_norm where the family has them
            setattr(self, name, module)
        self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        self.plain_decode = attn.o_proj.weight.device.type == "cpu"  # SDPA's fixed cost is the CPU kernel's

    def qkv(self, x):
        B, T, _ = x.shape
        H, G, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * G, D).transpose(1, 2)  # (B, H + 2G, T, D)
        return qkv[:, :H], qkv[:, H : H + G], qkv[:, H + G :]


class FusedMLP(MLP):
    """The SwiGLU MLP with gate and up projections in one matmul (see FusedAttention)."""

    def __init__(self, mlp: MLP, config: Config) -> None:
        with torch.device("meta"):
            super().__init__(config)
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class PackedLinear(nn.Linear):
    """An nn.Linear (the same weight and bias tensors) that multiplies with a copy of its weight pre-packed
    in oneDNN's blocked layout, as torch.compile's CPU backend does: a one-token step then streams the
    weights faster (README, benchmarks/generate_speed.py), with bit-identical results. Call `repack` after
    the weight changes. (torch.ops.mkldnn is PyTorch's internal oneDNN binding: used only when available.)
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # shared, not copied
        self.repack()

    def repack(self) -> None:
        # A plain attribute, not a buffer: it never goes into a state dict and is rebuilt, not converted.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)  # 1: tuned for M=1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepare_for_generation(model: LLaMA, pack: bool = True) -> LLaMA:
    """Inference-only transform, same math: fused q/k/v and gate/up matmuls, pre-packed weights on CPU.

    The parameter names of the original layers still resolve (to the same tensors or to views of the
    fused ones), so adapters merge into the model as before; call `repack` after merging. torch.compile
    cannot trace the packed weights (it packs its own), so `pack=False` with --compile.
    """
    for block in model.layers:
        if isinstance(block.self_attn.q_proj, LoRALinear) or isinstance(block.mlp.gate_proj, LoRALinear):
            raise ValueError("merge LoRA layers before preparing for generation (the fused matmuls skip them)")
        block.self_attn = FusedAttention(block.self_attn, model.config)
        block.mlp = FusedMLP(block.mlp, model.config)
    weight = model.embed_tokens.weight
    if pack and weight.device.type == "cpu" and can_pack(weight.dtype):
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            attn.qkv_proj, attn.o_proj = PackedLinear(attn.qkv_proj), PackedLinear(attn.o_proj)
            mlp.gate_up_proj, mlp.down_proj = PackedLinear(mlp.gate_up_proj), PackedLinear(mlp.down_proj)
        model.lm_head = PackedLinear(model.lm_head)
    return model


def repack(model: LLaMA) -> None:
    """Rebuild the packed (or int8) weights after the plain ones changed (an adapter merged or restored)."""
    for module in model.modules():
        if isinstance(module, (PackedLinear, Int8Linear)):
            module.repack()
