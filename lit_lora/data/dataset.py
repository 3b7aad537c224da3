"""Prepared training data on disk, and the map-style dataset that reads it.

    data/alpaca/
      train.safetensors   tokens int32 (total_tokens,)  every example's ids, concatenated
                          targets uint8 (total_tokens,) 1 where the token is a loss target, 0 where it is not
                          offsets int64 (n + 1,)        example i is tokens[offsets[i]:offsets[i + 1]]
                          prompt_lengths int32 (n,)     tokens before the answer evaluate asks for: the prompt of
                                                        an instruction, the history before a conversation's last
                                                        assistant turn (BOS included)
      val.safetensors     the same for the validation split
      meta.json           format_version, template, tokenizer identity, max_seq_length, counts, source, seed

The loss mask is stored per token, decided by position when the data was prepared (never by token id: padding
and EOS often share an id): an instruction's response and EOS, or each assistant turn and its end-of-turn marker.
Loading memory-maps the token array, so opening even a large prepared set costs nothing and DataLoader workers
share the pages.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_lora.errors import UserError
from lit_lora.fileio import memmap_safetensors

SPLITS = ("train", "val")
META = "meta.json"
REQUIRED_META = ("format_version", "max_seq_length", "tokenizer")  # what training and evaluation read from it
DATA_FORMAT_VERSION = 2  # 2: the per-token `targets` mask (1 had only prompt lengths)
ARRAYS = ("tokens", "targets", "offsets", "prompt_lengths")
IGNORE_INDEX = -100  # labels with this value are left out of the loss (PyTorch's cross_entropy default)


def split_path(directory: Path, split: str) -> Path:
    return Path(directory) / f"{split}.safetensors"


def data_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """What makes prepared data the same data: all that its meta.json records (the source's sha256, the options
    and tokenizer it was prepared with, the counts) except where the source file was, which changes nothing."""
    def unplaced(source: Any) -> Any:
        if not isinstance(source, dict):
            return source
        return {k: unplaced(v) if k == "val_file" else v for k, v in source.items() if k != "path"}

    return {**meta, "source": unplaced(meta.get("source"))}


class PreparedDataset(torch.utils.data.Dataset):
    """One split of a prepared directory: `ds[i]` is {"input_ids": (L,), "labels": (L,)} as int64 tensors.

    Labels are IGNORE_INDEX wherever the stored mask says the token is not a target.
    """

    def __init__(self, directory: Path | str, split: str = "train") -> None:
        self.directory, self.split = Path(directory), split
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        path = split_path(self.directory, split)
        if not (self.directory / META).is_file() or not path.is_file():
            raise UserError(f"{self.directory} holds no prepared {split} data; run `prepare-alpaca` "
                            f"(or prepare-dolly, prepare-json, prepare-chat) with --destination {self.directory}")
        self.meta: dict[str, Any] = self._read_meta()
        self._open()

    def _damaged(self, problem: str) -> UserError:
        return UserError(f"the prepared data in {self.directory} is damaged: {problem}; prepare it again "
                         f"(prepare-alpaca, prepare-dolly or prepare-json with --destination {self.directory})")

    def _read_meta(self) -> dict[str, Any]:
        try:
            meta = json.loads((self.directory / META).read_text())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError; an OSError is no damage: the CLI says it
            raise self._damaged(f"{META} is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise self._damaged(f"{META} is not a JSON object")
        missing = [key for key in REQUIRED_META if key not in meta]
        if missing:
            raise self._damaged(f"{META} lacks {', '.join(missing)}")
        if meta["format_version"] != DATA_FORMAT_VERSION:
            older = type(meta["format_version"]) is int and meta["format_version"] < DATA_FORMAT_VERSION
            raise UserError(f"{self.directory} was prepared by {'an older' if older else 'another'} lit-lora (data "
                            f"format {meta['format_version']!r}, this one reads {DATA_FORMAT_VERSION}); prepare it again "
                            f"with --destination {self.directory} --overwrite")
        if type(meta["max_seq_length"]) is not int or meta["max_seq_length"] < 1:
            raise self._damaged(f"{META} has an invalid max_seq_length")
        return meta

    def _open(self) -> None:
        """Map the split's file and check that its arrays describe whole examples, so nothing fails later."""
        path = split_path(self.directory, self.split)
        try:
            arrays = memmap_safetensors(path)
        except UserError as e:
            raise self._damaged(str(e)) from None
        missing = [key for key in ARRAYS if key not in arrays]
        if missing:
            raise self._damaged(f"{path.name} lacks the tensors {', '.join(missing)}")
        if any(arrays[k].ndim != 1 or arrays[k].dtype.kind not in "iu" for k in ARRAYS) \
                or len(arrays["targets"]) != len(arrays["tokens"]):
            raise self._damaged(f"{path.name} holds tensors of the wrong shape or type")
        self.tokens, self.targets = arrays["tokens"], arrays["targets"]  # stay mapped; the rest is small, read in
        self.offsets = np.asarray(arrays["offsets"], dtype=np.int64)
        self.prompt_lengths = np.asarray(arrays["prompt_lengths"], dtype=np.int64)
        self.lengths = np.diff(self.offsets)  # (n,) tokens per example, for length-grouped batching
        n = len(self.lengths)
        if len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.tokens) \
                or (self.lengths < 1).any():
            raise self._damaged(f"{path.name}: the example offsets do not divide its {len(self.tokens)} tokens")
        if len(self.prompt_lengths) != n or (self.prompt_lengths < 0).any() \
                or (self.prompt_lengths >= self.lengths).any():
            raise self._damaged(f"{path.name}: the prompt lengths do not fit its {n} examples")
        recorded = [m.get(self.split) if isinstance(m, dict) else None
                    for m in (self.meta.get("counts"), self.meta.get("tokens"))]
        if recorded[0] not in (None, n) or recorded[1] not in (None, len(self.tokens)):
            raise self._damaged(f"{path.name} holds {n} examples of {len(self.tokens)} tokens, {META} records "
                                f"{recorded[0]} of {recorded[1]}")

    # A memmap would be pickled as a full copy; DataLoader workers started by spawn map the file themselves.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in (*ARRAYS, "lengths")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        i = int(i) % len(self)
        span = slice(self.offsets[i], self.offsets[i + 1])
        input_ids = torch.from_numpy(self.tokens[span].astype(np.int64))
        labels = input_ids.masked_fill(torch.from_numpy(self.targets[span] == 0), IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels}


def check_tokenizer(dataset: PreparedDataset, tokenizer, checkpoint_dir: Path) -> None:
    """Refuse data prepared with another tokenizer than the checkpoint's: its ids would mean other tokens."""
    ours, theirs = tokenizer.identity(), dataset.meta.get("tokenizer")
    if theirs != ours:
        raise UserError(f"{dataset.directory} was prepared with another tokenizer than {checkpoint_dir}'s "
                        f"(data: {_short(theirs)}, checkpoint: {_short(ours)}); prepare the data again with "
                        f"--checkpoint_dir {checkpoint_dir}")


def _short(identity: dict | None) -> str:
    if not identity:
        return "unknown"
    return f"vocab {identity.get('vocab_size')}, sha256 {str(identity.get('sha256'))[:12]}"
