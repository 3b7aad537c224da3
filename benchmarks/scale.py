"""Memory and speed by model size: LoRA and QLoRA (NF4 base), ours and transformers + PEFT's, in one table.

    python benchmarks/scale.py [--sizes smollm2-135m smollm2-360m tinyllama-1.1b llama-3.2-3b llama-2-7b]
                               [--steps 2] [--skip_peer]

Every run is a subprocess of its own (its peak RSS is its own): LoRA r=8 on q and v, AdamW, micro-batch 1 x 256 of
random tokens, gradient checkpointing from 1B parameters up, one untimed step, then --steps timed ones. LoRA runs
in the precision `precision: auto` picks here (the faster one); QLoRA quantises the blocks' linear weights to NF4
as each is made, as load_model does while reading a checkpoint. SmolLM2-135M is the real model where its
checkpoint is cached; the other sizes are random weights of the preset's shape (weights change neither speed nor
memory), made one tensor at a time. A run whose plan does not fit in this machine's memory is not started: its
row says so. The plan column is memory_plan.plan, what `finetune-lora --dry-run` prints. The peer's QLoRA
(bitsandbytes 4-bit, `pip install bitsandbytes`) quantises while from_pretrained reads a directory, so it runs on
SmolLM2 only (`export-hf` of the cached checkpoint into HF_DIR); the random shapes have no such directory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = ["smollm2-135m", "smollm2-360m", "tinyllama-1.1b", "llama-3.2-3b", "llama-2-7b"]
R, ALPHA, DROPOUT, LR, BATCH, SEQ_LEN = 8, 16.0, 0.05, 3e-4, 1, 256
REAL = Path.home() / ".cache" / "lit-lora" / "checkpoints" / "smollm2-135m-instruct"
CHECKPOINTING_FROM = 1e9  # parameters
WARMUP = int(os.environ.get("SCALE_WARMUP", "1"))  # untimed steps first; 0 for a single step of a 7B shape
HF_DIR = Path("/work/cache/smollm2-hf")  # export-hf of REAL, for the peer's 4-bit run


def lora_config():
    from lit_lora.lora import LoRAConfig

    return LoRAConfig(r=R, alpha=ALPHA, dropout=DROPOUT, targets=["query", "value"])


def model_config(size: str):
    from lit_lora.checkpoint import load_config
    from lit_lora.model import Config

    return load_config(REAL) if size == "smollm2-135m" and REAL.is_dir() else Config.from_name(size)


def parameters(size: str) -> int:
    from lit_lora.model import LLaMA

    with torch.device("meta"):
        return sum(p.numel() for p in LLaMA(model_config(size)).parameters())


def random_model(config, dtype: torch.dtype, quantize: str):
    """A model of `config` with random weights made (and quantised) one tensor at a time, as loading does."""
    from lit_lora.checkpoint import model_from_tensors, stored_shapes

    generator = torch.Generator().manual_seed(0)
    tensors = ((name, (torch.randn(shape, generator=generator) * 0.02).to(dtype))
               for name, shape in stored_shapes(config).items())
    return model_from_tensors(config, tensors, quantize)


def ours(size: str, precision: str, quantize: str, steps: int, checkpointing: bool) -> float:
    """Seconds of `steps` timed training steps of our model."""
    from lit_lora.checkpoint import load_model
    from lit_lora.device import PRECISIONS, unmap_freed_memory
    from lit_lora.lora import apply_lora, mark_only_lora_as_trainable
    from lit_lora.loss import micro_batch_loss
    from lit_lora.train_config import TrainConfig

    base_dtype, lora_dtype = PRECISIONS[precision]
    run = TrainConfig(quantize=quantize)
    run.train.gradient_checkpointing = checkpointing
    if run.wants_low_memory():  # as finetune-lora's train.low_memory: null does
        unmap_freed_memory()
    config = model_config(size)
    model = load_model(REAL, base_dtype, quantize=quantize) if size == "smollm2-135m" and REAL.is_dir() else \
        random_model(config, base_dtype, quantize)
    apply_lora(model, lora_config(), dtype=lora_dtype)
    mark_only_lora_as_trainable(model)
    model.gradient_checkpointing = checkpointing
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    idx = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": idx, "targets": torch.cat([idx[:, 1:], torch.full((BATCH, 1), -100)], dim=1)}

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = micro_batch_loss(model, batch, 256) / (SEQ_LEN - 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, steps, WARMUP)


def peer(size: str, precision: str, quantize: str, steps: int, checkpointing: bool) -> float:
    """Seconds of `steps` timed steps of transformers + PEFT on the same shape (random weights, HF's own init)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_lora.convert.hf import config_to_hf

    dtype = torch.bfloat16 if precision != "32-true" else torch.float32
    if quantize == "nf4":  # bitsandbytes quantises while from_pretrained loads: the real model's HF directory
        from transformers import BitsAndBytesConfig

        model = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=dtype, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_to_hf(model_config(size))), dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    idx = torch.randint(0, model.config.vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = model(input_ids=idx, labels=idx).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, steps, WARMUP)


def timed(step, steps: int, warmup: int = 1) -> float:
    for _ in range(warmup):  # first-call allocations and kernel choices
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def child(args) -> None:
    run = ours if args.side == "ours" else peer
    seconds = run(args.size, args.precision, args.quantize, args.steps, args.checkpointing)
    print(json.dumps({"tokens_per_s": BATCH * SEQ_LEN * args.steps / seconds,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}))


def machine_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def planned(size: str, precision: str, quantize: str, checkpointing: bool) -> float:
    from lit_lora.memory_plan import plan

    return plan(model_config(size), lora_config(), precision, quantize, BATCH, SEQ_LEN, checkpointing).total(
        checkpointing) / 1024**3


def run(size: str, side: str, precision: str, quantize: str, steps: int, checkpointing: bool) -> dict | str:
    """The child's result, or why there is none."""
    cmd = [sys.executable, __file__, "--child", "--size", size, "--side", side, "--precision", precision,
           "--quantize", quantize, "--steps", str(steps)] + (["--checkpointing"] if checkpointing else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:80]
    return json.loads(done.stdout.strip().splitlines()[-1])


def cell(result: dict | str) -> str:
    return f"{result['tokens_per_s']:7.1f} tok/s {result['peak_rss_gb']:5.2f} GiB" if isinstance(result, dict) else \
        f"{result:<26.26s}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=SIZES)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run after one untimed (4x that below "
                        "1B parameters)")
    parser.add_argument("--skip_peer", action="store_true", help="no transformers + PEFT runs")
    parser.add_argument("--methods", nargs="+", default=["LoRA", "QLoRA"], choices=["LoRA", "QLoRA"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("size", "side", "precision", "quantize"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from lit_lora.device import auto_precision

    precision, why = auto_precision("cpu")
    try:
        import bitsandbytes  # noqa: F401
        peer_qlora = True
    except ImportError:
        peer_qlora = False
    print(f"precision {precision} ({why}); micro-batch {BATCH} x {SEQ_LEN}, LoRA r {R} on q,v; {args.steps} timed "
          f"steps (4x below 1B); {torch.get_num_threads()} threads; machine {machine_bytes() / 1024**3:.1f} GiB")
    print(f"{'model':16s} {'params':>7s} {'ckpt':4s} {'method':14s} {'ours (plan)':>12s} {'ours':>26s} "
          f"{'transformers + PEFT':>26s}  speed, memory vs peer")
    for size in args.sizes:
        n = parameters(size)
        checkpointing = n >= CHECKPOINTING_FROM
        steps = args.steps if checkpointing else 4 * args.steps  # a small model's step is short: time more of them
        lora = None  # this size's LoRA result, for QLoRA's speed against it
        for method, quantize in [(m, "nf4" if m == "QLoRA" else "none") for m in args.methods]:
            plan_gb = planned(size, precision, quantize, checkpointing)
            fits = plan_gb * 1024**3 < 0.9 * machine_bytes()
            mine = run(size, "ours", precision, quantize, steps, checkpointing) if fits else \
                f"not run: plan > {machine_bytes() / 1024**3:.0f} GiB"
            theirs = "skipped"
            peer_can = quantize == "none" or (peer_qlora and size == "smollm2-135m" and HF_DIR.is_dir())
            if not args.skip_peer and fits and peer_can:
                theirs = run(size, "peer", precision, quantize, steps, checkpointing)
            elif quantize == "nf4":
                theirs = "no bitsandbytes" if not peer_qlora else "4-bit needs an HF dir"
            ratio = ""
            if isinstance(mine, dict) and isinstance(theirs, dict):
                ratio = (f"{mine['tokens_per_s'] / theirs['tokens_per_s']:.2f}x, "
                         f"{mine['peak_rss_gb'] / theirs['peak_rss_gb']:.2f}x")
            if quantize == "none":
                lora = mine
            elif isinstance(mine, dict) and isinstance(lora, dict):
                ratio += f"{'; ' if ratio else ''}{mine['tokens_per_s'] / lora['tokens_per_s']:.2f}x LoRA's speed"
            print(f"{size:16s} {n / 1e9:6.2f}B {'yes' if checkpointing else 'no':4s} {method:14s} "
                  f"{plan_gb:8.2f} GiB {cell(mine):>26s} {cell(theirs):>26s}  {ratio}", flush=True)


if __name__ == "__main__":
    main()
