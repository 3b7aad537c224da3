"""From prepared examples to training batches: the order of examples, and collation.

The order is a pure function of (seed, epoch), so resuming needs only the epoch and the step within it, and
every process computes the same order without talking to the others. One optimizer step takes the next
`global_batch_size` examples; each process takes its contiguous share and splits it into micro-batches.

Collation pads on the right to the longest example of the micro-batch, rounded up to a multiple of
`pad_multiple` tokens (causal attention never looks right, so no mask is needed), or with packing lays the
examples end to end in as few rows as fit, with positions restarting per example and a block-diagonal causal
mask so no example sees another.

Examples are dicts with `input_ids` and `labels` (L,), labels -100 where no loss is taken (the prompt, the
turns a conversation does not train on).
Collation shifts them once: `targets[t]` is the label of token t+1, the token position t must predict.

Why round the length up: every new (batch, length) shape makes oneDNN build and cache new matmul kernels and
leaves glibc's heap with blocks of yet another size, so with every length possible a CPU run's resident memory
keeps growing. Few shapes keep it steady, at the price of some padding (the README gives the measured trade).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lit_lora.data.dataset import IGNORE_INDEX


def epoch_order(lengths: np.ndarray, global_batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[int]:
    """Example indices for one epoch, a whole number of global batches (the incomplete last batch is dropped).

    With length grouping, examples are sorted by length within windows of 16 global batches and the
    resulting global batches are shuffled, so a micro-batch holds examples of similar length (little padding)
    while the order stays random at the scale of the epoch.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen).numpy()
    steps = len(order) // global_batch_size
    order = order[: steps * global_batch_size]
    if group_by_length and steps > 0:
        window = 16 * global_batch_size
        chunks = [order[i : i + window] for i in range(0, len(order), window)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
        batches = order.reshape(steps, global_batch_size)
        order = batches[torch.randperm(steps, generator=gen).numpy()].reshape(-1)
    return order.tolist()


def step_micro_batches(order: Sequence[int], step_in_epoch: int, global_batch_size: int, micro_batch_size: int,
                       rank: int, world_size: int) -> list[list[int]]:
    """The micro-batches (lists of example indices) this process runs for one optimizer step."""
    per_rank = global_batch_size // world_size
    start = step_in_epoch * global_batch_size + rank * per_rank
    mine = order[start : start + per_rank]
    return [list(mine[i : i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[t] = labels[t + 1]; the last position predicts nothing."""
    return torch.cat([labels[1:], labels.new_tensor([IGNORE_INDEX])])


def padded_length(longest: int, pad_multiple: int, max_seq_length: int | None) -> int:
    """`longest` rounded up to a multiple of `pad_multiple`, but not past max_seq_length (nor below `longest`)."""
    rounded = -(-longest // pad_multiple) * pad_multiple
    return max(longest, min(rounded, max_seq_length)) if max_seq_length else rounded


def collate(examples: list[dict[str, torch.Tensor]], pad_id: int, pad_multiple: int = 1,
            max_seq_length: int | None = None) -> dict[str, torch.Tensor]:
    """input_ids and targets (B, T), right-padded to the longest example rounded up to `pad_multiple`
    (pad tokens are never targets)."""
    T = padded_length(max(len(e["input_ids"]) for e in examples), pad_multiple, max_seq_length)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e["input_ids"])
        input_ids[i, :L] = e["input_ids"]
        targets[i, :L] = shifted_targets(e["labels"])
    return {"input_ids": input_ids, "targets": targets}


def pack(examples: list[dict[str, torch.Tensor]], pad_id: int, max_seq_length: int, pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Examples end to end in rows of at most `max_seq_length` tokens (first fit, in order).

    Returns input_ids, targets, input_pos (R, T) and mask (R, 1, T, T): bool, True where a query may
    attend a key, i.e. same example and not later. Padding forms its own segment so no row is all False.
    """
    rows: list[list[dict[str, torch.Tensor]]] = []
    for e in examples:
        L = len(e["input_ids"])
        row = next((r for r in rows if sum(len(x["input_ids"]) for x in r) + L <= max_seq_length), None)
        if row is None:
            rows.append([e])
        else:
            row.append(e)
    T = padded_length(max(sum(len(x["input_ids"]) for x in r) for r in rows), pad_multiple, max_seq_length)
    R = len(rows)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    targets = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
    input_pos = torch.zeros((R, T), dtype=torch.long)
    segment = torch.full((R, T), -1, dtype=torch.long)  # which example each token belongs to; -1 = padding
    for i, row in enumerate(rows):
        start = 0
        for j, e in enumerate(row):
            L = len(e["input_ids"])
            input_ids[i, start : start + L] = e["input_ids"]
            targets[i, start : start + L] = shifted_targets(e["labels"])
            input_pos[i, start : start + L] = torch.arange(L)
            segment[i, start : start + L] = j
            start += L
        input_pos[i, start:] = torch.arange(T - start)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal  # (R, T, T)
    return {"input_ids": input_ids, "targets": targets, "input_pos": input_pos, "mask": mask[:, None]}


def make_batch(examples: list[dict[str, torch.Tensor]], pad_id: int, packing: bool, max_seq_length: int,
               pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    if packing:
        return pack(examples, pad_id, max_seq_length, pad_multiple)
    return collate(examples, pad_id, pad_multiple, max_seq_length)


def concat_batches(batches: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Micro-batches of several adapters as one, each right-padded to the longest (pad tokens are never targets,
    and a real token never attends to a later one), rows in the order given."""
    T = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "targets": IGNORE_INDEX}
    out = {key: torch.cat([F.pad(b[key], (0, T - b[key].shape[1]), value=value) for b in batches])
           for key, value in fill.items()}
    if "input_pos" in batches[0]:  # packed: positions and block-diagonal masks too
        out["input_pos"] = torch.cat([F.pad(b["input_pos"], (0, T - b["input_pos"].shape[1])) for b in batches])
        out["mask"] = torch.cat([_padded_mask(b["mask"], T) for b in batches])
    return out


def _padded_mask(mask: torch.Tensor, T: int) -> torch.Tensor:
    """A packed batch's (R, 1, t, t) mask as (R, 1, T, T): each added position attends only to itself."""
    t = mask.shape[-1]
    out = F.pad(mask, (0, T - t, 0, T - t))
    added = torch.arange(t, T)
    out[..., added, added] = True
    return out
