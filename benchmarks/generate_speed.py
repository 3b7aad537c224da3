"""Decode speed: our KV-cache loop vs transformers' `generate`, same checkpoint, prompt, dtype, greedy.

    python benchmarks/generate_speed.py --checkpoint_dir /work/cache/smollm2-ckpt [--precision bf16-true]

Both sides generate exactly --new_tokens tokens (EOS ignored) after a warm-up run; the time includes the
(short) prompt's prefill. The HF side is our checkpoint exported with `export_hf`, so the weights are the
same. On a shared machine the numbers are noisy: run it when the machine is quiet, look at the best of
--repeats.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lit_lora.checkpoint import load_model
from lit_lora.device import GENERATE_PRECISIONS, PRECISIONS
from lit_lora.export import export_hf
from lit_lora.fast_decode import prepare_for_generation
from lit_lora.generate import Sampling, generate_tokens
from lit_lora.prompts.builtin import instruction_template
from lit_lora.tokenizer import Tokenizer

PROMPT = "Write a short story about a robot who learns to paint."


def ours(checkpoint_dir: Path, dtype: torch.dtype, prompt: list[int], n: int, repeats: int, prepare: bool) -> float:
    model = load_model(checkpoint_dir, dtype).eval()
    if prepare:  # what `generate` does
        prepare_for_generation(model)
    sampling = Sampling(max_new_tokens=n, temperature=0)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        count = sum(1 for _ in generate_tokens(model, [prompt], sampling))
        best = min(best, time.perf_counter() - t0)
    assert count == n
    return n / best


def transformers_generate(hf_dir: Path, dtype: torch.dtype, prompt: list[int], n: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    idx = torch.tensor([prompt])
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
            best = min(best, time.perf_counter() - t0)
    assert out.shape[1] - idx.shape[1] == n
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("/work/cache/smollm2-ckpt"))
    parser.add_argument("--precision", choices=[p for p in GENERATE_PRECISIONS if p != "auto"], default="bf16-true")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip_transformers", action="store_true", help="only measure ours")
    parser.add_argument("--plain", action="store_true", help="ours on the model as loaded: no fused matmuls, "
                        "no pre-packed weights (to see what prepare_for_generation buys)")
    args = parser.parse_args()

    dtype = PRECISIONS[args.precision][0]
    tokenizer = Tokenizer(args.checkpoint_dir)
    prompt = tokenizer.encode(instruction_template("chatml").single_turn.prompt(PROMPT))
    print(f"{args.checkpoint_dir.name}, {args.precision}, prompt {len(prompt)} tokens, greedy, "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    our_speed = ours(args.checkpoint_dir, dtype, prompt, args.new_tokens, args.repeats, not args.plain)
    print(f"lit-lora generate:      {our_speed:7.2f} tokens/s")
    if args.skip_transformers:
        return
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_hf(args.checkpoint_dir, Path(tmp) / "hf")
        hf_speed = transformers_generate(hf_dir, dtype, prompt, args.new_tokens, args.repeats)
    print(f"transformers generate:  {hf_speed:7.2f} tokens/s")
    print(f"ratio:                  {our_speed / hf_speed:7.2f}x")


if __name__ == "__main__":
    main()
