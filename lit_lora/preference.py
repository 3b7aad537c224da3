"""Preference tuning on chosen/rejected pairs: DPO and ORPO losses, the pairs on disk, and the reference model.

    DPO  (Rafailov et al. 2023)  z = beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))
                                 loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)    (eps: label smoothing)
                                 rewards: beta * (log pi - log ref) of each answer, summed over its tokens
    ORPO (Hong et al. 2024)      loss = NLL(chosen) - beta * log sigmoid(log odds(c) - log odds(r)),
                                 odds(y) = p / (1 - p) with p = exp(mean token log-prob of y); no reference
                                 rewards: beta * mean token log-prob of each answer
    IPO  (Azar et al. 2023)      loss = (z / beta - 1 / (2 beta))^2, `preference.loss: ipo`; DPO's rewards. Its target
                                 margin stops the push once a pair is separated: DPO's loss keeps falling as the
                                 rejected answer's log-probability goes to minus infinity, and so takes the shared
                                 tokens down with it (the IPO paper's overfitting argument)
    RPO  (Pang et al. 2024)      DPO + w * NLL(chosen), `preference.sft_weight` w; the NLL is per chosen token
    DPOP (Pal et al. 2024)       DPO's loss with z - beta * lambda * max(0, log ref(c) - log pi(c)), `preference.loss:
                                 dpop`, `preference.dpop_lambda` lambda; DPO's rewards. When the two answers differ
                                 in a token or two, DPO can widen the margin while both answers grow less likely
                                 (DPO-Positive's argument); the penalty is paid once the chosen answer falls below
                                 the reference, and costs nothing above it

`preference.compare: first_difference` compares the two answers only up to and including their first different token
(as Step-DPO compares only the first wrong step): after it, the rejected answer's tokens are predicted from a prefix
that is already wrong, and pushing them down also pushes down the same tokens where they are right. The SFT term
always covers the whole chosen answer.

With LoRA the reference costs no second model: it is the policy with the LoRA tensors the run started from (zero B:
the base; or init_lora's adapter), swapped in for a forward pass without gradients (`reference_weights`).
A prepared preference split stores pair i as examples 2i (chosen) and 2i + 1 (rejected), whose prompt tokens are
the same; a batch of pairs is collated as those rows in that order, so both answers go through the model together.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from lit_lora.data.batching import make_batch
from lit_lora.data.dataset import IGNORE_INDEX, PreparedDataset
from lit_lora.errors import UserError
from lit_lora.loss import token_log_probs

if TYPE_CHECKING:
    from lit_lora.train_config import PreferenceSection

METHODS = ("sft", "dpo", "orpo")
# preference.loss, for method dpo: DPO's own, IPO's squared distance to a target, or DPO with DPO-Positive's penalty
LOSSES = ("sigmoid", "ipo", "dpop")
COMPARE = ("whole", "first_difference")  # preference.compare: which answer tokens the preference term compares
PREFERENCE_STATS = ("rewards_chosen", "rewards_rejected", "margin", "accuracy")  # metrics.csv columns, per pair
# validation's too: the chosen answers' loss per token, which DPO can raise while it widens the margin
PREFERENCE_COLUMNS = (*PREFERENCE_STATS, "chosen_loss")


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0, loss: str = "sigmoid",
               dpop_lambda: float = 50.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair, from summed answer log-probabilities (P,)."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected  # each answer's log-ratio
    margin = chosen - rejected
    if loss == "ipo":  # the log-ratio margin held near 1 / (2 beta), rather than pushed up forever
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        z = beta * (margin - dpop_lambda * (-chosen).clamp(min=0) if loss == "dpop" else margin)
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def orpo_losses(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, beta: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(odds-ratio term, chosen reward, rejected reward) per pair, from mean token log-probabilities (P,); the
    caller adds the chosen answers' NLL. log odds(p) = log p - log(1 - p), with log(1 - p) = log1p(-exp(log p))."""
    log_odds = (mean_chosen - mean_rejected) - (torch.log1p(-mean_chosen.exp()) - torch.log1p(-mean_rejected.exp()))
    return -beta * F.logsigmoid(log_odds), beta * mean_chosen.detach(), beta * mean_rejected.detach()


class RowLogProbs(NamedTuple):
    """Per batch row: the summed log-probability of the compared answer tokens and their number, and the same over
    the whole answer (the same tensors unless compare is first_difference)."""
    logps: torch.Tensor
    counts: torch.Tensor
    whole: torch.Tensor
    whole_counts: torch.Tensor


def preference_terms(method: str, rows: RowLogProbs, ref: torch.Tensor | None, p: PreferenceSection
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards, the chosen answers' summed NLL over their whole answers) from
    the rows chosen, rejected, chosen... (`ref`: the reference's compared log-probabilities, for DPO; `p` the
    config's preference section). The step's loss adds the NLL per chosen token times `sft_weight`."""
    nll = -rows.whole[0::2].sum()
    logps = rows.logps
    if method == "dpo":
        return (*dpo_losses(logps[0::2], logps[1::2], ref[0::2], ref[1::2], p.beta, p.label_smoothing, p.loss,
                            p.dpop_lambda), nll)
    mean = logps / rows.counts.clamp(min=1)
    return (*orpo_losses(mean[0::2], mean[1::2], p.beta), nll)


def sft_weight(method: str, weight: float | None) -> float:
    """The weight of the chosen answers' NLL per token in the loss: ORPO's own SFT term is 1; DPO has none unless
    set (RPO: DPO plus that term, against the chosen answers' likelihood falling with the rejected ones')."""
    if weight is not None:
        return weight
    return 1.0 if method == "orpo" else 0.0


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Sums over pairs of PREFERENCE_STATS: the rewards, their margin, and reward accuracy (ties count half: equal
    rewards, as at the start, are a coin toss)."""
    accuracy = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return torch.stack([chosen.sum(), rejected.sum(), (chosen - rejected).sum(), accuracy.sum()]).float().cpu()


def stats_dict(sums: torch.Tensor, pairs: int | float) -> dict[str, float]:
    return {key: float(v) / max(pairs, 1) for key, v in zip(PREFERENCE_STATS, sums)}


def first_difference(targets: torch.Tensor) -> torch.Tensor:
    """The targets of pair rows (chosen, rejected, ...; right-padded, so both answers start at the same position)
    with every token after the pair's first different one ignored in both rows."""
    differ = targets[0::2] != targets[1::2]
    first = torch.where(differ.any(1), differ.int().argmax(1), targets.shape[1])
    after = torch.arange(targets.shape[1], device=targets.device)[None] > first[:, None]
    out = targets.clone()
    out[0::2] = out[0::2].masked_fill(after, IGNORE_INDEX)
    out[1::2] = out[1::2].masked_fill(after, IGNORE_INDEX)
    return out


def batch_log_probs(model, batch: dict[str, torch.Tensor], chunk_size: int, compare: str = "whole") -> RowLogProbs:
    """RowLogProbs of a padded batch of pair rows, from one pass through the body and the head."""
    hidden = model.hidden_states(batch["input_ids"], batch.get("input_pos"), batch.get("mask"))
    targets = batch["targets"]
    tokens = token_log_probs(hidden, model, targets, chunk_size)
    whole = (tokens.sum(1), (targets != IGNORE_INDEX).sum(1))
    if compare == "whole":
        return RowLogProbs(*whole, *whole)
    compared = first_difference(targets) != IGNORE_INDEX
    return RowLogProbs((tokens * compared).sum(1), compared.sum(1), *whole)


@torch.no_grad()
def pair_log_probs(model, pairs: PreferencePairs, batches: list[list[int]], pad_id: int, pad_multiple: int,
                   chunk_size: int, to_device=lambda b: b, autocast=contextlib.nullcontext, compare: str = "whole"
                   ) -> RowLogProbs:
    """batch_log_probs of the rows of every pair in `batches` (chosen, rejected per pair, batch after batch), on
    the CPU."""
    parts = [RowLogProbs(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0),
                         torch.zeros(0, dtype=torch.long))]
    for indices in batches:
        batch = to_device(make_batch(pairs.rows(indices), pad_id, False, pairs.meta["max_seq_length"], pad_multiple))
        with autocast():
            rows = batch_log_probs(model, batch, chunk_size, compare)
        parts.append(RowLogProbs(*(t.float().cpu() if t.is_floating_point() else t.cpu() for t in rows)))
    return RowLogProbs(*(torch.cat(column) for column in zip(*parts)))


# ---------------------------------------------------------------------------------------------- data
def is_preference(meta: dict[str, Any]) -> bool:
    return bool(meta.get("preference"))


class PreferencePairs:
    """One split of prepared preference data: `pairs[i]` is [chosen, rejected], each {"input_ids", "labels"}.

    `lengths` is the longer answer's per pair (for length-grouped batching and eval batches)."""

    def __init__(self, examples: PreparedDataset) -> None:
        self.examples, self.meta, self.directory, self.split = examples, examples.meta, examples.directory, \
            examples.split
        n = len(examples)
        lengths, prompts = examples.lengths, examples.prompt_lengths
        if n % 2 or (prompts[0::2] != prompts[1::2]).any() or not all(
                np.array_equal(examples.tokens[examples.offsets[i]:examples.offsets[i] + prompts[i]],
                               examples.tokens[examples.offsets[i + 1]:examples.offsets[i + 1] + prompts[i]])
                for i in range(0, n, 2)):
            raise UserError(f"the preference data in {self.directory} is damaged: its {self.split} examples are not "
                            f"pairs sharing a prompt; prepare it again (prepare-preference --destination "
                            f"{self.directory} --overwrite)")
        self.lengths = np.maximum(lengths[0::2], lengths[1::2])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> list[dict[str, torch.Tensor]]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair {i} out of range for {len(self)} pairs")
        i = int(i) % len(self)
        return [self.examples[2 * i], self.examples[2 * i + 1]]

    def rows(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """The examples of pairs `indices` as batch rows: chosen, rejected, chosen, rejected..."""
        return [example for i in indices for example in self[i]]


def rows(dataset: PreparedDataset | PreferencePairs, indices: list[int]) -> list[dict[str, torch.Tensor]]:
    """The batch rows of `indices`: examples, or the two answers of each pair."""
    return dataset.rows(indices) if isinstance(dataset, PreferencePairs) else [dataset[i] for i in indices]


def check_method(method: str, meta: dict[str, Any], data_dir: Any) -> None:
    """Refuse preference methods on SFT data and SFT on pairs: each would train on the wrong thing."""
    if method not in METHODS:
        raise UserError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if method != "sft" and not is_preference(meta):
        raise UserError(f"method {method} trains on chosen/rejected pairs, and {data_dir} holds SFT data; prepare "
                        f"pairs with prepare-preference (or prepare-task extract --preference), or use method: sft")
    if method == "sft" and is_preference(meta):
        raise UserError(f"{data_dir} holds chosen/rejected pairs (prepare-preference); train on them with method: dpo "
                        f"or orpo, or prepare SFT data for method: sft")


# ---------------------------------------------------------------------------------------------- the reference
def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors: taken before training (and before a resume restores any), they are the
    reference model's."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def reference_weights(model: torch.nn.Module, reference: dict[str, torch.Tensor]):
    """Inside: the model is the reference (its trainable tensors swapped for `reference`), in eval mode (no dropout),
    without gradients; after: the policy again, in the mode it was in."""
    own = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = {name: p.detach().clone() for name, p in own.items()}
    training = model.training
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(reference[name])
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(saved[name])
        model.train(training)
