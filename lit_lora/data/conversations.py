"""Turn a file of conversations (or of instruction records) into prepared data, rendered with a chat template.

Every conversation is rendered and masked by `prompts.masking.encode_conversation`, so training sees exactly the text
the model is served with, and the loss falls on the turns `train_on` names and on the marker that closes each.
A conversation longer than max_seq_length loses whole exchanges: its last ones (it ends after the last assistant turn
that fits), or with train_on="last", whose target is the final answer, its first ones. Only when the shortest of
these is still too long are its tokens cut (counted as mid-turn when that loses targets: the answer's end marker).
All of it is counted, and so are conversations with nothing left to learn from, which are dropped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lit_lora.checkpoint import check_checkpoint_dir
from lit_lora.data.dataset import DATA_FORMAT_VERSION
from lit_lora.data.prepare import (Example, check_split_options, clean, identical_groups, length_stats, lengths_line,
                                   split_indices, write_prepared)
from lit_lora.data.readers import is_conversation, load_json_records, normalize_conversation, read_records
from lit_lora.errors import UserError
from lit_lora.fileio import check_destination, sha256_file
from lit_lora.prompts.chat_template import ChatTemplate
from lit_lora.prompts.format import instruction_turn
from lit_lora.prompts.masking import TRAIN_ON, EncodedChat, encode_conversation
from lit_lora.tokenizer import Tokenizer


def read_conversations(path: Path, system: str | None = None) -> tuple[list[list[dict[str, str]]], dict[str, Any]]:
    """The conversations in `path`, and what was read: OpenAI-style {"messages": [...]}, ShareGPT-style
    {"conversations": [...]}, or instruction records (Alpaca, Dolly) as one user and one assistant turn each.
    `system` (if not empty) becomes the first turn of every conversation that has no system turn. Conversations with
    an empty answer are dropped and counted, as prepare drops records with an empty output."""
    raw = load_json_records(path)
    if not raw:
        raise UserError(f"{path} contains no records")
    counts: dict[str, Any] = {"records": len(raw)}
    if is_conversation(raw[0][1]):
        conversations = []
        for where, record in raw:
            try:
                conversations.append(normalize_conversation(record))
            except UserError as e:
                raise UserError(f"{path}: {where}: {e}") from None
        kind = "sharegpt" if isinstance(raw[0][1], dict) and "conversations" in raw[0][1] else "messages"
        # An empty answer would teach the model to answer with nothing but the end marker.
        answered = [c for c in conversations if all(m["content"].strip() for m in c if m["role"] == "assistant")]
        counts["empty_output"] = len(conversations) - len(answered)
        conversations = answered
    elif not (isinstance(raw[0][1], dict) and "instruction" in raw[0][1]):
        raise UserError(f"{path}: {raw[0][0]} is neither a conversation ({{\"messages\": [...]}} or "
                        f"{{\"conversations\": [...]}}) nor an instruction record ({{\"instruction\", \"output\"}})")
    else:
        records, fields = read_records(path, raw=raw)
        records, cleaned = clean(records)
        counts.update(cleaned)
        conversations = [[instruction_turn(r.instruction, r.input), {"role": "assistant", "content": r.output}]
                         for r in records]
        kind = "instructions (" + ", ".join(f"{ours}={theirs}" for ours, theirs in fields.items()) + ")"
    if not conversations:
        raise UserError(f"{path}: every record has an empty answer; nothing to train on")
    if system:
        conversations = [c if c[0]["role"] == "system" else [{"role": "system", "content": system}, *c]
                         for c in conversations]
    return conversations, {"kind": kind, **counts}


def shorter_versions(messages: list[dict[str, str]], train_on: str) -> list[list[dict[str, str]]]:
    """The conversation cut at turn boundaries, longest first: without its last exchanges, or with train_on="last"
    (whose target is the final answer) without its first ones, a leading system turn kept."""
    if train_on == "last":
        head = messages[:1] if messages[0]["role"] == "system" else []
        return [head + messages[i:] for i, m in enumerate(messages) if m["role"] == "user" and i > len(head)]
    ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return [messages[: end + 1] for end in reversed(ends)]


def fit(tokenizer: Tokenizer, template: ChatTemplate, messages: list[dict[str, str]], train_on: str,
        max_seq_length: int) -> tuple[EncodedChat | None, str | None, int]:
    """(the encoded conversation cut to fit, or None when nothing to learn is left; how it was cut; its full length).

    Cut at a turn boundary where one fits; else the shortest version's tokens are cut, which counts as mid-turn
    only if that loses targets (an answer's end), not just the template's text after the last one."""
    full = encode_conversation(tokenizer, template, messages, train_on)
    if len(full.ids) <= max_seq_length:
        return full, None, len(full.ids)
    shortest = full
    for version in shorter_versions(messages, train_on):
        shortest = encode_conversation(tokenizer, template, version, train_on)
        if len(shortest.ids) <= max_seq_length:
            return shortest, "cut_at_turn", len(full.ids)
    if shortest.prompt_length >= max_seq_length or not any(shortest.targets[:max_seq_length]):
        return None, "dropped", len(full.ids)
    cut = EncodedChat(shortest.ids[:max_seq_length], shortest.targets[:max_seq_length], shortest.end_markers,
                      shortest.prompt_length)
    return cut, "cut_mid_turn" if any(shortest.targets[max_seq_length:]) else "cut_at_turn", len(full.ids)


def encode_all(tokenizer: Tokenizer, template: ChatTemplate, conversations: list[list[dict[str, str]]],
               train_on: str, max_seq_length: int, path: Path
               ) -> tuple[list[Example], list[int], list[int], dict[str, int]]:
    """(examples, the index of the conversation each comes from, full lengths, counts of what was cut)."""
    examples, kept, full_lengths = [], [], []
    counts = {"cut_at_turn": 0, "cut_mid_turn": 0, "dropped": 0, "no_end_marker": 0}
    for i, messages in enumerate(tqdm(conversations, desc="conversations", unit="conv",
                                      disable=len(conversations) < 2000)):
        try:
            encoded, how, length = fit(tokenizer, template, messages, train_on, max_seq_length)
        except UserError as e:
            raise UserError(f"{path}: conversation {i + 1}: {e}") from None
        full_lengths.append(length)
        if how:
            counts[how] += 1
        if encoded is not None:
            counts["no_end_marker"] += encoded.end_markers.count(None)
            examples.append(Example(encoded.ids, encoded.targets, encoded.prompt_length))
            kept.append(i)
    return examples, kept, full_lengths, counts


def prepare_chat(
    checkpoint_dir: Path,
    data_file: Path,
    destination: Path,
    template: str | ChatTemplate = "auto",
    train_on: str = "assistant",
    system: str | None = None,
    max_seq_length: int = 2048,
    val_size: int | None = None,
    val_fraction: float | None = None,
    seed: int = 42,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare the conversations of `data_file` into `destination`; returns the meta.json written there.

    template: auto (the checkpoint's own chat template), a built-in (chatml, llama3, alpaca, plain), a .jinja file,
    or a loaded ChatTemplate (evaluate passes the one an adapter recorded).
    train_on: assistant (every assistant turn and its end marker), last (the final assistant turn), all (every token).
    """
    inputs = [checkpoint_dir, data_file]
    check_destination(destination, overwrite, inputs, "--destination")  # before the work
    if train_on not in TRAIN_ON:
        raise UserError(f"unknown --train_on {train_on!r}; use one of {', '.join(TRAIN_ON)}")
    if max_seq_length < 2:
        raise UserError(f"--max_seq_length must be at least 2, got {max_seq_length}")
    check_split_options(val_size, val_fraction)
    tokenizer = Tokenizer(check_checkpoint_dir(checkpoint_dir))
    chat_template = template if isinstance(template, ChatTemplate) else ChatTemplate.load(template, tokenizer)
    conversations, read = read_conversations(data_file, system)
    examples, kept, full_lengths, cut = encode_all(tokenizer, chat_template, conversations, train_on,
                                                   max_seq_length, data_file)
    if not examples:
        raise UserError(f"--max_seq_length {max_seq_length} is too small for any conversation of {data_file}: "
                        f"the shortest is {min(full_lengths)} tokens")
    groups, duplicates = identical_groups([json.dumps(conversations[i], sort_keys=True) for i in kept])
    splits = split_indices(len(examples), val_size, val_fraction, seed, groups)
    source = {"path": str(data_file), "sha256": sha256_file(data_file), "kind": read.pop("kind")}
    counts = {**read, "duplicates": duplicates, **cut, "examples": len(examples), "train": len(splits["train"]),
              "val": len(splits["val"])}
    meta = chat_meta(chat_template, tokenizer, train_on, system, max_seq_length, seed, source, counts, full_lengths)
    return write_prepared(destination, overwrite, inputs, examples, splits, meta)


def chat_meta(template: ChatTemplate, tokenizer: Tokenizer, train_on: str, system: str | None, max_seq_length: int,
              seed: int, source: dict[str, Any], counts: dict[str, Any], full_lengths: list[int]) -> dict[str, Any]:
    """meta.json of data rendered with a chat template: prepare-chat's, and prepare-preference's with its flag."""
    return {
        "format_version": DATA_FORMAT_VERSION,
        "template": "chat",
        "chat_template": template.record(),
        "train_on": train_on,
        "system": system,
        "tokenizer": tokenizer.identity(),
        "max_seq_length": max_seq_length,
        "seed": seed,
        "source": source,
        "counts": counts,
        "lengths_before_truncation": length_stats(full_lengths),
    }


def summary(meta: dict[str, Any], destination: Path) -> tuple[list[str], list[str]]:
    """(lines to print, warnings) describing a prepare-chat run."""
    c = meta["counts"]
    lines = [
        f"read {c['records']} records ({meta['source']['kind']}) from {meta['source']['path']}: {c['examples']} "
        f"conversations ({c['train']} train, {c['val']} val) written to {destination}",
        f"rendered with {meta['chat_template']['name']}; loss on {meta['train_on']} turns",
        lengths_line(meta["lengths_before_truncation"]),
        f"over --max_seq_length {meta['max_seq_length']}: {c['cut_at_turn']} cut after an earlier assistant turn, "
        f"{c['cut_mid_turn']} cut inside their first answer (end marker lost), {c['dropped']} dropped (no answer "
        f"token left)",
    ]
    lines.append(f"dropped {c['empty_output']} with an empty answer" + (
        f"; {c['placeholder_input']} placeholder inputs (like <noinput>) treated as no input"
        if "placeholder_input" in c else ""))
    warnings = []
    if c["duplicates"]:
        warnings.append(f"{c['duplicates']} conversations repeat an earlier one; they are kept, and all copies are in "
                        f"the same split")
    if c["no_end_marker"] and meta["train_on"] != "all":
        warnings.append(f"the template closes {c['no_end_marker']} assistant turns with no special token, so the "
                        f"model may not learn to stop; a chat model's own template (--template auto) does")
    return lines, warnings
