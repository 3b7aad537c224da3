"""evaluate: score a base model and its adapters on the same examples, in one run over one loaded base.

    loss, perplexity   summed cross-entropy over target tokens through finetune-lora's own code and batches
                       (loss.eval_batches, loss.summed_loss), each adapter unmerged as in training, so the loss of
                       a run's final adapter equals the run's last validation loss on the same examples
    preference         on chosen/rejected pairs (prepare-preference): each model's implicit DPO reward of both answers
                       against the base as reference, beta * (log p_model - log p_base): reward accuracy, margin and
                       DPO loss; the loss is the chosen answers', and exact match is against the chosen answer
    exact match        batched greedy generation (generate.complete), the answer cut at the template's stop,
                       equal to the reference after stripping surrounding whitespace; the normalised match also
                       folds case and runs of whitespace

The data is a prepared directory (its template and prompts exactly as trained) or a raw Alpaca/Dolly/JSON(L)
file (or conversations), prepared on the fly with the checkpoint's tokenizer and the adapter's template.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from lit_lora import llamacpp
from lit_lora.adapter import load_checked_adapter
from lit_lora.checkpoint import load_config, load_info, load_model
from lit_lora.data.dataset import PreparedDataset, check_tokenizer
from lit_lora.data.readers import is_conversation, load_json_records
from lit_lora.device import PRECISIONS, check_precision, resolve_device, resolve_precision
from lit_lora.errors import UserError
from lit_lora.fileio import check_file_destination, write_json
from lit_lora.generate import Sampling, TorchEngine, decoding_model
from lit_lora.lora import lora_applied
from lit_lora.loss import eval_batches, summed_loss
from lit_lora.preference import (PreferencePairs, RowLogProbs, dpo_losses, is_preference, pair_log_probs, pair_stats,
                                 stats_dict)
from lit_lora.prompts.chat_template import ChatTemplate
from lit_lora.prompts.format import PromptFormat, prompt_format, recorded_prompt
from lit_lora.quantize import decoding_quantize
from lit_lora.tokenizer import Tokenizer
from lit_lora.train_config import TrainSection

METRICS = ("loss", "exact_match", "both")
_OUTPUT_FIELDS = ("output", "response")  # the reference answer in Alpaca and Dolly records


@dataclass
class Score:
    name: str
    n: int
    loss: float | None = None
    perplexity: float | None = None
    exact_match: float | None = None
    exact_match_normalized: float | None = None
    stopped: float | None = None  # answers that ended at EOS / the end-of-turn marker, not at max_new_tokens
    # preference data: the implicit DPO reward beta * (log p - log p_base) of each answer against the base's
    reward_accuracy: float | None = None  # pairs whose chosen answer has the higher reward (ties count half)
    reward_margin: float | None = None  # mean chosen reward - rejected reward
    dpo_loss: float | None = None  # mean -log sigmoid(margin): log 2 for the base itself
    seconds: float = 0.0
    answers: list[str] = field(default_factory=list)
    stops: list[bool] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("answers", "stops")}


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


# ---------------------------------------------------------------------------------------------- data
@contextlib.contextmanager
def open_data(data: Path, split: str, checkpoint_dir: Path, tokenizer: Tokenizer,
              chosen: PromptFormat) -> Iterator[PreparedDataset]:
    """The examples to score: a prepared split, or a raw file prepared into a temporary directory."""
    # These pull in the readers' download code: only when needed.
    from lit_lora.data.conversations import prepare_chat
    from lit_lora.data.prepare import prepare

    data = Path(data)
    if data.is_dir():
        dataset = PreparedDataset(data, split)
        check_tokenizer(dataset, tokenizer, checkpoint_dir)
        yield dataset
        return
    if not data.is_file():
        raise UserError(f"--data {data} does not exist; pass a prepared directory or a JSON/JSONL file")
    records = [record for _, record in load_json_records(data)]
    chat = isinstance(chosen.template, ChatTemplate)  # the last assistant turn of each conversation is the reference
    if not any(is_conversation(r) or isinstance(r, dict) and any(r.get(k) for k in _OUTPUT_FIELDS) for r in records):
        raise UserError(f"{data} has no reference outputs (no {' or '.join(_OUTPUT_FIELDS)} field); "
                        f"evaluate needs the expected answers")
    with tempfile.TemporaryDirectory() as tmp:
        options = dict(val_size=0, max_seq_length=load_config(checkpoint_dir).max_seq_len)
        if chat:
            prepare_chat(checkpoint_dir, data, Path(tmp) / "data", template=chosen.template, system=chosen.system,
                         **options)
        else:
            prepare(checkpoint_dir, Path(tmp) / "data", data_file=data, template=chosen.name, **options)
        yield PreparedDataset(Path(tmp) / "data", "train")  # every record of the file, in its order


def examples_hash(dataset: PreparedDataset, n: int) -> str:
    """sha256 of the first n examples as scored: their tokens, loss targets, boundaries and prompt lengths. The same
    for the same data wherever it lies; another once the data is prepared again with other content (another file,
    template or split)."""
    digest = hashlib.sha256()
    end = int(dataset.offsets[n])
    for array in (dataset.tokens[:end], dataset.targets[:end], dataset.offsets[: n + 1], dataset.prompt_lengths[:n]):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def examples(dataset: PreparedDataset, indices: range, eos_id: int | None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) of the examples `indices`. The reference is the run of target tokens after the
    prompt (a conversation's last answer, not the template's text after it), without a final EOS."""
    out = []
    for i in indices:
        start, end = dataset.offsets[i], dataset.offsets[i + 1]
        ids, targets = dataset.tokens[start:end].tolist(), dataset.targets[start:end]
        prompt_length = int(dataset.prompt_lengths[i])
        stop = next((j for j in range(prompt_length, len(ids)) if not targets[j]), len(ids))
        response = ids[prompt_length:stop]
        out.append((ids[:prompt_length], response[:-1] if response and response[-1] == eos_id else response))
    return out


# ---------------------------------------------------------------------------------------------- scoring
def evaluate(
    checkpoint_dir: Path, data: Path, lora_paths: list[Path] = (), split: str = "val", metric: str = "both",
    limit: int | None = None, batch_size: int = 8, max_new_tokens: int = 64, template: str = "auto",
    precision: str = "auto", verify: bool = True, baseline: Path | None = None, progress: bool = True,
    out: Path | None = None, engine: str = "torch", device: str = "auto", quantize: str | None = None,
    beta: float = 0.1,
) -> dict[str, Any]:
    """Score the base and each adapter on the same examples; returns {"models": [...], "predictions": [...], ...}.

    `baseline`: an earlier result (`--out`) on the same examples; its models are shown first and not scored again.
    `out`: a JSON file to write the result to, checked before the work and written at once when it is done.
    `engine`: what generates the answers for exact match (torch, llama.cpp or auto); losses are always torch's.
    `device`: where the torch model runs (auto: the first GPU, else the CPU). `quantize`: the base's weights, none,
    nf4 (losses and answers) or int8 (answers; losses over the full-precision weights); None: nf4 for adapters
    trained over it, else none. `beta`: the DPO reward's scale on preference data.
    """
    if metric not in METRICS:
        raise UserError(f"unknown --metric {metric!r}; use one of {', '.join(METRICS)}")
    for name, value in (("--limit", limit), ("--batch_size", batch_size), ("--max_new_tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if not (math.isfinite(beta) and beta > 0):
        raise UserError(f"--beta must be > 0, got {beta}")
    check_precision(precision)
    where = resolve_device(device)
    if out is not None:
        check_file_destination(out, [checkpoint_dir, data, baseline, *lora_paths])
    config, tokenizer = load_config(checkpoint_dir), Tokenizer(checkpoint_dir)
    adapters = [(str(p), *load_checked_adapter(p, checkpoint_dir, config, verify=verify)) for p in lora_paths]
    recorded = next((meta for *_, meta in adapters if any(recorded_prompt(meta).values())), load_info(checkpoint_dir))
    chosen = prompt_format(template, recorded, tokenizer)
    quantize = decoding_quantize(quantize, [meta for *_, meta in adapters], sys.stderr)
    if metric != "loss":
        engine = llamacpp.choose_engine(engine, checkpoint_dir, [(Path(p), meta) for p, *_, meta in adapters],
                                        sys.stderr, where, quantize)

    with open_data(data, split, checkpoint_dir, tokenizer, chosen) as dataset:
        pairs = PreferencePairs(dataset) if is_preference(dataset.meta) else None
        size = len(pairs) if pairs else len(dataset)
        n = size if limit is None else min(limit, size)
        scored = range(0, 2 * n, 2) if pairs else range(n)  # the examples exact match asks (a pair's chosen)
        if n == 0:
            raise UserError(f"the {split} split of {data} is empty; choose another --split or prepare the data "
                            f"with a validation split (--val_size)")
        if metric != "loss" and not dataset.prompt_lengths[scored].all():
            raise UserError(f"{data} holds conversations whose answers cannot be located (prepared with --train_on all "
                            f"and a template that hides its turns), so there is nothing to generate from; use "
                            f"--metric loss")
        digest = examples_hash(dataset, 2 * n if pairs else n)
        earlier = read_baseline(baseline, digest, n, metric) if baseline else None
        precision = resolve_precision(precision, where.type)
        model = load_model(checkpoint_dir, PRECISIONS[precision][0], where, verify=verify, quantize=quantize).eval()
        # (score, adapter or None for the base); a base the baseline already scored is not scored again
        models = [(Score("base", n), None)] + [(Score(name, n), (cfg, state, Path(name)))
                                                 for name, cfg, state, _ in adapters]
        if earlier and any(m["name"] == "base" for m in earlier["models"]) and not pairs:  # pairs: the reference
            models = models[1:]
        scores = [score for score, _ in models]
        units = len(models) * (math.ceil(n / batch_size) * (1 + (metric != "loss")))
        with tqdm(total=units, desc="evaluate", disable=not progress, leave=False) as bar:
            if metric != "exact_match" and pairs:
                score_preferences(model, pairs, n, batch_size, precision, tokenizer.pad_id, models, bar, beta)
            elif metric != "exact_match":
                score_losses(model, dataset, n, batch_size, precision, tokenizer.pad_id, models, bar)
            if metric != "loss":
                questions = examples(dataset, scored, tokenizer.eos_id)
                stop_strings = prompt_format("auto", dataset.meta, tokenizer).stop_strings
                answerer = TorchEngine(decoding_model(model, quantize)) if engine == "torch" else \
                    llamacpp.LlamaCppEngine(checkpoint_dir, precision, verify, None)
                score_answers(answerer, tokenizer, questions, stop_strings, batch_size, max_new_tokens, models, bar)
                references = [tokenizer.decode(ref) for _, ref in questions]
                prompts = [tokenizer.decode(prompt, skip_special=False) for prompt, _ in questions]
    if metric != "loss":
        for s in scores:
            s.exact_match = sum(a.strip() == r.strip() for a, r in zip(s.answers, references)) / n
            s.exact_match_normalized = sum(normalize(a) == normalize(r) for a, r in zip(s.answers, references)) / n
            s.stopped = sum(s.stops) / n
    result = {"checkpoint_dir": str(checkpoint_dir), "data": str(data), "split": split, "n": n,
              "examples_sha256": digest, "precision": precision, "quantize": quantize,
              "models": [s.row() for s in scores]}
    if metric != "loss":
        result["predictions"] = [{"prompt": p, "reference": r, "answers": {s.name: s.answers[i] for s in scores}}
                                 for i, (p, r) in enumerate(zip(prompts, references))]
    result = merge_baseline(earlier, result) if earlier else result
    if out is not None:
        write_json(out, result)
    return result


def read_baseline(path: Path, digest: str, n: int, metric: str) -> dict[str, Any]:
    """An earlier `--out` result, checked to be on the same examples (by their hash, wherever the data lies) and
    to hold what this run reports."""
    try:
        earlier = json.loads(Path(path).read_text())
        scored, recorded, models = earlier["n"], earlier.get("examples_sha256"), earlier["models"]
        where = f"{earlier['data']}, split {earlier['split']}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--baseline {path} is not an evaluate --out file: {e}") from None
    if recorded is None:
        raise UserError(f"--baseline {path} records no hash of the examples it scored (an older lit-lora wrote it); "
                        f"evaluate its models again with --out")
    if (scored, recorded) != (n, digest):
        why = (f"{scored} examples, this run {n}" if scored != n
               else "as many, with other content: other data, or data prepared again differently")
        raise UserError(f"--baseline {path} scored other examples ({why}; it scored {where}); evaluate the same data, "
                        f"--split and --limit")
    if metric != "loss" and "predictions" not in earlier:
        raise UserError(f"--baseline {path} has no exact-match predictions; score it with --metric both")
    return earlier


def merge_baseline(earlier: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The earlier models' rows first, then this run's; predictions side by side."""
    names = {m["name"] for m in result["models"]}
    result["models"] = [m for m in earlier["models"] if m["name"] not in names] + result["models"]
    for mine, theirs in zip(result.get("predictions", []), earlier.get("predictions", [])):
        mine["answers"] = {**{k: v for k, v in theirs["answers"].items() if k not in names}, **mine["answers"]}
    return result


def mixed_precision(model, precision: str):
    """The autocast context of `precision` on the model's device, as Fabric's mixed precision (CPU: bf16 only)."""
    device = model.embed_tokens.weight.device
    low = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    on = low is not None and (device.type != "cpu" or low == torch.bfloat16)
    return lambda: torch.autocast(device.type, dtype=low or torch.bfloat16, enabled=on)


def score_preferences(model, pairs: PreferencePairs, n, batch_size, precision, pad_id, models, bar, beta) -> None:
    """Per model, the chosen answers' loss, and both answers' implicit reward against the base (scored first, as
    the reference, also when a baseline already holds its row)."""
    batches = eval_batches(pairs.lengths, n, batch_size)
    lora_dtype, t = PRECISIONS[precision][1], TrainSection()
    device = model.embed_tokens.weight.device

    def log_probs() -> RowLogProbs:  # over whole answers: the reported rewards are the standard ones
        return pair_log_probs(model, pairs, batches, pad_id, t.pad_multiple, t.loss_chunk_size,
                              lambda b: to_device(b, device), mixed_precision(model, precision))
    start = time.perf_counter()
    base, counts = log_probs()[:2]
    base_seconds = time.perf_counter() - start
    for score, adapter in models:
        start = time.perf_counter()
        if adapter is None:
            logps = base
        else:
            with lora_applied(model, *adapter[:2], lora_dtype):
                logps = log_probs().logps
        bar.update(len(batches))
        losses, chosen, rejected = dpo_losses(logps[0::2], logps[1::2], base[0::2], base[1::2], beta)
        means = stats_dict(pair_stats(chosen, rejected), len(losses))
        score.reward_accuracy, score.reward_margin = means["accuracy"], means["margin"]
        score.dpo_loss = losses.mean().item()
        score.loss = (-logps[0::2].sum() / counts[0::2].sum().clamp(min=1)).item()
        score.perplexity = math.exp(min(score.loss, 50))
        score.seconds += time.perf_counter() - start + (base_seconds if adapter is None else 0)


def score_losses(model, dataset, n, batch_size, precision, pad_id, models, bar) -> None:
    """Loss and perplexity of the base and each adapter (unmerged, in the LoRA dtype of `precision`)."""
    batches = eval_batches(dataset.lengths, n, batch_size)
    lora_dtype = PRECISIONS[precision][1]
    t = TrainSection()  # collated as a run with the default training settings collates its validation batches
    device = model.embed_tokens.weight.device
    autocast = mixed_precision(model, precision)
    for score, adapter in models:
        start = time.perf_counter()
        with lora_applied(model, *adapter[:2], lora_dtype) if adapter else contextlib.nullcontext():
            total = torch.zeros(2)
            for batch in batches:
                total += summed_loss(model, dataset, [batch], pad_id, t.packing, t.pad_multiple, t.loss_chunk_size,
                                     to_device=lambda b: to_device(b, device), autocast=autocast)
                bar.update(1)
        score.loss = (total[0] / total[1].clamp(min=1)).item()
        score.perplexity = math.exp(min(score.loss, 50))
        score.seconds += time.perf_counter() - start


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def score_answers(engine, tokenizer, pairs, stop_strings, batch_size, max_new_tokens, models, bar) -> None:
    """Greedy answers of the base and each adapter: with the torch engine merged into the weights, then restored."""
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0)
    for score, adapter in models:
        start = time.perf_counter()
        lora_config, state, path = adapter or (None, None, None)
        with engine.adapter(path, lora_config, state) as answer:
            for i in range(0, len(pairs), batch_size):
                texts, _, stopped = answer(tokenizer, [p for p, _ in pairs[i : i + batch_size]], stop_strings,
                                           sampling, None)
                score.answers.extend(texts)
                score.stops.extend(stopped)
                bar.update(1)
        score.seconds += time.perf_counter() - start


def format_table(result: dict[str, Any]) -> str:
    """One row per model: loss, perplexity, exact match (strict / normalised), answers that stopped, examples,
    seconds."""
    def cell(value: float | None, fmt: str, width: int) -> str:
        return f"{'-':>{width}}" if value is None else format(value, fmt)

    def percent(value: float | None) -> str:
        return cell(None if value is None else 100 * value, "6.1f", 6) + ("%" if value is not None else " ")

    width = max(len(m["name"]) for m in result["models"])
    pairs = any(m.get("reward_accuracy") is not None for m in result["models"])
    lines = [f"{'model':<{width}}  {'loss':>7}  {'ppl':>8}  {'exact':>7}  {'normed':>7}  {'stopped':>7}  "
             + (f"{'reward acc':>10}  {'margin':>8}  {'dpo loss':>8}  " if pairs else "") + f"{'n':>5}  {'seconds':>7}"]
    for m in result["models"]:
        preference = (f"{percent(m.get('reward_accuracy')):>10}  {cell(m.get('reward_margin'), '8.4f', 8)}  "
                      f"{cell(m.get('dpo_loss'), '8.4f', 8)}  ") if pairs else ""
        lines.append(f"{m['name']:<{width}}  {cell(m['loss'], '7.4f', 7)}  {cell(m['perplexity'], '8.2f', 8)}  "
                     f"{percent(m['exact_match'])}  {percent(m['exact_match_normalized'])}  "
                     f"{percent(m.get('stopped'))}  {preference}{m['n']:>5}  "
                     f"{m['seconds']:>7.1f}")
    return "\n".join(lines)
