"""Reading records from JSON or JSONL: instructions into (instruction, input, output) triples, and conversations
(OpenAI messages, ShareGPT) into [{"role", "content"}] turns.

Alpaca and Dolly are presets of one reader: a format is just the names its records use for our three fields.
Every problem is a UserError naming the file, the record (1-based) and what is wrong.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_lora.errors import UserError

FIELDS = ("instruction", "input", "output")
REQUIRED = ("instruction", "output")  # a record without input is an instruction on its own
FORMATS = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "dolly": {"instruction": "instruction", "input": "context", "output": "response"},
}


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str


def parse_field_map(text: str | None) -> dict[str, str]:
    """Parse --field_map: "instruction=question,output=answer" -> {"instruction": "question", "output": "answer"}."""
    if not text:
        return {}
    mapping = {}
    for item in text.split(","):
        ours, sep, theirs = (part.strip() for part in item.partition("="))
        if not sep or not ours or not theirs:
            raise UserError(f"--field_map entry {item.strip()!r} is not FIELD=NAME (e.g. instruction=question)")
        if ours not in FIELDS:
            raise UserError(f"--field_map names unknown field {ours!r}; the fields are {', '.join(FIELDS)}")
        mapping[ours] = theirs
    return mapping


def load_json_records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) pairs from a JSON list or a JSONL file; `where` is "record N" or "line N"."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not text.strip():
        raise UserError(f"{path} is empty")
    if Path(path).suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            # Several objects one per line is JSONL whatever the file is called; anything else is broken.
            if not (e.msg == "Extra data" and text.lstrip().startswith("{")):
                raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        else:
            if not isinstance(data, list):
                raise UserError(f"{path} holds a JSON {type(data).__name__}, not a list of records "
                                f"(expected [record, ...], or JSONL: one record per line)")
            return [(f"record {i + 1}", record) for i, record in enumerate(data)]
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {n} is not valid JSON: {e.msg} at column {e.colno}") from None
    return records


def detect_format(path: Path, record: Any, field_map: dict[str, str]) -> str:
    """Alpaca or Dolly, by the name the first record gives its output (a --field_map for it settles it)."""
    if "output" in field_map:
        return "alpaca"
    if isinstance(record, dict):
        for name, fields in FORMATS.items():
            if fields["output"] in record:
                return name
    raise UserError(f"{path}: cannot tell the format from the first record (no 'output' or 'response' field); "
                    f"pass --format or --field_map")


def read_records(path: Path, format: str = "auto", field_map: dict[str, str] | None = None,
                 raw: list[tuple[str, Any]] | None = None) -> tuple[list[Record], dict[str, str]]:
    """Every record of `path` (or of `raw`, its records already loaded), and the field names read (the format's,
    overridden by `field_map`)."""
    if format not in (*FORMATS, "auto"):
        raise UserError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}, auto")
    raw = load_json_records(path) if raw is None else raw
    if not raw:
        raise UserError(f"{path} contains no records")
    field_map = field_map or {}
    if format == "auto":
        format = detect_format(path, raw[0][1], field_map)
    names = {**FORMATS[format], **field_map}
    return [_to_record(path, where, record, names) for where, record in raw], names


def _to_record(path: Path, where: str, record: Any, names: dict[str, str]) -> Record:
    if not isinstance(record, dict):
        raise UserError(f"{path}: {where} is a JSON {type(record).__name__}, not an object with fields")
    values = {}
    for field in FIELDS:
        value = record.get(names[field])
        if value is None and field in REQUIRED:
            raise UserError(f"{path}: {where} has no {names[field]!r} field"
                            + (f" (present: {', '.join(map(repr, record))})" if record else " (it is empty)"))
        if value is not None and not isinstance(value, str):
            raise UserError(f"{path}: {where}: {names[field]!r} must be a string, not {type(value).__name__}")
        values[field] = value or ""
    return Record(**values)


# Alpaca's generator wrote "<noinput>" when a task had no input, and the data keeps many spellings of it:
# "<No Input>", "No input.", "[noinput]", "\<noinput\>", "No input required". They mean "no input".
_PLACEHOLDER = re.compile(r"no\s*input(\s*(required|needed))?", re.IGNORECASE)


def is_placeholder_input(text: str) -> bool:
    return bool(text) and _PLACEHOLDER.fullmatch(re.sub(r"[^\w\s]", "", text).strip()) is not None


# ---------------------------------------------------------------------------------------------- conversations
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def normalize_conversation(record: Any) -> list[dict[str, str]]:
    """[{"role", "content"}] from {"messages": [{"role", "content"}]}, ShareGPT's
    {"conversations": [{"from", "value"}]}, or a bare list of either kind.

    Roles are system/user/assistant (ShareGPT's human/gpt map to user/assistant); an assistant turn is required."""
    turns = record
    if isinstance(record, dict):
        if "messages" in record and "conversations" in record:  # which one was meant is not ours to guess
            raise UserError('the record has both "messages" and "conversations"; keep one of the two keys')
        turns = record.get("messages", record.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise UserError('a conversation must be {"messages": [...]} or {"conversations": [...]} with at least one turn')
    messages = [normalize_turn(turn, f"turn {i}") for i, turn in enumerate(turns)]
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("the conversation has no assistant turn, so there is nothing to train on")
    return messages


def normalize_turn(turn: Any, where: str) -> dict[str, str]:
    """{"role", "content"} from an OpenAI-style {"role", "content"} or a ShareGPT-style {"from", "value"} turn."""
    if not isinstance(turn, dict):
        raise UserError(f"{where} of the conversation is not an object: {turn!r:.80}")
    sharegpt = "role" not in turn and "from" in turn
    role = SHAREGPT_ROLES.get(turn.get("from")) if sharegpt else turn.get("role")
    content = turn.get("value") if sharegpt else turn.get("content")
    if role not in ROLES:
        given = turn.get("from") if sharegpt else turn.get("role")
        raise UserError(f"{where} has role {given!r}; expected one of system, user, assistant "
                        "(ShareGPT: system, human, gpt)")
    if isinstance(content, list):
        raise UserError(f"{where} ({role}) has a list of content parts; lit-lora trains on text: give the "
                        "content as one string")
    if not isinstance(content, str):
        raise UserError(f"{where} ({role}) has no text content")
    return {"role": role, "content": content}


def is_conversation(record: Any) -> bool:
    return isinstance(record, list) or isinstance(record, dict) and ("messages" in record or "conversations" in record)
