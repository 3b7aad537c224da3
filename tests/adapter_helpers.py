"""Adapters for tests, built directly (no training): random LoRA tensors written with write_adapter_files."""
from __future__ import annotations

from pathlib import Path

import torch

from lit_lora.adapter import write_adapter_files
from lit_lora.checkpoint import load_model
from lit_lora.fileio import atomic_dir
from lit_lora.lora import LoRAConfig, apply_lora, lora_layers


def randomize_lora(model, seed: int, scale: float = 0.1) -> None:
    """Random A and B (B is zero after init, which would make the adapter a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * scale)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * scale)
            if hasattr(layer, "lora_magnitude"):  # DoRA: magnitudes moved away from the base's row norms too
                layer.lora_magnitude.mul_(1 + torch.randn(layer.lora_magnitude.shape, generator=gen) * scale)


def make_adapter(checkpoint_dir: Path, out: Path, seed: int = 0, targets=("query", "value"), r: int = 4,
                 alpha: float = 8.0, template: str | None = "chatml", scale: float = 0.1, variant: str = "lora",
                 use_rslora: bool = False) -> Path:
    config = LoRAConfig(r=r, alpha=alpha, dropout=0.0, targets=list(targets), variant=variant, use_rslora=use_rslora)
    model = apply_lora(load_model(checkpoint_dir), config)
    randomize_lora(model, seed, scale)
    with atomic_dir(out) as tmp:
        write_adapter_files(tmp, model, checkpoint_dir, {"template": template})
    return out
