"""Training-step throughput: lit-lora's loop vs Hugging Face transformers + PEFT on the same model and batch.

    python benchmarks/train_throughput.py [--hf_dir /work/cache/smollm2-hf] [--checkpoint_dir /work/cache/smollm2-ckpt]

Both sides: SmolLM2-135M, LoRA r=8 alpha=16 dropout 0.05 on q and v, AdamW, bf16 autocast over a bf16 base,
micro-batch 4 x 256 random tokens, loss on every next token, the same number of timed steps after warm-up.
Each run is its own subprocess so the peak RSS figures are separate: ours without and with activation
checkpointing (`train.gradient_checkpointing`), then the peer. Prints tokens/s, peak RSS and the ratios.
CPU timings on a shared machine are noisy: compare figures from the same run.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

BATCH, SEQ_LEN, R, ALPHA, DROPOUT, LR = 4, 256, 8, 16.0, 0.05, 3e-4


def random_batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def run_ours(checkpoint_dir: str, warmup: int, steps: int, gradient_checkpointing: bool) -> dict:
    from lit_lora.finetune import build_model
    from lit_lora.loss import micro_batch_loss
    from lit_lora.train_config import TrainConfig

    config = TrainConfig(checkpoint_dir=checkpoint_dir, precision="bf16-mixed")
    config.lora.r, config.lora.alpha, config.lora.dropout, config.lora.targets = R, ALPHA, DROPOUT, ["query", "value"]
    config.train.gradient_checkpointing = gradient_checkpointing
    model = build_model(config)  # frozen base in bf16, LoRA in fp32
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    idx = random_batch(model.config.vocab_size)
    targets = torch.cat([idx[:, 1:], torch.full((BATCH, 1), -100)], dim=1)
    batch = {"input_ids": idx, "targets": targets}

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = micro_batch_loss(model, batch, config.train.loss_chunk_size) / (targets != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"seconds": time_steps(step, warmup, steps)}


def run_hf(hf_dir: str, warmup: int, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    idx = random_batch(model.config.vocab_size)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=idx, labels=idx).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"seconds": time_steps(step, warmup, steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_dir", default="/work/cache/smollm2-hf", help="Hugging Face SmolLM2-135M directory")
    parser.add_argument("--checkpoint_dir", default="/work/cache/smollm2-ckpt", help="the same model as a lit-lora checkpoint")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="run ours only with activation checkpointing (less memory, slower)")
    parser.add_argument("--only", choices=["ours", "hf"], help=argparse.SUPPRESS)  # one side, in a subprocess
    args = parser.parse_args()

    if args.only:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run_ours(args.checkpoint_dir, args.warmup, args.steps, args.gradient_checkpointing) if args.only == "ours" else \
            run_hf(args.hf_dir, args.warmup, args.steps)
        result["tokens_per_s"] = BATCH * SEQ_LEN * args.steps / result["seconds"]
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(json.dumps(result))
        return

    # Our loop twice, without and with activation checkpointing (the memory / speed trade), then the peer.
    runs = [("lit-lora", "ours", False), ("lit-lora, checkpointing", "ours", True), ("transformers + PEFT", "hf", False)]
    if args.gradient_checkpointing:
        runs = [runs[1], runs[2]]
    results = {}
    for name, side, checkpointing in runs:
        cmd = [sys.executable, __file__, "--only", side, "--hf_dir", args.hf_dir, "--checkpoint_dir",
               args.checkpoint_dir, "--warmup", str(args.warmup), "--steps", str(args.steps)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--gradient_checkpointing"] if checkpointing else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:25s} {r['tokens_per_s']:8.1f} tokens/s   peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    hf = results["transformers + PEFT"]
    print(f"micro-batch {BATCH} x {SEQ_LEN}, bf16, LoRA r={R} on q,v, {args.steps} timed steps; "
          f"ratios to transformers + PEFT:")
    for name, r in results.items():
        if r is not hf:
            print(f"  {name:25s} {r['tokens_per_s'] / hf['tokens_per_s']:.2f}x tokens/s, "
                  f"{r['peak_rss_gb'] / hf['peak_rss_gb']:.2f}x peak RSS")


if __name__ == "__main__":
    main()
