"""Files, format-agnostic: atomic directories and files, hashes, JSON/YAML, and the safetensors layout.

Every output directory is built under a temporary sibling name and renamed into place when complete, so an
interrupted command never leaves something that looks finished. Safetensors files are read here, and only
here: an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and byte range,
then the raw little-endian data.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from lit_lora.errors import UserError

# safetensors dtype codes (the format's own names) -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


# ---------------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out`, on any error it is removed."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- safetensors
def read_safetensors_header(f, path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """({name: {dtype, shape, data_offsets}}, offset of the data) of an open safetensors file."""
    size = Path(path).stat().st_size
    n = int.from_bytes(f.read(8), "little")
    if n <= 0 or 8 + n > size:
        raise ValueError("bad header length")
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if 8 + n + end > size:
            raise ValueError(f"tensor {name} runs past the end of the file")
    return header, 8 + n


def _damaged(path: Path, e: Exception) -> UserError:
    return UserError(f"cannot read {path}: {e} (the file is truncated or not safetensors)")


def iter_safetensors(path: Path, dtype: torch.dtype | None = None, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from one safetensors file, one tensor at a time; a damaged file is a UserError.

    Reads with plain file reads into fresh tensors instead of memory-mapping, so loading a checkpoint in
    another dtype holds one source tensor at a time, not the whole mapped file, in resident memory.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header, start = read_safetensors_header(f, path)
            for name, info in header.items():
                begin, end = info["data_offsets"]
                t = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
                f.seek(start + begin)
                buffer = t.reshape(-1).view(torch.uint8).numpy()
                if f.readinto(memoryview(buffer)) != end - begin or buffer.nbytes != end - begin:
                    raise ValueError(f"tensor {name} is incomplete")
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                yield name, t.to(device)
    except (ValueError, KeyError, TypeError, OSError) as e:  # json.JSONDecodeError is a ValueError
        raise _damaged(path, e) from None


def memmap_safetensors(path: Path) -> dict[str, Any]:
    """Read-only numpy views of every tensor in a safetensors file, without reading the data."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            header, start = read_safetensors_header(f, path)
        arrays = {}
        for name, info in header.items():
            dtype = torch.empty(0, dtype=SAFETENSORS_DTYPES[info["dtype"]]).numpy().dtype.newbyteorder("<")
            begin, end = info["data_offsets"]
            if end == begin:  # numpy cannot map zero bytes
                arrays[name] = np.zeros(info["shape"], dtype=dtype)
            else:
                arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=tuple(info["shape"]))
        return arrays
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise _damaged(path, e) from None
