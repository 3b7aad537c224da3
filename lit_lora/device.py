"""Numbers and the hardware they run on: dtype names, precision names, and peak memory, one table each.

A dtype name (`bf16`, `fp32`, `fp16`) is what a user types for --dtype and what checkpoint.json records.
A precision name is Lightning's (`bf16-mixed`, `32-true`, ...): it decides the dtype of the frozen base and
of the trainable LoRA tensors.
"""
from __future__ import annotations

import resource

import torch

from lit_lora.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# precision -> (frozen base dtype, LoRA dtype). Mixed precision keeps the trainable LoRA tensors in fp32 and
# the frozen base in the low-precision dtype autocast computes in anyway: half the memory, no per-step casts.
PRECISIONS = {
    "bf16-mixed": (torch.bfloat16, torch.float32),
    "16-mixed": (torch.float16, torch.float32),
    "bf16-true": (torch.bfloat16, torch.bfloat16),
    "32-true": (torch.float32, torch.float32),
}
GENERATE_PRECISIONS = ("bf16-true", "32-true")  # inference holds one dtype: the base's


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    key = _DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """`bf16` for torch.bfloat16: the name checkpoint.json records."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def torch_dtype_name(name: str) -> str:
    """`bfloat16` for `bf16`: the name Hugging Face's config.json uses."""
    return str(DTYPES[name]).removeprefix("torch.")


def peak_memory_bytes(device: torch.device | str = "cpu") -> tuple[str, int]:
    """(what was measured, bytes): allocator peak on CUDA, the process's peak resident memory elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return "max_allocated", torch.cuda.max_memory_allocated(device)
    return "peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
