"""Turn a file of chosen/rejected pairs into prepared preference data, rendered with a chat template.

Records come in the shapes people have:

    {"prompt": "...", "chosen": "...", "rejected": "..."}                         strings: the prompt is one user turn
    {"prompt": [messages], "chosen": [assistant turn], "rejected": [...]}        TRL's conversational form
    {"chosen": [messages], "rejected": [messages]}                               TRL's implicit prompt: all but the
                                                                                 last turn, which must be the same
    {"conversations": [turns], "chosen": {"from": "gpt", "value"}, "rejected"}   LLaMA-Factory's ShareGPT form

Each answer is one assistant turn after the prompt (whose last turn is the user's). Both conversations are rendered
and masked by `prompts.masking.encode_conversation` with the loss on the answer and its end marker only, and must
share their prompt tokens. A pair longer than max_seq_length loses its first exchanges (a system turn is kept), as
prepare-chat's --train_on last does; when the prompt alone still leaves no room its answers are cut, and when it
leaves none at all the pair is dropped; all three are counted. Pair i is written as examples 2i (chosen) and 2i + 1
(rejected); meta.json says `"preference": true`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lit_lora.checkpoint import check_checkpoint_dir
from lit_lora.data.conversations import chat_meta, shorter_versions
from lit_lora.data.prepare import Example, check_split_options, identical_groups, lengths_line, \
    split_indices, write_prepared
from lit_lora.data.readers import load_json_records, normalize_turn
from lit_lora.errors import UserError
from lit_lora.fileio import check_destination, sha256_file
from lit_lora.prompts.chat_template import ChatTemplate
from lit_lora.prompts.masking import EncodedChat, encode_conversation
from lit_lora.tokenizer import Tokenizer

Pair = tuple[list[dict[str, str]], str, str]  # (prompt messages, chosen answer, rejected answer)


def turns(value: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise UserError(f'"{what}" must be a string or a non-empty list of turns')
    return [normalize_turn(turn, f"{what} turn {i}") for i, turn in enumerate(value)]


def answer(value: Any, what: str) -> str:
    """The text of one assistant answer: a string, one turn, or a list holding one assistant turn."""
    if isinstance(value, str):
        return value
    answer_turns = [normalize_turn(value, what)] if isinstance(value, dict) else turns(value, what)
    if len(answer_turns) != 1 or answer_turns[0]["role"] != "assistant":
        raise UserError(f'"{what}" must be one assistant answer (a string or one assistant turn), got '
                        f"{len(answer_turns)} turn(s): {', '.join(t['role'] for t in answer_turns)}")
    return answer_turns[0]["content"]


def read_pair(record: Any) -> tuple[Pair, str]:
    """(the record as a pair, its shape's name)."""
    if not isinstance(record, dict):
        raise UserError(f"a preference record must be an object with chosen and rejected, got {record!r:.80}")
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise UserError(f"the record has no {' and no '.join(missing)} answer; every record needs chosen and "
                        f"rejected")
    if "conversations" in record:
        prompt, kind = turns(record["conversations"], "conversations"), "sharegpt"
        if isinstance(record.get("system"), str) and record["system"].strip() and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": record["system"]}, *prompt]
    elif "prompt" in record:
        prompt_value = record["prompt"]
        kind = "strings" if isinstance(prompt_value, str) else "messages"
        prompt = [{"role": "user", "content": prompt_value}] if kind == "strings" else turns(prompt_value, "prompt")
    else:  # the implicit prompt: chosen and rejected are whole conversations
        chosen, rejected = turns(record["chosen"], "chosen"), turns(record["rejected"], "rejected")
        if chosen[:-1] != rejected[:-1]:
            raise UserError("chosen and rejected hold different prompts (all turns before the last must be the "
                            "same); a pair compares two answers to one prompt")
        return (chosen[:-1], answer(chosen[-1:], "chosen"), answer(rejected[-1:], "rejected")), "implicit prompt"
    return (prompt, answer(record["chosen"], "chosen"), answer(record["rejected"], "rejected")), kind


def read_pairs(path: Path, system: str | None = None) -> tuple[list[Pair], dict[str, Any]]:
    """The pairs in `path`, checked, and what was read. Pairs with an empty answer are dropped and counted."""
    raw = load_json_records(path)
    if not raw:
        raise UserError(f"{path} contains no records")
    pairs, kinds, empty = [], set(), 0
    for where, record in raw:
        try:
            (prompt, chosen, rejected), kind = read_pair(record)
            if not prompt or prompt[-1]["role"] != "user":
                raise UserError("the prompt must end with a user turn (the answers follow it)")
            if chosen == rejected:
                raise UserError("chosen and rejected are the same answer; a pair must prefer one answer to "
                                "another: fix or drop the record")
        except UserError as e:
            raise UserError(f"{path}: {where}: {e}") from None
        kinds.add(kind)
        if not (chosen.strip() and rejected.strip()):
            empty += 1
            continue
        if system and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system}, *prompt]
        pairs.append((prompt, chosen, rejected))
    if not pairs:
        raise UserError(f"{path}: every pair has an empty answer; nothing to train on")
    return pairs, {"kind": ", ".join(sorted(kinds)), "records": len(raw), "empty_answer": empty}


def encode_pair(tokenizer: Tokenizer, template: ChatTemplate, pair: Pair, max_seq_length: int
                ) -> tuple[tuple[EncodedChat, EncodedChat] | None, str | None, int]:
    """(the two encoded conversations cut to fit, or None when dropped; how they were cut; the longer's full length).

    Cut as prepare-chat cuts with --train_on last: whole first exchanges, then the answers' tokens."""
    prompt, chosen, rejected = pair
    conversations = [prompt + [{"role": "assistant", "content": a}] for a in (chosen, rejected)]
    versions = [tuple(conversations), *zip(shorter_versions(conversations[0], "last"),
                                           shorter_versions(conversations[1], "last"))]
    full = None
    for k, version in enumerate(versions):
        encoded = tuple(encode_conversation(tokenizer, template, messages, "last") for messages in version)
        full = full or max(len(e.ids) for e in encoded)
        if max(len(e.ids) for e in encoded) <= max_seq_length:
            return encoded, "cut_at_turn" if k else None, full
    if encoded[0].prompt_length >= max_seq_length:
        return None, "dropped", full
    cut = tuple(EncodedChat(e.ids[:max_seq_length], e.targets[:max_seq_length], e.end_markers, e.prompt_length)
                for e in encoded)
    return (None, "dropped", full) if cut[0].ids == cut[1].ids else (cut, "answer_cut", full)


def encode_pairs(tokenizer: Tokenizer, template: ChatTemplate, pairs: list[Pair], max_seq_length: int, path: Path
                 ) -> tuple[list[Example], list[int], list[int], dict[str, int]]:
    """(examples, chosen then rejected per kept pair; the index of each kept pair; full lengths; counts of what was
    cut)."""
    examples, kept, full_lengths = [], [], []
    counts = {"cut_at_turn": 0, "answer_cut": 0, "dropped": 0, "prompt_tokens_differ": 0}
    for i, pair in enumerate(tqdm(pairs, desc="pairs", unit="pair", disable=len(pairs) < 2000)):
        try:
            encoded, how, length = encode_pair(tokenizer, template, pair, max_seq_length)
        except UserError as e:
            raise UserError(f"{path}: pair {i + 1}: {e}") from None
        full_lengths.append(length)
        if how:
            counts[how] += 1
        if encoded is None:
            continue
        chosen, rejected = encoded
        p = chosen.prompt_length
        if rejected.prompt_length != p or chosen.ids[:p] != rejected.ids[:p]:  # a token merged across the boundary
            counts["prompt_tokens_differ"] += 1
            continue
        examples += [Example(e.ids, e.targets, p) for e in encoded]
        kept.append(i)
    return examples, kept, full_lengths, counts


def prepare_preference(
    checkpoint_dir: Path,
    data_file: Path,
    destination: Path,
    template: str | ChatTemplate = "auto",
    system: str | None = None,
    max_seq_length: int = 1024,
    val_size: int | None = None,
    val_fraction: float | None = None,
    seed: int = 42,
    overwrite: bool = False,
    data_name: str | None = None,
    val_file: Path | None = None,
) -> dict[str, Any]:
    """Prepare the chosen/rejected pairs of `data_file` into `destination`; returns the meta.json written there.

    template: auto (the checkpoint's own chat template), a built-in (chatml, llama3, alpaca, plain) or a .jinja file.
    The validation pairs are drawn at random (val_size, val_fraction; default 10%), or are all of `val_file`'s.
    """
    inputs = [checkpoint_dir, data_file, val_file]
    check_destination(destination, overwrite, inputs, "--destination")  # before the work
    if max_seq_length < 2:
        raise UserError(f"--max_seq_length must be at least 2, got {max_seq_length}")
    if val_file is not None and (val_size is not None or val_fraction is not None):
        raise UserError("pass either --val_file or --val_size/--val_fraction, not both")
    check_split_options(val_size, val_fraction)
    tokenizer = Tokenizer(check_checkpoint_dir(checkpoint_dir))
    chat_template = template if isinstance(template, ChatTemplate) else ChatTemplate.load(template, tokenizer)
    pairs, read = read_pairs(data_file, system)
    n_train = len(pairs)
    if val_file is not None:
        val_pairs, val_read = read_pairs(val_file, system)
        pairs += val_pairs
        read = {**read, "records": read["records"] + val_read["records"],
                "empty_answer": read["empty_answer"] + val_read["empty_answer"]}
    examples, kept, full_lengths, cut = encode_pairs(tokenizer, chat_template, pairs, max_seq_length, data_file)
    if not examples:
        raise UserError(f"--max_seq_length {max_seq_length} is too small for any pair of {data_file}: the shortest "
                        f"is {min(full_lengths)} tokens")
    if val_file is None:
        groups, duplicates = identical_groups([json.dumps(pairs[i], sort_keys=True) for i in kept])
        if val_size is None and val_fraction is None:
            val_fraction = 0.1
        by_pair = split_indices(len(kept), val_size, val_fraction, seed, groups)
    else:
        duplicates = identical_groups([json.dumps(pairs[i], sort_keys=True) for i in kept])[1]
        in_val = [i >= n_train for i in kept]
        by_pair = {"train": [k for k, v in enumerate(in_val) if not v], "val": [k for k, v in enumerate(in_val) if v]}
        if not by_pair["train"]:
            raise UserError(f"no training pair is left from {data_file} (all dropped); check --max_seq_length")
    splits = {split: [j for k in indices for j in (2 * int(k), 2 * int(k) + 1)] for split, indices in by_pair.items()}
    source = {"path": data_name or str(data_file), "sha256": sha256_file(data_file), "kind": read.pop("kind")}
    if val_file is not None:
        source["val_file"] = {"path": data_name or str(val_file), "sha256": sha256_file(val_file)}
    counts = {**read, "duplicates": duplicates, **cut, "pairs": len(kept), "examples": len(examples),
              "train": len(splits["train"]), "val": len(splits["val"])}
    meta = {**chat_meta(chat_template, tokenizer, "last", system, max_seq_length, seed, source, counts, full_lengths),
            "preference": True}
    return write_prepared(destination, overwrite, inputs, examples, splits, meta)


def summary(meta: dict[str, Any], destination: Path) -> tuple[list[str], list[str]]:
    """(lines to print, warnings) describing a prepare-preference run."""
    c = meta["counts"]
    lines = [
        f"read {c['records']} records ({meta['source']['kind']}) from {meta['source']['path']}: {c['pairs']} pairs "
        f"({c['train'] // 2} train, {c['val'] // 2} val) written to {destination}",
        f"rendered with {meta['chat_template']['name']}; loss on each answer and its end marker",
        lengths_line(meta["lengths_before_truncation"]),
        f"over --max_seq_length {meta['max_seq_length']}: {c['cut_at_turn']} lost their first exchanges, "
        f"{c['answer_cut']} had their answers cut, {c['dropped']} dropped (no answer token left)",
        f"dropped {c['empty_answer']} with an empty answer, {c['prompt_tokens_differ']} whose two renderings "
        f"tokenise the prompt differently",
    ]
    warnings = []
    if c["duplicates"]:
        warnings.append(f"{c['duplicates']} pairs repeat an earlier one; they are kept, and all copies are in the same "
                        f"split")
    if c["answer_cut"] + c["dropped"] > 0.05 * c["records"]:
        warnings.append(f"{c['answer_cut'] + c['dropped']} of {c['records']} pairs were cut inside their answers or "
                        f"dropped: a cut answer compares only its start; consider raising --max_seq_length")
    return lines, warnings
