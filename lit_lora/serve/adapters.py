"""The adapters a server offers, by name, and the few it holds in the model at a time.

`AdapterSource` knows where they are: `--lora_path [NAME=]PATH` (named by its folder unless named), and every
adapter folder directly under `--lora_dir` (ours or PEFT's), looked for again whenever a name is asked for, so a
new folder is served without a restart. An adapter is identified by its files' sizes and modification times:
when they change it is read and checked again (and its recorded sha256 checked while it is read).

`ResidentAdapters` holds at most `capacity` of them in the model's MultiLoRA slots, least recently used out first,
never one that a running request uses. It runs on the engine thread, which owns the model.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

from lit_lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_checked_adapter
from lit_lora.convert.peft import PEFT_CONFIG, PEFT_WEIGHTS
from lit_lora.errors import UserError
from lit_lora.model import Config
from lit_lora.serve.batch import AdapterTable

ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS)


class UnknownModel(UserError):
    """A model name that is neither the base nor an adapter (HTTP 404)."""


def parse_lora_path(text: str) -> tuple[str, Path]:
    """`NAME=PATH` or `PATH` (named by its folder, or by the folder above a lora.safetensors file)."""
    name, sep, path = text.partition("=")
    if not sep:
        path = Path(text)
        name = (path.parent if path.suffix == ".safetensors" else path).name
        return name, path
    if not name.strip():
        raise UserError(f"--lora_path {text!r} has an empty name; write NAME=PATH or just PATH")
    return name, Path(path)


def is_adapter_folder(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in (ADAPTER_CONFIG, PEFT_CONFIG))


def identity(path: Path) -> tuple:
    directory = path if path.is_dir() else path.parent
    found = []
    for name in ADAPTER_FILES:
        try:
            st = os.stat(directory / name)
        except OSError:
            continue
        found.append((name, st.st_size, st.st_mtime_ns))
    return tuple(found)


class AdapterSource:
    def __init__(self, checkpoint_dir: Path, config: Config, paths: dict[str, Path], lora_dir: Path | None,
                 verify: bool = True) -> None:
        self.checkpoint_dir, self.config, self.verify = checkpoint_dir, config, verify
        self.paths, self.lora_dir = dict(paths), lora_dir
        self.checked: dict[str, tuple] = {}  # name -> identity last read and found to fit the base
        self.metas: dict[str, dict] = {}  # name -> what its config records (its prompt format among it)
        self.lock = threading.Lock()

    def found(self) -> dict[str, Path]:
        """Every adapter by name: the folders under --lora_dir now, and the --lora_path ones (which win)."""
        found = {}
        if self.lora_dir is not None and self.lora_dir.is_dir():
            found = {folder.name: folder for folder in sorted(self.lora_dir.iterdir()) if is_adapter_folder(folder)}
        return {**found, **self.paths}

    def path(self, name: str) -> Path:
        """The adapter `name` is, looked up without listing --lora_dir: the engine thread asks on every admission."""
        if name in self.paths:
            return self.paths[name]
        folder = None if self.lora_dir is None or Path(name).name != name else self.lora_dir / name
        if folder is None or name in (".", "..") or not is_adapter_folder(folder):  # a child of lora_dir, no more
            raise UnknownModel(f"no model named {name!r}; GET /v1/models lists the base and every adapter")
        return folder

    def load(self, name: str):
        """(LoRA config, tensors, identity) of adapter `name`, checked against the base; UserError naming it."""
        path = self.path(name)
        before = identity(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # no recorded base hash: the shapes are still checked
                lora_config, state, meta = load_checked_adapter(path, self.checkpoint_dir, self.config, self.verify)
        except (UserError, OSError, ValueError) as e:
            raise UserError(f"adapter {name!r} cannot be served: {e}") from None
        if lora_config.variant == "dora":  # its magnitudes rescale the base's rows: no update to gather per row
            raise UserError(f"adapter {name!r} cannot be served: it is a DoRA adapter, and serve batches adapters as "
                            f"low-rank updates beside one base; merge it (merge-lora) and serve the merged checkpoint")
        with self.lock:
            self.checked[name], self.metas[name] = before, meta
        return lora_config, state, before

    def check(self, name: str) -> None:
        """Read and check `name` unless its files are as they were when last found good (any thread)."""
        with self.lock:
            good = self.checked.get(name)
        if good is None or good != identity(self.path(name)):
            self.load(name)


class ResidentAdapters:
    """Adapters in the model's slots 1..capacity (slot 0 is the base), least recently used evicted first."""

    def __init__(self, table: AdapterTable, source: AdapterSource) -> None:
        self.table, self.source = table, source
        self.held: OrderedDict[str, tuple[int, tuple]] = OrderedDict()  # name -> (slot, identity), LRU first
        self.users = [0] * (table.capacity + 1)  # running or prefilling requests per slot
        self.loads = 0  # adapters read into a slot, over the server's life

    def acquire(self, name: str | None) -> int | None:
        """The slot of adapter `name` (None: the base, slot 0), read into one if needed; None when every slot
        is in use by running requests (try again after one finishes)."""
        if name is None:
            return 0
        now = identity(self.source.path(name))
        slot, seen = self.held.get(name, (None, None))
        if slot is not None and seen != now:  # its files changed: read it again, once nothing runs with it
            if self.users[slot]:
                return None
            del self.held[name]
            self.table.clear(slot)
        if name not in self.held:
            slot = self._free_slot()
            if slot is None:
                return None
            lora_config, state, seen = self.source.load(name)
            self.table.put(slot, state, lora_config.scaling)
            self.held[name] = (slot, seen)
            self.loads += 1
        self.held.move_to_end(name)
        slot = self.held[name][0]
        self.users[slot] += 1
        return slot

    def _free_slot(self) -> int | None:
        taken = {slot for slot, _ in self.held.values()}
        free = [s for s in range(1, self.table.capacity + 1) if s not in taken]
        if free:
            return free[0]
        for name, (slot, _) in self.held.items():  # least recently used first
            if not self.users[slot]:
                del self.held[name]
                self.table.clear(slot)
                return slot
        return None

    def release(self, slot: int) -> None:
        if slot:
            self.users[slot] -= 1

    def resident(self) -> list[str]:
        return list(self.held)
