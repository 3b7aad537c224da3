"""Prepared instruction data on disk, and the map-style dataset that reads it.

    data/alpaca/
      train.safetensors   tokens int32 (total_tokens,)  every example's ids, concatenated
                          offsets int64 (n + 1,)        example i is tokens[offsets[i]:offsets[i + 1]]
                          prompt_lengths int32 (n,)     leading prompt tokens of example i (BOS included)
      val.safetensors     the same for the validation split
      meta.json           template, tokenizer identity, mask_inputs, max_seq_length, counts, source, seed

An example is prompt ids, then response ids, then EOS (unless it was truncated). Loading memory-maps the
token array, so opening even a large prepared set costs nothing and DataLoader workers share the pages.
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
IGNORE_INDEX = -100  # labels with this value are left out of the loss (PyTorch's cross_entropy default)


def split_path(directory: Path, split: str) -> Path:
    return Path(directory) / f"{split}.safetensors"


class PreparedDataset(torch.utils.data.Dataset):
    """One split of a prepared directory: `ds[i]` is {"input_ids": (L,), "labels": (L,)} as int64 tensors.

    With `mask_inputs` the prompt positions of the labels are IGNORE_INDEX. The mask is decided by position
    (the stored prompt length), never by token id: padding and EOS often share an id.
    """

    def __init__(self, directory: Path | str, split: str = "train") -> None:
        self.directory, self.split = Path(directory), split
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        path = split_path(self.directory, split)
        if not (self.directory / META).is_file() or not path.is_file():
            raise UserError(f"{self.directory} holds no prepared {split} data; run `prepare-alpaca` "
                            f"(or prepare-dolly / prepare-json) with --destination {self.directory}")
        self.meta: dict[str, Any] = json.loads((self.directory / META).read_text())
        self.mask_inputs = bool(self.meta["mask_inputs"])
        self._open()

    def _open(self) -> None:
        arrays = memmap_safetensors(split_path(self.directory, self.split))
        self.tokens = arrays["tokens"]  # stays mapped; offsets and prompt lengths are small, so read them in
        self.offsets = np.asarray(arrays["offsets"], dtype=np.int64)
        self.prompt_lengths = np.asarray(arrays["prompt_lengths"], dtype=np.int64)
        self.lengths = np.diff(self.offsets)  # (n,) tokens per example, for length-grouped batching

    # A memmap would be pickled as a full copy; DataLoader workers started by spawn map the file themselves.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("tokens", "offsets", "prompt_lengths", "lengths")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        i = int(i) % len(self)
        input_ids = torch.from_numpy(self.tokens[self.offsets[i]:self.offsets[i + 1]].astype(np.int64))
        labels = input_ids.clone()
        if self.mask_inputs:
            labels[: self.prompt_lengths[i]] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels}
