"""Folding a LoRA adapter into base weights: W' = W + s * B A, computed in fp32, stored in the base's dtype.

`merge_checkpoint` streams a checkpoint tensor by tensor into a new one; `merge_adapter` does the same to a
model in memory (what `generate` uses to switch adapters). Both go through `merged_weight`, so a merged
checkpoint and a base with the adapter merged at generation time hold bit-identical weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lit_lora.checkpoint import (
    ShardWriter, atomic_dir, check_adapter_base, finish_checkpoint, iter_safetensors,
    load_adapter, load_config, parse_dtype, weight_files,
)
from lit_lora.errors import UserError
from lit_lora.lora import LoRAConfig, apply_lora, load_lora_state_dict
from lit_lora.model import LLaMA, Config


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """(W + s * B A) in fp32, cast to `dtype` (default: the weight's own dtype, never a silent upcast)."""
    delta = (lora_B.float() @ lora_A.float()) * scaling  # (out, r) @ (r, in) -> (out, in)
    return (weight.float() + delta).to(dtype or weight.dtype)


def check_adapter_fits(config: Config, lora_config: LoRAConfig, state: dict[str, torch.Tensor]) -> None:
    """Names and shapes of the adapter tensors against a model of `config`, without allocating the model."""
    with torch.device("meta"):
        model = apply_lora(LLaMA(config), lora_config)
    load_lora_state_dict(model, state)  # raises UserError on a missing, unexpected or misshapen tensor


def load_checked_adapter(lora_path: Path, checkpoint_dir: Path, config: Config):
    """load_adapter + the base checks: (LoRA config, tensors, metadata) that are known to fit the base."""
    lora_config, state, meta = load_adapter(lora_path)
    check_adapter_base(meta, checkpoint_dir, config)
    check_adapter_fits(config, lora_config, state)
    return lora_config, state, meta


def _lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"layers.0.self_attn.q_proj.weight": (A, B)} for every adapted weight."""
    modules = {name.rsplit(".", 1)[0] for name in state}
    return {f"{m}.weight": (state[f"{m}.lora_A"], state[f"{m}.lora_B"]) for m in modules}


@torch.no_grad()
def merge_adapter(model: LLaMA, lora_config: LoRAConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merge an adapter into the model's weights in place; returns the original weights for `restore_weights`.

    Restoring the saved originals (rather than subtracting B A again) leaves the base exactly as loaded,
    which rounding would not in bf16.
    """
    originals = {}
    for name, (A, B) in _lora_pairs(state).items():
        weight = model.get_parameter(name)
        originals[name] = weight.detach().clone()
        weight.copy_(merged_weight(weight, A, B, lora_config.scaling))
    return originals


@torch.no_grad()
def restore_weights(model: LLaMA, originals: dict[str, torch.Tensor]) -> None:
    for name, weight in originals.items():
        model.get_parameter(name).copy_(weight)


def merge_checkpoint(checkpoint_dir: Path, lora_path: Path, out: Path, dtype: str | None = None,
                     overwrite: bool = False) -> Path:
    """Write base + adapter as a standalone checkpoint, one tensor at a time (peak memory ~ one shard).

    `dtype` (bf16, fp16, fp32) converts the output; by default every tensor keeps the base's dtype.
    """
    dtype = parse_dtype(dtype)
    config = load_config(checkpoint_dir)
    lora_config, state, _ = load_checked_adapter(lora_path, checkpoint_dir, config)
    pairs = _lora_pairs(state)
    out_dtype = None
    with atomic_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp)
        for path in weight_files(checkpoint_dir):
            for name, tensor in iter_safetensors(path):
                if name in pairs:
                    tensor = merged_weight(tensor, *pairs.pop(name), lora_config.scaling, dtype)
                elif dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                out_dtype = out_dtype or tensor.dtype
                writer.add(name, tensor)
        if pairs:  # check_adapter_fits saw these layers in the config, so the checkpoint lacks them
            raise UserError(f"{checkpoint_dir} has no tensors {sorted(pairs)[:2]} that the adapter updates; "
                            f"the checkpoint is incomplete, convert it again")
        finish_checkpoint(tmp, writer, config, out_dtype, source=f"merge-lora: {checkpoint_dir} + {lora_path}",
                          tokenizer_src=checkpoint_dir)
    return Path(out)
