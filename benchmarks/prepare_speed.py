"""Tokenisation rate of data preparation (records/s) on the 5,000-record Alpaca sample.

    python benchmarks/prepare_speed.py --checkpoint_dir checkpoints/smollm2-135m-instruct

Times `prepare` end to end (read, template, tokenise, truncate, split, write) into a temporary directory,
and the batched tokenisation alone; best of --repeats runs, since this machine's timings are noisy.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lit_lora.data.prepare import prepare, tokenize
from lit_lora.data.readers import read_records
from lit_lora.prompts.builtin import instruction_template
from lit_lora.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_5000.json"


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("/work/cache/smollm2-ckpt"))
    parser.add_argument("--data_file", type=Path, default=SHARED)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    records, _ = read_records(args.data_file, "alpaca")
    n = len(records)
    tokenizer = Tokenizer(args.checkpoint_dir)
    template = instruction_template("alpaca").single_turn
    texts = [template.prompt(r.instruction, r.input) for r in records] + [r.output for r in records]
    tokenize_s = best_time(lambda: tokenize(tokenizer, texts, "tokenise"), args.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        prepare_s = best_time(lambda: prepare(args.checkpoint_dir, Path(tmp) / "out", data_file=args.data_file,
                                              format="alpaca"), args.repeats)

    print(f"{n} records from {args.data_file.name}, tokenizer {tokenizer.backend} ({args.checkpoint_dir})")
    print(f"tokenisation only (prompts + responses): {n / tokenize_s:,.0f} records/s ({tokenize_s:.2f} s)")
    print(f"prepare end to end:                      {n / prepare_s:,.0f} records/s ({prepare_s:.2f} s)")
    print(f"so 52,002 Alpaca records take about {52002 / (n / prepare_s):.1f} s to prepare")


if __name__ == "__main__":
    main()
