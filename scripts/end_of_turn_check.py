"""Has the model learnt where an answer ends? Teacher-forced, on prepared conversations.

    python scripts/end_of_turn_check.py --checkpoint_dir CKPT --data data/chat --lora_path out/lora/RUN/final

For each of the first --limit examples of the split, the model reads the conversation up to the last token of
the reference's final answer, and we look at what it predicts next: the template's end-of-turn marker (the last
target token of that turn) should be its first choice. Printed per model (the base, then each adapter): how often
it is, and the marker's mean probability. Free generation (`evaluate`, column `stopped`) also depends on the model
not looping before it gets there; this isolates the end itself.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lit_lora.adapter import load_checked_adapter, merge_adapter, restore_weights
from lit_lora.checkpoint import load_model
from lit_lora.data.dataset import PreparedDataset


def marker_positions(dataset: PreparedDataset, limit: int) -> list[tuple[list[int], int]]:
    """(ids up to and with the marker, the marker's index) of the final answer of each example."""
    out = []
    for i in range(min(limit, len(dataset))):
        start, end = dataset.offsets[i], dataset.offsets[i + 1]
        ids, targets = dataset.tokens[start:end].tolist(), dataset.targets[start:end]
        j = int(dataset.prompt_lengths[i])
        while j + 1 < len(ids) and targets[j + 1]:
            j += 1
        out.append((ids[: j + 1], j))
    return out


@torch.inference_mode()
def score(model, examples: list[tuple[list[int], int]]) -> tuple[int, float]:
    top, probability = 0, 0.0
    for ids, j in examples:
        logits = model(torch.tensor([ids[:j]]))[0, -1].float()
        top += int(logits.argmax()) == ids[j]
        probability += torch.softmax(logits, -1)[ids[j]].item()
    return top, probability / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="a directory written by prepare-chat")
    parser.add_argument("--lora_path", type=Path, action="append", default=[])
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=50)
    args = parser.parse_args()
    examples = marker_positions(PreparedDataset(args.data, args.split), args.limit)
    model = load_model(args.checkpoint_dir).eval()
    print(f"{'model':<40} {'marker first':>12} {'mean p':>7}")
    for name in ["base", *map(str, args.lora_path)]:
        originals = {}
        if name != "base":
            lora_config, state, _ = load_checked_adapter(Path(name), args.checkpoint_dir, model.config)
            originals = merge_adapter(model, lora_config, state)
        top, mean_p = score(model, examples)
        print(f"{name:<40} {top:>7}/{len(examples):<4} {mean_p:>7.3f}")
        restore_weights(model, originals)


if __name__ == "__main__":
    main()
