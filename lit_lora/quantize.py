"""Quantised base weights: NF4 for QLoRA training and decoding (through torchao), int8 for decoding.

NF4 quantises the frozen linear weights of the transformer blocks (q/k/v/o and the MLP's projections: all but a
few percent of a 7B model's bytes); the embeddings, norms and the head keep the base dtype. int8 quantises the
head too (for a small model the largest matrix a decode step reads).

- **nf4** (QLoRA): 4-bit NormalFloat codes in blocks of 64 weights, each block's absmax scale itself quantised
  to int8 in groups (double quantisation): about 0.26x the bf16 bytes. The tensor is torchao's NF4Tensor (it
  implements FSDP2's all-gather hooks and its own dequantising F.linear); its codes (`to_nf4`) and its product
  (`dequantized`, `linear`) are computed here, bit for bit as torchao does, 3-4x faster on a CPU. Quantised
  while loading, one tensor at a time (`quantize_weight`), so a run never holds the full-precision model.
- **int8** (decoding only): per-output-channel symmetric int8, multiplied by PyTorch's weight-only int8 kernel
  as gpt-fast does, after fast_decode's fusions. `Int8Linear` keeps the layer's own weight beside the int8 copy
  so that adapters can be merged and restored and the copy rebuilt (`repack`), like fast_decode.PackedLinear.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from typing import Any, TextIO

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_lora.errors import UserError

QUANTIZATIONS = ("none", "nf4", "int8")
TRAIN_QUANTIZATIONS = ("none", "nf4")  # int8 here is a decoding format: nothing trains over it
INSTALL_TORCHAO = "pip install 'lit-lora[qlora]' (or pip install torchao)"
NF4_BLOCK = 64  # weights per absmax scale (the QLoRA paper's and torchao's default)
NF4_SCALER_BLOCK = 256  # absmax scales per double-quantisation group, fewer where the count does not divide
NF4_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what torchao's NF4 dequantises into
# The frozen linear weights of the blocks, by parameter name: what is quantised.
_QUANTIZED = re.compile(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")


def check_quantize(name: str | None, choices: tuple[str, ...] = QUANTIZATIONS, what: str = "--quantize") -> str:
    """`name` if it is one of `choices` (None reads as none), else the one-line refusal."""
    name = "none" if name is None else name
    if name not in choices:
        hint = " (int8 is for decoding; train over nf4)" if name in QUANTIZATIONS else ""
        raise UserError(f"unknown {what} {name!r}{hint}; use one of {', '.join(choices)}")
    return name


def decoding_quantize(quantize: str | None, metas: list[dict[str, Any]], log: TextIO | None = None) -> str:
    """--quantize as given, or (None) the base the adapters (their recorded configs) were trained over: nf4 for
    QLoRA adapters (said on `log`), so that they answer over the weights they learnt beside."""
    if quantize is not None:
        return _available(check_quantize(quantize))
    recorded = {meta.get("base_quantize") or "none" for meta in metas}
    if len(recorded) > 1:
        raise UserError(f"the adapters were trained over different bases ({' and '.join(sorted(recorded))}); "
                        f"pass --quantize to choose one for all of them")
    chosen = _available(recorded.pop() if recorded else "none")
    if chosen != "none" and log is not None:
        print(f"quantize {chosen}: the base the adapter was trained over (--quantize none for the original weights)",
              file=log)
    return chosen


def _available(quantize: str) -> str:
    if quantize == "nf4":
        torchao_nf4()  # installed, or the line saying how
    return quantize


def is_quantized_weight(name: str) -> bool:
    return _QUANTIZED.fullmatch(name) is not None


# ---------------------------------------------------------------------------------------------- nf4
def torchao_nf4() -> Any:
    """torchao's `to_nf4`, or the line saying how to install it. torchao logs at import about its CUDA-only
    kernels failing to load on a CPU build of torch: harmless, and hidden here."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.ERROR)
        from torchao.quantization import to_nf4
    except ImportError:
        raise UserError(f"quantize nf4 needs torchao, which is not installed: {INSTALL_TORCHAO}") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return to_nf4


def is_nf4(t: torch.Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor"  # by name: checking needs no torchao import


def scaler_block(n_blocks: int) -> int:
    """The double-quantisation group: NF4_SCALER_BLOCK scales, or the largest count below it that divides the
    number of blocks (SmolLM2's 576 x 576 weights have 5184 blocks, which 256 does not divide)."""
    return next(s for s in range(min(NF4_SCALER_BLOCK, n_blocks), 0, -1) if n_blocks % s == 0)


def to_nf4(name: str, weight: torch.Tensor) -> torch.Tensor:
    """`weight` as an NF4 tensor that dequantises into its own dtype; one line for what NF4 cannot hold."""
    if weight.dtype not in NF4_DTYPES:
        raise UserError(f"quantize nf4: {name} is {weight.dtype}, and NF4 dequantises only into bf16, fp16 or "
                        f"fp32; load the base in one of those (precision)")
    if weight.numel() % NF4_BLOCK:
        raise UserError(f"quantize nf4: {name} has {weight.numel()} weights, not a multiple of the NF4 block of "
                        f"{NF4_BLOCK}; this model cannot be quantised to nf4, train it without quantize")
    weight, n_blocks = weight.detach().contiguous(), weight.numel() // NF4_BLOCK
    template, group = _nf4_template(weight.dtype), scaler_block(n_blocks)
    table = template.nf4.to(weight.device, copy=True)
    scalers, factor, mean = type(template).double_quantize_scalers(weight.flatten(), NF4_BLOCK, group)
    inner = {"quantized_data": _nf4_codes(weight, table), "scaler_mean": mean, "quantization_factor": factor,
             "quantized_scalers": scalers, "nf4": table}
    _, ctx = template.__tensor_flatten__()
    meta = dataclasses.replace(ctx["tensor_meta"], original_shape=weight.shape, original_strides=weight.stride(),
                               device=weight.device)
    ctx = {**ctx, "n_blocks": n_blocks, "scaler_block_size": group, "tensor_meta": meta}
    return type(template).__tensor_unflatten__(inner, ctx, weight.shape, weight.stride())


@functools.cache
def _nf4_template(dtype: torch.dtype) -> torch.Tensor:
    """torchao's NF4 tensor of one block in `dtype`: its code table, and the layout a new one is built from."""
    return torchao_nf4()(torch.ones(NF4_BLOCK, dtype=dtype), NF4_BLOCK, 1)


def _nf4_codes(weight: torch.Tensor, table: torch.Tensor, chunk_blocks: int = 2**14) -> torch.Tensor:
    """Each weight's nearest code in `table` after its block's absmax scaling, two codes to a byte: torchao's
    codes bit for bit, about 3x faster (a 5632 x 2048 weight in 0.6 s, not 1.8). torchao measures the distance
    to all 16 codes in the weight's dtype and takes the first nearest; a binary search among the exact midpoints
    (a weight on one goes to the code below) gives the same code for every bf16 and fp16 value and for fp32
    values around every midpoint: the tests check them all against torchao's."""
    mids = (table[:-1].double() + table[1:].double()) / 2
    codes = torch.empty(weight.numel(), dtype=torch.uint8, device=weight.device)
    blocks = weight.view(-1, NF4_BLOCK)
    for start in range(0, len(blocks), chunk_blocks):
        chunk = blocks[start : start + chunk_blocks]
        v = (chunk / chunk.abs().amax(1, keepdim=True)).flatten()  # a zero block is NaN: code 0, as torchao's
        at = start * NF4_BLOCK
        codes[at : at + v.numel()] = torch.bucketize(v.double(), mids).masked_fill_(v.isnan(), 0)
    return codes[::2] << 4 | codes[1::2]


def check_nf4_sharding(shapes: dict[str, tuple[int, ...]], processes: int) -> None:
    """strategy fsdp cuts each NF4 weight into equal runs of rows, one per process, and torchao cuts its codes,
    block scales and scale groups alike: each run must hold whole scale groups. `shapes` are the checkpoint's
    (checkpoint.stored_shapes); one line for the first weight that cannot be cut."""
    for name, shape in shapes.items():
        n_blocks, partial = divmod(math.prod(shape), NF4_BLOCK)
        if not is_quantized_weight(name) or partial:  # a partial block: to_nf4 refuses it while loading
            continue
        groups = n_blocks // scaler_block(n_blocks)
        if shape[0] % processes or groups % processes:
            raise UserError(f"quantize nf4 with strategy fsdp: {name} (rows {shape[0]}, NF4 scale groups {groups}) "
                            f"cannot be split evenly over {processes} processes; use a number of processes that "
                            f"divides both, or strategy ddp")


def quantize_weight(name: str, tensor: torch.Tensor, quantize: str) -> torch.Tensor:
    """The tensor a model loaded with `quantize` holds for checkpoint tensor `name`: NF4 for the blocks' linear
    weights under nf4, else the tensor itself (int8 is applied after the decoding transforms, `to_int8`)."""
    return to_nf4(name, tensor) if quantize == "nf4" and is_quantized_weight(name) else tensor


def quantization(model: nn.Module) -> str:
    """nf4 when the model's base weights are NF4 (under FSDP2, a DTensor's local shard is), else none."""
    return "nf4" if any(is_nf4(getattr(p, "_local_tensor", p)) for p in model.parameters()) else "none"


def dequantized(t: torch.Tensor, dtype: torch.dtype | None = None, scratch: bool = False) -> torch.Tensor:
    """The full-precision weight a (possibly NF4) tensor computes with, in `dtype` (default: its own).

    torchao's own dequantisation, bit for bit, about 4x faster on a CPU here (a 5632 x 2048 weight in 97 ms
    instead of 413): each byte holds two 4-bit codes, so one lookup in a 256-row table of value pairs decodes
    both, then each block of 64 is multiplied by its scale. `scratch`: into a buffer the next call overwrites,
    for a product that uses the weight at once (`_NF4Linear`): no allocation per product, so no fresh pages to
    fault in (which made QLoRA twice as slow as LoRA under train.low_memory)."""
    if not is_nf4(t):
        return t if dtype is None else t.to(dtype)
    dtype, n = dtype or t.dtype, t.numel()
    table = t.nf4.to(dtype)
    pairs = torch.stack([table.repeat_interleave(16), table.repeat(16)], dim=1)  # byte -> (high code, low code)
    groups = t.quantized_scalers.view(-1, t.scaler_block_size) / t.quantization_factor[:, None]
    scales = (groups.flatten() + t.scaler_mean).to(dtype)
    if scratch:
        index = _scratch(n // 2, torch.int32, t.device).copy_(t.quantized_data)
        codes = torch.index_select(pairs, 0, index, out=_scratch(n, dtype, t.device).view(n // 2, 2))
    else:
        codes = torch.index_select(pairs, 0, t.quantized_data.int())  # (numel / 2, 2)
    return codes.view(-1, t.block_size).mul_(scales[:, None]).view(t.shape)


# One flat buffer per (device, dtype), as large as the largest weight dequantised so far: the memory plan counts
# one weight dequantised and its codes. Products run one at a time in a process (the training loop, or the one
# thread that decodes), so one buffer serves them all.
_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    buffer = _SCRATCH.get((device, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


class _NF4Linear(torch.autograd.Function):
    """x W^T with an NF4 weight, dequantised for the product and dropped after it; again in the backward pass,
    which needs only the input's gradient (the frozen weight has none)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, dequantized(weight, x.dtype, scratch=True))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ dequantized(weight, grad.dtype, scratch=True), None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with an NF4 weight multiplied through `dequantized` instead of torchao's slower path."""
    if not is_nf4(weight):
        return F.linear(x, weight, bias)
    y = _NF4Linear.apply(x, weight)
    return y if bias is None else y + bias


class NF4Linear(nn.Linear):
    """An nn.Linear (the same weight and bias tensors, the same state-dict names) whose NF4 weight goes through
    `linear`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # shared, not copied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_nf4_linears(model: nn.Module) -> nn.Module:
    """Every nn.Linear holding an NF4 weight as an NF4Linear, in place (after loading)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and is_nf4(child.weight):
                setattr(parent, name, NF4Linear(child))
    return model


def nf4_bytes(numel: int) -> int:
    """Bytes of an NF4 tensor of `numel` weights (the plan's arithmetic; tests check it against torchao's tensors):
    half a byte per weight, one int8 scale per block, an fp32 factor per scale group, an fp32 mean and the
    16-entry table."""
    n_blocks = numel // NF4_BLOCK
    return numel // 2 + n_blocks + 4 * (n_blocks // scaler_block(n_blocks)) + 4 + 64


# ---------------------------------------------------------------------------------------------- int8
def int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, per-output-channel scale): symmetric, w ~ q * scale, with |q| <= 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Linear):
    """An nn.Linear (its own weight and bias, shared) that multiplies with an int8 copy of the weight and
    per-channel scales, through PyTorch's weight-only int8 kernel: a one-token step streams a quarter of the
    fp32 bytes. Call `repack` after the weight changes (an adapter merged or restored).

    The activations go in as bf16 whatever the model's dtype: the kernel's CPU code is vectorised for bf16 and
    fp16 inputs, and takes a scalar loop for fp32 ones, 8x slower on an AVX2 EPYC (the int8 weights, not the
    bf16 activations, decide the accuracy)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # shared, not copied
        self.repack()

    def repack(self) -> None:
        # Plain attributes, not buffers: never in a state dict, rebuilt rather than converted.
        self.int8, scale = int8_weight(self.weight)
        self.scale = scale.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(x2d, self.int8, self.scale).view(*shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def to_int8(model: nn.Module) -> nn.Module:
    """Every linear layer of the blocks, and the head, as an Int8Linear (after fast_decode has fused them), in
    place. A tied head gets its own int8 copy; the embedding lookup keeps the full-precision table."""
    for parent in [model, *(m for block in model.layers for m in (block.self_attn, block.mlp))]:
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child))
    return model
