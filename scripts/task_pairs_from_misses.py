"""On-policy pairs for the built-in extract task: the training prompts an adapter answers wrongly (greedy), its own
wrong answer rejected and the right one chosen. `prepare-task extract --preference` rejects a synthetic miss
instead (a day/month swap, a distractor number); these are the misses the adapter really makes.

    python scripts/task_pairs_from_misses.py --checkpoint_dir checkpoints/smollm2-135m-instruct \
        --lora_path out/lora/smollm2-135m-task/final --out misses.json
    prepare-preference --checkpoint_dir checkpoints/smollm2-135m-instruct --data_file misses.json \
        --destination data/task-extract-misses --template chatml --max_seq_length 256

The prompts are prepare-task's default training split (seed 42, 3,000 examples; --limit: the first N).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from lit_lora.adapter import load_checked_adapter
from lit_lora.checkpoint import load_config
from lit_lora.data.tasks import make_task, pair_record
from lit_lora.fileio import write_json
from lit_lora.generate import Sampling, TorchEngine
from lit_lora.prompts.format import prompt_format
from lit_lora.tokenizer import Tokenizer


def own_answers(checkpoint_dir: Path, lora_path: Path, records: list[dict], batch_size: int) -> list[str]:
    """The adapter's greedy answer to each record, in the format it was trained in."""
    tokenizer = Tokenizer(checkpoint_dir)
    lora_config, state, meta = load_checked_adapter(lora_path, checkpoint_dir, load_config(checkpoint_dir), True)
    chosen = prompt_format("auto", meta, tokenizer)
    prompts = [chosen.question_ids(tokenizer, r["instruction"], r["input"]) for r in records]
    engine = TorchEngine.load(checkpoint_dir, "auto", True, False, None)
    answers: list[str] = []
    with engine.adapter(lora_path, lora_config, state) as answer:
        for start in tqdm(range(0, len(prompts), batch_size), desc="answers"):
            batch = prompts[start:start + batch_size]
            answers += answer(tokenizer, batch, chosen.stop_strings, Sampling(max_new_tokens=24, temperature=0),
                              None)[0]
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_dir", type=Path, required=True)
    parser.add_argument("--lora_path", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=50)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; choose another --out")
    records = make_task("extract", 3000, 200)["train"][: args.limit]
    answers = own_answers(args.checkpoint_dir, args.lora_path, records, args.batch_size)
    pairs = [pair_record(r, a.strip()) for r, a in zip(records, answers) if a.strip() != r["output"]]
    write_json(args.out, pairs)
    print(f"{len(pairs)} of {len(records)} answers missed ({len(pairs) / len(records):.1%}); wrote them as pairs "
          f"to {args.out}")


if __name__ == "__main__":
    main()
