"""Numbers and the hardware they run on: dtype names, precision names, and peak memory, one table each.

A dtype name (`bf16`, `fp32`, `fp16`) is what a user types for --dtype and what checkpoint.json records.
A precision name is Lightning's (`bf16-mixed`, `32-true`, ...): it decides the dtype of the frozen base and
of the trainable LoRA tensors.
"""
from __future__ import annotations

import ctypes
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


# ---------------------------------------------------------------------------------------------- --device
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str) -> torch.device:
    """The device `--device NAME` means; auto: the first CUDA device, else Apple's MPS, else the CPU. A device
    this machine does not have is a UserError naming what PyTorch sees."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("mps") if _has_mps() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use {DEVICES}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {name}: PyTorch sees no CUDA device here (torch {torch.__version__}, CUDA "
                            f"build {torch.version.cuda or 'none'}); use --device cpu, or install a CUDA build of "
                            f"torch")
        if (device.index or 0) >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", device.index or 0)
    if device.type == "mps" and not _has_mps():
        raise UserError(f"--device {name}: Apple's MPS backend is not available here; use --device cpu")
    if device.type not in ("cpu", "mps"):
        raise UserError(f"unknown --device {name!r}; use {DEVICES}")
    return device


def _has_mps() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator dropout on `device` draws from (CUDA's own on a GPU, torch's CPU one otherwise)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def peak_memory_bytes(device: torch.device | str = "cpu") -> tuple[str, int]:
    """(what was measured, bytes): allocator peak on CUDA, the process's peak resident memory elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return "max_allocated", torch.cuda.max_memory_allocated(device)
    return "peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------- freed memory
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
UNMAP_FROM = 128 * 1024  # bytes: glibc's own starting threshold, held fixed


def unmap_freed_memory() -> bool:
    """Have glibc map every allocation of 128 KiB or more on its own and unmap it when freed; False where the C
    library is not glibc. By default glibc raises that threshold each time it unmaps a big block (up to 32 MiB),
    then serves tensors from its heap, whose freed holes stay resident and fragment: SmolLM2 at 4 x 256 peaked
    at 2.43 GiB of RSS that way and 1.81 with the threshold fixed, the forward's saved tensors plus the model
    (the memory plan), at 13% slower steps (every new tensor's pages fault in afresh; 30% on another machine)."""
    try:
        libc = ctypes.CDLL(None)
        return sys.platform.startswith("linux") and libc.mallopt(M_MMAP_THRESHOLD, UNMAP_FROM) == 1
    except (OSError, AttributeError):  # no mallopt: not glibc
        return False


# ---------------------------------------------------------------------------------------------- precision: auto
# bf16-mixed is chosen only when bf16 multiplies this many times faster than fp32. Where a CPU has bf16
# instructions it is 2-3x faster; where it has none it is 10-100x slower; a near tie is the probe measuring a
# busy machine (one rate taken while another process had the cores), and fp32 then is the safe answer: exact,
# and never much slower.
BF16_MARGIN = 1.3
# 256^3 products, 34 MFLOP each: 30 ms where bf16 runs at ~1 GFLOP/s, so the whole probe stays under half a second
PROBE_SIZE = 256
PROBE_ROUNDS = 5
# One measurement runs products back to back for at least this long: a lone fast product (0.5 ms in fp32)
# would mostly time the threads waking up.
PROBE_MEASUREMENT_S = 0.01


def _seconds_per_product(a: torch.Tensor, b: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        a @ b
    return (time.perf_counter() - start) / n


def probe_gflops(size: int = PROBE_SIZE, rounds: int = PROBE_ROUNDS) -> tuple[float, float]:
    """(bf16, fp32) speed of a (size x size) @ (size x size) product on the CPU, in GFLOP/s: the best of
    `rounds` measurements, the two dtypes measured in turn so that a load coming and going slows both alike."""
    pairs = {dtype: (torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype))
             for dtype in (torch.bfloat16, torch.float32)}
    repeats = {}
    for dtype, (a, b) in pairs.items():  # warm-up (kernel selection, caches), and the products per measurement
        n = 1
        while _seconds_per_product(a, b, n) * n < PROBE_MEASUREMENT_S:
            n *= 2
        repeats[dtype] = n
    best = dict.fromkeys(pairs, float("inf"))
    for _ in range(rounds):
        for dtype, (a, b) in pairs.items():
            best[dtype] = min(best[dtype], _seconds_per_product(a, b, repeats[dtype]))
    return tuple(2 * size**3 / best[dtype] / 1e9 for dtype in pairs)


def cpu_precision(bf16_gflops: float, fp32_gflops: float) -> str:
    """The precision `auto` picks on a CPU that multiplies at these rates."""
    return "bf16-mixed" if bf16_gflops >= BF16_MARGIN * fp32_gflops else "32-true"


def auto_precision(accelerator: str = "auto") -> tuple[str, str]:
    """(precision, why) for `precision: auto`: bf16-mixed where bf16 is fast, 32-true where it is not.

    CPUs differ in the opposite direction: some run bf16 products at three times their fp32 speed, others
    (no bf16 instructions) at a fraction of it, so on a CPU a short matmul probe decides (`cpu_precision`).
    On CUDA, bf16-mixed where the GPU supports bf16, else 16-mixed.
    """
    if accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "the GPU supports bf16"
        return "16-mixed", "the GPU does not support bf16"
    if accelerator == "mps":
        return "32-true", "MPS: fp32, whose kernels every macOS version has"
    bf16, fp32 = probe_gflops()
    choice = cpu_precision(bf16, fp32)
    close = f", bf16-mixed only when bf16 is {BF16_MARGIN}x faster" if choice == "32-true" and bf16 > fp32 else ""
    return choice, f"this CPU multiplies at {bf16:.1f} GFLOP/s in bf16 and {fp32:.1f} in fp32{close}"


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
