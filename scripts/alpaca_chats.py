"""Chain Alpaca records into multi-turn conversations (2 to 4 exchanges each), as prepare-chat reads them.

    python scripts/alpaca_chats.py ../shared/data/alpaca_5000.json data/alpaca-chats.jsonl

Real instructions and answers, shuffled with a fixed seed and grouped, so the turns of one conversation are
unrelated: what is learnt is the format (answer each turn, close it with the end-of-turn marker), which is what
the README's chat run measures. Records with an empty answer, or an answer longer than --max_chars, are left out
to keep the conversations short enough for a CPU run.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lit_lora.data.readers import is_placeholder_input, read_records
from lit_lora.fileio import atomic_write_bytes
from lit_lora.prompts.format import instruction_turn


def conversations(records: list, seed: int, min_turns: int, max_turns: int) -> list[dict]:
    rng = random.Random(seed)
    records = records[:]
    rng.shuffle(records)
    chats, i = [], 0
    while i + min_turns <= len(records):
        n = rng.randint(min_turns, max_turns)
        messages = []
        for r in records[i : i + n]:
            messages += [instruction_turn(r.instruction, "" if is_placeholder_input(r.input) else r.input),
                         {"role": "assistant", "content": r.output}]
        chats.append({"messages": messages})
        i += n
    return chats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="Alpaca-style JSON (instruction, input, output)")
    parser.add_argument("out", type=Path, help="JSONL of {\"messages\": [...]} to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_turns", type=int, default=2)
    parser.add_argument("--max_turns", type=int, default=4)
    parser.add_argument("--max_chars", type=int, default=300, help="longest answer kept, in characters")
    args = parser.parse_args()
    records, _ = read_records(args.source, "alpaca")
    kept = [r for r in records if r.output.strip() and len(r.output) <= args.max_chars]
    chats = conversations(kept, args.seed, args.min_turns, args.max_turns)
    atomic_write_bytes(args.out, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats).encode())
    turns = sum(len(c["messages"]) // 2 for c in chats)
    print(f"{len(chats)} conversations ({turns} exchanges) from {len(kept)} of {len(records)} records -> {args.out}")


if __name__ == "__main__":
    main()
