"""Numbers and the hardware they run on: dtype names, precision names, and peak memory, one table each.

A dtype name (`bf16`, `fp32`, `fp16`) is what a user types for --dtype and what checkpoint.json records.
A precision name is Lightning's (`bf16-mixed`, `32-true`, ...): it decides the dtype of the frozen base and
of the trainable LoRA tensors.
"""
from __future__ import annotations

import os
import resource
import sys
import time

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
TRAIN_PRECISIONS = ("auto", *PRECISIONS)
GENERATE_PRECISIONS = ("auto", "bf16-true", "32-true")  # inference holds one dtype: the base's


def check_precision(name: str, choices: tuple[str, ...] = TRAIN_PRECISIONS, what: str = "--precision") -> str:
    if name not in choices:
        raise UserError(f"unknown {what} {name!r}; use one of {', '.join(choices)}")
    return name


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


# ---------------------------------------------------------------------------------------------- precision: auto
def matmul_gflops(dtype: torch.dtype, size: int = 512, reps: int = 3) -> float:
    """Best-of-`reps` speed of a (size x size) @ (size x size) product in `dtype` on the CPU."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up: kernel selection and caches
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def auto_precision(accelerator: str = "auto") -> tuple[str, str]:
    """(precision, why) for `precision: auto`: bf16-mixed where bf16 is fast, 32-true where it is not.

    CPUs differ in the opposite direction: some run bf16 products at three times their fp32 speed, others
    (no bf16 instructions) at a fraction of it, so on a CPU a short matmul probe decides. On CUDA, bf16-mixed
    where the GPU supports bf16, else 16-mixed.
    """
    if accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "the GPU supports bf16"
        return "16-mixed", "the GPU does not support bf16"
    bf16, fp32 = matmul_gflops(torch.bfloat16), matmul_gflops(torch.float32)
    choice = "bf16-mixed" if bf16 > fp32 else "32-true"
    return choice, f"this CPU multiplies at {bf16:.0f} GFLOP/s in bf16 and {fp32:.0f} in fp32"


_AUTO_ENV = "LIT_LORA_AUTO_PRECISION"  # the first process's choice, inherited by the processes Fabric launches


def resolve_precision(precision: str, accelerator: str = "auto", training: bool = True) -> str:
    """`precision` itself, or for `auto` the faster one on this machine (said on stderr).

    The choice is kept in the environment so that every process of a distributed run uses the same one
    (a probe in each could disagree when the two speeds are close). Generation holds one dtype, so for it
    auto means bf16-true or 32-true.
    """
    if precision != "auto":
        return precision
    choice = os.environ.get(_AUTO_ENV)
    if choice is None:
        choice, why = auto_precision(accelerator)
        os.environ[_AUTO_ENV] = choice
        print(f"precision auto: {choice} ({why})", file=sys.stderr)
    if not training:
        choice = "32-true" if choice == "32-true" else "bf16-true"
    return choice
