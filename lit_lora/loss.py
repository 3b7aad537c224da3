"""The training loss: summed cross-entropy over target tokens only, through the output head a chunk at a time.

The full (tokens x vocab) logits never exist: for SmolLM2's 49k vocabulary they would be larger than the
rest of a micro-batch's activations together. Sums, not means, so the caller can normalise by the target
tokens of the whole global batch (gradient accumulation and DDP then give the gradient of one big batch).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lit_lora.data.batching import make_batch
from lit_lora.data.dataset import IGNORE_INDEX


class HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `h @ weight.T` against `y` for a frozen output head, chunk by chunk.

    The gradient with respect to h is computed in the forward pass, one (chunk, vocab) fp32 logits block at a
    time, and kept (it is the size of h), so the backward pass needs no second pass through the head.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk_size: int) -> torch.Tensor:
        weight = weight.to(h.dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None  # not when validating
        for i in range(0, len(y), chunk_size):
            logits = (h[i : i + chunk_size] @ weight.T).float()  # (chunk, vocab)
            y_chunk = y[i : i + chunk_size]
            log_z = logits.logsumexp(-1)
            loss += (log_z - logits.gather(1, y_chunk[:, None]).squeeze(1)).sum()
            if grad_h is None:
                continue
            probs = logits.sub_(log_z[:, None]).exp_()  # softmax, in place
            probs[torch.arange(len(y_chunk), device=h.device), y_chunk] -= 1  # d loss / d logits
            grad_h[i : i + chunk_size] = probs.to(h.dtype) @ weight
        ctx.save_for_backward(grad_h)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), None, None, None


def target_loss_sum(hidden: torch.Tensor, model: nn.Module, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Summed cross-entropy over the positions whose target is not -100.

    hidden (B, T, C), targets (B, T). Only target positions go through the output head (`model.logits`), a chunk
    at a time, so at most one (chunk, vocab) fp32 logits block exists, also in the backward pass.
    """
    keep = targets != IGNORE_INDEX
    h, y = hidden[keep], targets[keep]  # (N, C), (N,)
    head, c = model.lm_head, model.config
    plain = c.logits_scaling == 1.0 and c.final_softcap is None  # logits = h @ W.T exactly
    if plain and not any(p.requires_grad for p in head.parameters()):  # the usual case: a frozen head
        return HeadCrossEntropy.apply(h, head.weight, y, chunk_size)

    # LoRA on the head, or logits scaled or soft-capped (Granite, Gemma 2): autograd, recomputing each chunk's
    # logits in the backward pass.
    def chunk_loss(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.logits(h_chunk).float(), y_chunk, reduction="sum")

    total = h.sum().float() * 0  # part of the graph even when there are no targets
    for i in range(0, len(y), chunk_size):
        total = total + checkpoint(chunk_loss, h[i : i + chunk_size], y[i : i + chunk_size], use_reentrant=False)
    return total


def token_log_probs(hidden: torch.Tensor, model: nn.Module, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The log-probability of each target token (B, T), 0 where there is none: summed over a row, the sequence
    log-likelihood preference losses compare. A packed row holds several examples, so rows must be padded ones.
    The head runs a chunk of target tokens at a time, each chunk's logits recomputed in the backward pass."""
    keep = targets != IGNORE_INDEX
    h, y = hidden[keep], targets[keep]

    def chunk_loss(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.logits(h_chunk).float(), y_chunk, reduction="none")

    chunks = [checkpoint(chunk_loss, h[i : i + chunk_size], y[i : i + chunk_size], use_reentrant=False)
              for i in range(0, len(y), chunk_size)]
    token_losses = torch.cat(chunks) if chunks else h.sum(1).float() * 0  # part of the graph even when empty
    logps = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    return logps.index_put(tuple(keep.nonzero().T), -token_losses)


def micro_batch_loss(model, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    hidden = model.hidden_states(batch["input_ids"], batch.get("input_pos"), batch.get("mask"))
    return target_loss_sum(hidden, model, batch["targets"], chunk_size)


def segment_losses(model, batch: dict[str, torch.Tensor], rows: list[tuple], chunk_size: int) -> list[torch.Tensor]:
    """One forward pass, and the summed loss of each run's rows (`rows`: its name, first row, end row, length) apart:
    adapters trained together are each normalised by their own target tokens."""
    hidden = model.hidden_states(batch["input_ids"], batch.get("input_pos"), batch.get("mask"))
    return [target_loss_sum(hidden[start:stop], model, batch["targets"][start:stop], chunk_size)
            for _, start, stop, _ in rows]


# ---------------------------------------------------------------------------------------------- evaluation
def eval_batches(lengths, limit: int | None, batch_size: int) -> list[list[int]]:
    """The first `limit` examples in file order (all with None), batched by similar length (less padding).

    finetune-lora's validation and `evaluate` both score exactly these, so their losses agree."""
    n = len(lengths) if limit is None else min(limit, len(lengths))
    order = sorted(range(n), key=lambda i: int(lengths[i]))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def summed_loss(model, dataset, batches: list[list[int]], pad_id: int, packing: bool, pad_multiple: int,
                chunk_size: int, to_device=lambda b: b, autocast=contextlib.nullcontext) -> torch.Tensor:
    """(summed cross-entropy, target tokens) over `batches` of `dataset`, collated as training collates them
    (packing, pad_multiple and the loss chunk size are the training config's)."""
    total = torch.zeros(2)
    for indices in batches:
        batch = to_device(make_batch([dataset[i] for i in indices], pad_id, packing, dataset.meta["max_seq_length"],
                                     pad_multiple))
        with autocast():
            total[0] += micro_batch_loss(model, batch, chunk_size).float().cpu()
        total[1] += (batch["targets"] != IGNORE_INDEX).sum().cpu()
    return total
