"""Files, format-agnostic: atomic directories and files, hashes, JSON/YAML, and the safetensors layout.

Every output directory is built under a temporary sibling name and renamed into place when complete, so an
interrupted command never leaves something that looks finished. Safetensors files are read here, and only
here: an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and byte range,
then the raw little-endian data.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import yaml

from lit_lora.errors import UserError

# safetensors dtype codes (the format's own names) -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


# ---------------------------------------------------------------------------------------------- atomic writes
# A directory holding one of these is one of ours (a checkpoint, prepared data, an adapter, a PEFT export),
# and only such a directory is ever replaced; an HF export's config.json counts only beside its weights.
OURS_MARKERS = ("checkpoint.json", "meta.json", "adapter_config.yaml", "adapter_config.json")
HF_EXPORT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def looks_ours(directory: Path) -> bool:
    """Whether `directory` is something lit-lora writes, and so something --overwrite may replace."""
    directory = Path(directory)
    return any((directory / m).is_file() for m in OURS_MARKERS) or (
        (directory / "config.json").is_file() and any((directory / w).is_file() for w in HF_EXPORT_WEIGHTS))


def check_destination(out: Path, overwrite: bool = False, inputs: Iterable[Path | None] = (),
                      flag: str = "--out") -> None:
    """Refuse (UserError) a destination whose replacement could lose data: the current directory or one of
    its parents; one of `inputs`, or a directory that holds one or lies inside one; an existing file or
    symbolic link; a non-empty directory without `overwrite`, and even with it one that is not ours."""
    out = Path(out)
    target, cwd = out.resolve(), Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise UserError(f"{flag} {out} is the current directory or one of its parents; name a new directory "
                        f"instead, e.g. {flag} {out / 'NAME'}")
    for source in inputs:
        resolved = Path(source).resolve() if source is not None else None
        if resolved is not None and (target == resolved or target in resolved.parents or resolved in target.parents):
            relation = "is" if target == resolved else "contains" if target in resolved.parents else "is inside"
            raise UserError(f"{flag} {out} {relation} the input {source}; choose a {flag} outside it")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "symbolic link" if out.is_symlink() else "file"
        raise UserError(f"{flag} {out} is an existing {kind}, not a directory; choose another {flag}")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} already exists and is not empty; choose another {flag} or pass --overwrite "
                            f"to replace it")
        if not looks_ours(out):
            raise UserError(f"{out} does not look like a lit-lora output (no {', '.join(OURS_MARKERS)}, nor "
                            f"config.json beside model.safetensors), so --overwrite will not delete it; choose "
                            f"another {flag} or remove it yourself")


def check_file_destination(out: Path, inputs: Iterable[Path | None] = (), flag: str = "--out") -> None:
    """Refuse (UserError) a file to write that cannot be written, or whose writing would lose data: a directory
    that is missing, not a directory or not writable; a path that is a directory; one of `inputs` (however spelled,
    or a hard link to it), or a path inside an input directory."""
    out = Path(out)
    folder = out.parent
    if not folder.is_dir():
        problem = "is not a directory" if folder.exists() else "does not exist"
        raise UserError(f"{flag} {out}: the directory {folder} {problem}; create it or choose another {flag}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: cannot write in the directory {folder} (permission denied); choose another "
                        f"{flag}")
    if out.is_dir():
        raise UserError(f"{flag} {out} is a directory; name a file, e.g. {flag} {out / 'scores.json'}")
    target = out.resolve()
    for source in inputs:
        if source is None:
            continue
        resolved = Path(source).resolve()
        if target == resolved or out.exists() and Path(source).exists() and os.path.samefile(out, source):
            raise UserError(f"{flag} {out} is the input {source}; writing it would destroy it, choose another {flag}")
        if resolved in target.parents:
            raise UserError(f"{flag} {out} is inside the input {source}; choose a {flag} outside it")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# A file name is at most 255 bytes (ext4, xfs, btrfs, tmpfs): a temporary sibling of a name near that limit is
# named by a cut of the name plus a short hash of all of it, so two long names still get distinct siblings.
NAME_MAX = 255
_HASH_CHARS = 8


def sibling(out: Path, kind: str, pid: int | None = None) -> Path:
    """`.NAME.KIND-PID` beside `out`: where a write of `out` by process `pid` (this one by default) works."""
    out = Path(out)
    suffix = f".{kind}-{os.getpid() if pid is None else pid}"
    name = out.name
    if 1 + len(os.fsencode(name)) + len(suffix) > NAME_MAX:
        digest = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:_HASH_CHARS]
        while 1 + len(os.fsencode(name + digest)) + len(suffix) > NAME_MAX:  # whole characters, not bytes
            name = name[:-1]
        name += digest
    return out.parent / f".{name}{suffix}"


def clean_leftovers(out: Path) -> None:
    """Deal with what killed writes of `out` left beside it (.NAME.tmp-PID, .NAME.old-PID of processes that
    are gone), one line on stderr each: a temporary copy is removed; a previous version that was moved aside
    is put back when `out` is missing (the write died between the two renames), else removed."""
    out = Path(os.path.abspath(out))
    if not out.parent.is_dir():
        return
    # Every sibling name, cut or not, starts with the name's first 32 characters (at most 128 bytes).
    for path in sorted(out.parent.glob(glob.escape(f".{out.name[:32]}") + "*")):
        match = re.fullmatch(r"\..*\.(tmp|old)-(\d+)", path.name)
        if match is None or path != sibling(out, match[1], int(match[2])):
            continue
        kind, pid = match[1], int(match[2])
        if pid != os.getpid() and _running(pid):
            print(f"note: leaving {path} alone: process {pid}, which is writing it, is still running",
                  file=sys.stderr)
        elif kind == "old" and not (out.exists() or out.is_symlink()):
            path.rename(out)
            print(f"restored {out} from {path.name}, left by an interrupted replacement (process {pid})",
                  file=sys.stderr)
        else:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            print(f"removed {path}, left by an interrupted write (process {pid})", file=sys.stderr)


def _naming(e: BaseException, tmp: Path, out: Path) -> BaseException:
    """`e` naming `out` instead of the temporary directory; a Rust writer's "... (os error N)" (safetensors,
    tokenizers) becomes that OSError, so a full disk is an OSError whatever wrote the file."""
    if isinstance(e, OSError):
        for attr in ("filename", "filename2"):
            name = getattr(e, attr)
            if isinstance(name, str) and name.startswith(str(tmp)):
                setattr(e, attr, str(out) + name[len(str(tmp)):])
        return e
    match = re.search(r"\(os error (\d+)\)", str(e))
    return OSError(int(match[1]), os.strerror(int(match[1])), str(out)) if match else e


def _umask() -> int:
    """This process's umask: Linux shows it in /proc; elsewhere only setting it (and back) reads it."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_modes(root: Path) -> None:
    """Directory `root` and everything in it get the modes the umask gives new files (0o666 & ~umask) and
    directories (0o777 & ~umask): some writers (safetensors) create their files 0o600, unreadable by others."""
    mask = _umask()
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(directory, name)):
                os.chmod(os.path.join(directory, name), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False, inputs: Iterable[Path | None] = (),
               flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out`, on any error it is removed.

    First leftovers of killed writes to `out` are cleaned up, and the destination is checked against
    `inputs` (the paths the command reads) by `check_destination`; `flag` is the option naming `out`.
    What was written gets the modes the umask gives (`give_umask_modes`), whatever wrote it.
    An OSError inside (a full disk, a read-only file system) keeps its errno and names `out`.
    """
    shown, out = Path(out), Path(os.path.abspath(out))
    clean_leftovers(out)
    check_destination(shown, overwrite, inputs, flag)
    tmp = sibling(out, "tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        give_umask_modes(tmp)
        if out.exists():
            old = sibling(out, "old")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = _naming(e, tmp, shown)
        if error is e:
            raise
        raise error from e


@contextlib.contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file at; on success it replaces `out`, on any error it is removed.
    (Callers check `out` first: check_file_destination, and whether an existing file may be replaced.)"""
    out = Path(out)
    clean_leftovers(out)
    tmp = sibling(out, "tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        tmp.replace(out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        error = _naming(e, tmp, out)
        if error is e:
            raise
        raise error from e


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that holds a key twice (PyYAML would keep the last value)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges; its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                with contextlib.suppress(TypeError):  # an unhashable key: PyYAML's own error says so
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"the key {key!r} appears twice in one mapping (first on line "
                            f"{seen[key]}); keep one of them", key_node.start_mark)
                    seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a PyYAML error, whose own text spans several (the problem, the context, a source excerpt)."""
    if isinstance(e, yaml.reader.ReaderError):  # before any parsing: not UTF-8, or a control character
        what = "a control character" if e.encoding == "unicode" else f"not {e.encoding} text"
        return f"position {e.position}: {what} ({e.character:#04x})"
    if not isinstance(e, yaml.MarkedYAMLError) or e.problem_mark is None:
        return " ".join(str(e).split())
    mark = e.problem_mark
    context = f" ({e.context})" if e.context else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}{context}"


def read_yaml(path: Path) -> Any:
    """A YAML file a user wrote; a syntax error or a key given twice is a one-line UserError naming the line."""
    try:
        return yaml.load(Path(path).read_bytes(), Loader=_UniqueKeyLoader)  # bytes: PyYAML names a bad encoding
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- locks
LOCK_FILE = ".lit-lora.lock"


def _lock_holder(fd: int) -> str:
    """Who holds the lock on open lock file `fd`, as its holder recorded it ("PID HOST")."""
    pid, _, host = os.pread(fd, 4096, 0).decode(errors="replace").strip().partition(" ")
    return f"process {pid} on {host}" if pid.isdigit() else "another process (it has not said which yet)"


def _open_lock(path: Path, flag: str) -> int | None:
    """An open descriptor of lock file `path` holding flock's exclusive lock on it; None if the file was
    replaced or removed meanwhile (by a holder releasing it): then try again. A UserError when it is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise UserError(f"{flag} {path.parent} is in use by {holder}, which holds {path}; wait for it to finish "
                        f"or choose another {flag}") from None
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def hold_lock(directory: Path, flag: str) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (created if missing; `flag` is the option naming it) for the block;
    another holder is refused at once (UserError naming its PID and host). flock's lock goes with its holder's
    process, so the file a killed holder left blocks no one. On release the lock file goes, and `directory` too
    if this made it and it is still empty."""
    directory, path = Path(directory), Path(directory) / LOCK_FILE
    created = not directory.exists()
    fd = None
    while fd is None:
        directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # `directory` removed meanwhile by a holder releasing it
            fd = _open_lock(path, flag)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it: one that opened it meanwhile sees it gone and tries again
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote into it
                directory.rmdir()


# ---------------------------------------------------------------------------------------------- safetensors
def read_safetensors_header(f, path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """({name: {dtype, shape, data_offsets}}, offset of the data) of an open safetensors file, in file order.

    The header is checked before anything is allocated from it: every dtype known, every shape a list of
    non-negative ints whose size in bytes is its byte range, the ranges apart from each other and inside the file.
    """
    size = Path(path).stat().st_size
    n = int.from_bytes(f.read(8), "little")
    if n <= 0 or 8 + n > size:
        raise ValueError("bad header length")
    header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    ranges = []
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
            dtype = info.get("dtype") if isinstance(info, dict) else info
            raise ValueError(f"tensor {name} has an unknown dtype {dtype!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {name} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]].itemsize
        if nbytes != end - begin:
            raise ValueError(f"tensor {name} of shape {shape} needs {nbytes} bytes, its byte range holds "
                             f"{end - begin}")
        if 8 + n + end > size:
            raise ValueError(f"tensor {name} runs past the end of the file")
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:
            raise ValueError(f"tensors {first} and {second} overlap")
    return {name: header[name] for _, _, name in ranges}, 8 + n


def _damaged(path: Path, e: Exception) -> UserError:
    return UserError(f"cannot read {path}: {e} (the file is truncated or not safetensors)")


def _with_filename(e: OSError, path: Path) -> OSError:
    """`e` naming `path` if it names no file: a failed read is the file system's error (permissions, a missing
    file, an I/O error), reported as such by the CLI, never as a damaged file."""
    if e.filename is None:
        e.filename = str(path)
    return e


def iter_safetensors(path: Path, dtype: torch.dtype | None = None, device: str = "cpu", sha256: str | None = None,
                     hint: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from one safetensors file, one tensor at a time; a damaged file is a UserError.

    Reads with plain file reads into fresh tensors instead of memory-mapping, so loading a checkpoint in
    another dtype holds one source tensor at a time, not the whole mapped file, in resident memory.
    Tensors come in file order, so with `sha256` the bytes are hashed as they are read (one pass, no second
    read of the file) and a mismatch is a UserError (ending with `hint`) raised before the last tensor is yielded.
    The hashing runs in a helper thread (hashlib releases the GIL), one tensor behind the reading, so it mostly
    overlaps the reads; a tensor is yielded only once it is hashed.
    """
    path = Path(path)

    def emit(name: str, t: torch.Tensor, hashed: Any) -> tuple[str, torch.Tensor]:
        if hashed is not None:
            hashed.result()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return name, t.to(device)

    hasher = ThreadPoolExecutor(1) if sha256 else None  # one worker: the updates run in the order submitted
    try:
        with open(path, "rb") as f:
            header, start = read_safetensors_header(f, path)
            digest = hashlib.sha256() if sha256 else None
            if digest is not None:
                f.seek(0)
                digest.update(f.read(start))
            position, held = start, None  # held: the tensor read last, yielded once the next one is read
            for name, info in header.items():
                begin, end = info["data_offsets"]
                t = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
                if hasher is not None and start + begin > position:  # a gap (safetensors itself leaves none)
                    f.seek(position)
                    hasher.submit(digest.update, f.read(start + begin - position))
                f.seek(start + begin)
                buffer = t.reshape(-1).view(torch.uint8).numpy()
                if f.readinto(memoryview(buffer)) != end - begin or buffer.nbytes != end - begin:
                    raise ValueError(f"tensor {name} is incomplete")
                if hasher is None:
                    yield emit(name, t, None)
                    continue
                position = start + end
                if held is not None:
                    yield emit(*held)
                held = (name, t, hasher.submit(digest.update, buffer))
            if hasher is not None:
                hasher.submit(lambda: None).result()  # every update done
                _check_digest(f, digest, sha256, path, hint)
                if held is not None:
                    yield emit(*held)
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise _damaged(path, e) from None
    except OSError as e:
        raise _with_filename(e, path)
    finally:
        if hasher is not None:
            hasher.shutdown(wait=True, cancel_futures=True)


def _check_digest(f, digest, expected: str, path: Path, hint: str) -> None:
    """Hash what is left of open file `f` into `digest` and compare it with `expected`."""
    while block := f.read(1 << 24):
        digest.update(block)
    if digest.hexdigest() != expected:
        raise UserError(f"{path} is damaged: its sha256 is {digest.hexdigest()[:16]}..., not the "
                        f"{str(expected)[:16]}... recorded when it was written{hint}")


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
    except (ValueError, KeyError, TypeError) as e:
        raise _damaged(path, e) from None
    except OSError as e:
        raise _with_filename(e, path)
