"""LoRA fine-tuning under Lightning Fabric: one plain loop, read top to bottom.

    finetune(config) -> check inputs -> Fabric -> load the frozen base, add LoRA -> for each optimizer step:
        the step's micro-batches -> forward, chunked loss on target tokens, backward (accumulating) -> clip ->
        AdamW -> log / validate / save

Gradient accumulation and data parallelism give the same gradient as one big batch: each micro-batch's summed
cross-entropy is divided by the number of target tokens in the whole global batch (counted over all processes
before the first forward), and multiplied by the world size because DDP averages gradients over processes.

The out_dir holds config.yaml (the resolved config), metrics.csv, step-XXXXXX/ (adapter + training state, for
--resume), final/ (adapter only), loss.png and summary.json.
"""
from __future__ import annotations

import contextlib
import csv
import math
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lit_lora.checkpoint import (ADAPTER_WEIGHTS, atomic_dir, check_checkpoint_dir, iter_safetensors, load_model,
                                 write_adapter_files, write_json, write_yaml)
from lit_lora.data.batching import epoch_order, make_batch, step_micro_batches
from lit_lora.data.dataset import IGNORE_INDEX, PreparedDataset
from lit_lora.data.templates import get_template
from lit_lora.errors import UserError
from lit_lora.lora import apply_lora, load_lora_state_dict, mark_only_lora_as_trainable
from lit_lora.model import LLaMA, Block
from lit_lora.tokenizer import Tokenizer
from lit_lora.train_config import TrainConfig

TRAINING_STATE = "training_state.pt"
# (frozen base dtype, LoRA dtype) per precision. Mixed precision keeps the trainable LoRA tensors in fp32 and
# the frozen base in the low-precision dtype autocast computes in anyway: half the memory, no per-step casts.
DTYPES = {
    "bf16-mixed": (torch.bfloat16, torch.float32),
    "16-mixed": (torch.float16, torch.float32),
    "bf16-true": (torch.bfloat16, torch.bfloat16),
    "32-true": (torch.float32, torch.float32),
}


@dataclass
class Progress:
    """Where training is; saved with every resumable checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0  # target and prompt tokens seen, without padding, all processes
    tokens_padded: int = 0  # the same including padding


# ---------------------------------------------------------------------------------------------- checks
def load_datasets(config: TrainConfig) -> tuple[PreparedDataset, PreparedDataset]:
    return PreparedDataset(config.data_dir, "train"), PreparedDataset(config.data_dir, "val")


def check_inputs(config: TrainConfig, train_data, world_size: int) -> None:
    """Everything that can be wrong before any model is loaded, each as one clear error."""
    t = config.train
    if t.global_batch_size % (t.micro_batch_size * world_size):
        raise UserError(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x devices x num_nodes ({world_size})"
        )
    if len(train_data) < t.global_batch_size:
        raise UserError(f"the training split has {len(train_data)} examples, fewer than one global batch "
                        f"({t.global_batch_size}); lower train.global_batch_size")
    ours = Tokenizer(check_checkpoint_dir(config.checkpoint_dir)).identity()
    theirs = train_data.meta.get("tokenizer")
    if theirs != ours:
        raise UserError(
            f"{config.data_dir} was prepared with another tokenizer than {config.checkpoint_dir}'s "
            f"(data: {_short(theirs)}, checkpoint: {_short(ours)}); prepare the data again with "
            f"--checkpoint_dir {config.checkpoint_dir}"
        )


def _short(identity: dict | None) -> str:
    if not identity:
        return "unknown"
    return f"vocab {identity.get('vocab_size')}, sha256 {str(identity.get('sha256'))[:12]}"


def total_steps(config: TrainConfig, n_train: int) -> int:
    steps_per_epoch = n_train // config.train.global_batch_size
    candidates = [s for s in (config.train.max_steps,
                              config.train.epochs * steps_per_epoch if config.train.epochs is not None else None)
                  if s is not None]
    return min(candidates)


def learning_rate(step: int, config: TrainConfig, max_steps: int) -> float:
    """Linear warmup to learning_rate over warmup_steps, then cosine decay to min_lr at max_steps."""
    t = config.train
    if step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, max_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.learning_rate - t.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------- model
def make_fabric(config: TrainConfig) -> L.Fabric:
    strategy: Any = config.strategy
    if config.strategy == "fsdp":
        from lightning.fabric.strategies import FSDPStrategy

        # One FSDP unit per transformer block; use_orig_params lets frozen and trainable tensors share a unit.
        # The full adapter is gathered on rank 0 for saving (see `full_params`).
        strategy = FSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True, state_dict_type="full")
    loggers = []
    with contextlib.suppress(ImportError, ModuleNotFoundError):
        import tensorboard  # noqa: F401  (Fabric's logger needs it)
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(root_dir=Path(config.out_dir) / "tensorboard", name="", version=""))
    return L.Fabric(accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
                    strategy=strategy, precision=config.precision, loggers=loggers)


def build_model(config: TrainConfig) -> LLaMA:
    """The frozen base from the checkpoint (every process reads it) with fresh trainable LoRA tensors."""
    base_dtype, lora_dtype = DTYPES[config.precision]
    if config.strategy == "fsdp":
        base_dtype = lora_dtype  # an FSDP unit holds one dtype; FSDP's mixed precision casts for compute
    model = load_model(config.checkpoint_dir, dtype=base_dtype)
    apply_lora(model, config.lora, dtype=lora_dtype)
    mark_only_lora_as_trainable(model)
    model.gradient_checkpointing = config.train.gradient_checkpointing
    return model


# ---------------------------------------------------------------------------------------------- loss
class HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `h @ weight.T` against `y` for a frozen output head, chunk by chunk.

    The gradient with respect to h is computed in the forward pass, one (chunk, vocab) fp32 logits block at a
    time, and kept (it is the size of h), so the backward pass needs no second pass through the head.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk_size: int) -> torch.Tensor:
        weight = weight.to(h.dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None  # not when validating
        for i in range(0, len(y), chunk_size):
            logits = (h[i : i + chunk_size] @ weight.T).float()  # (chunk, vocab)
            y_chunk = y[i : i + chunk_size]
            log_z = logits.logsumexp(-1)
            loss += (log_z - logits.gather(1, y_chunk[:, None]).squeeze(1)).sum()
            if grad_h is None:
                continue
            probs = logits.sub_(log_z[:, None]).exp_()  # softmax, in place
            probs[torch.arange(len(y_chunk), device=h.device), y_chunk] -= 1  # d loss / d logits
            grad_h[i : i + chunk_size] = probs.to(h.dtype) @ weight
        ctx.save_for_backward(grad_h)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), None, None, None


def target_loss_sum(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Summed cross-entropy over the positions whose target is not -100.

    hidden (B, T, C), targets (B, T). Only target positions go through the output head, a chunk at a time, so
    at most one (chunk, vocab) fp32 logits block exists, also in the backward pass.
    """
    keep = targets != IGNORE_INDEX
    h, y = hidden[keep], targets[keep]  # (N, C), (N,)
    if not any(p.requires_grad for p in lm_head.parameters()):  # the usual case: a frozen head
        return HeadCrossEntropy.apply(h, lm_head.weight, y, chunk_size)

    # LoRA on the head: let autograd handle it, recomputing each chunk's logits in the backward pass.
    def chunk_loss(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lm_head(h_chunk).float(), y_chunk, reduction="sum")

    total = h.sum().float() * 0  # part of the graph even when there are no targets
    for i in range(0, len(y), chunk_size):
        total = total + checkpoint(chunk_loss, h[i : i + chunk_size], y[i : i + chunk_size], use_reentrant=False)
    return total


def micro_batch_loss(model, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    hidden = model.hidden_states(batch["input_ids"], batch.get("input_pos"), batch.get("mask"))
    return target_loss_sum(hidden, model.lm_head, batch["targets"], chunk_size)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def validate(fabric: L.Fabric, model, val_data, config: TrainConfig, pad_id: int) -> float:
    """Mean cross-entropy per target token over (part of) the validation split, all processes together."""
    model.eval()
    t = config.train
    order = sorted(range(len(val_data)), key=lambda i: int(val_data.lengths[i]))  # similar lengths: less padding
    batches = [order[i : i + t.micro_batch_size] for i in range(0, len(order), t.micro_batch_size)]
    batches = batches[: config.eval.max_batches][fabric.global_rank :: fabric.world_size]
    loss_sum = torch.zeros(2)  # summed cross-entropy, target tokens
    for indices in batches:
        batch = fabric.to_device(make_batch([val_data[i] for i in indices], pad_id, t.packing,
                                            val_data.meta["max_seq_length"], t.pad_multiple))
        with fabric.autocast():
            loss_sum[0] += micro_batch_loss(model, batch, t.loss_chunk_size).float().cpu()
        loss_sum[1] += (batch["targets"] != IGNORE_INDEX).sum().cpu()
    loss_sum = fabric.all_reduce(loss_sum, reduce_op="sum")
    model.train()
    return (loss_sum[0] / loss_sum[1].clamp(min=1)).item()


@torch.no_grad()
def greedy_sample(model: LLaMA, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    """Greedy continuation of one prompt with the KV cache (on the unwrapped model, one process)."""
    model.eval()
    device = model.embed_tokens.weight.device
    idx = torch.tensor([prompt_ids], device=device)
    model.set_kv_cache(1, len(prompt_ids) + max_new_tokens)
    input_pos = torch.arange(len(prompt_ids), device=device)
    out: list[int] = []
    try:
        for _ in range(max_new_tokens):
            logits = model.lm_head(model.hidden_states(idx, input_pos)[:, -1])  # (1, vocab)
            token = int(logits.argmax(-1))
            if token in stop_ids:
                break
            out.append(token)
            idx, input_pos = torch.tensor([[token]], device=device), input_pos[-1:] + 1
    finally:
        model.set_kv_cache(0)
        model.train()
    return out


# ---------------------------------------------------------------------------------------------- checkpoints
@contextlib.contextmanager
def full_params(fabric: L.Fabric, model):
    """Under FSDP, gather the full (LoRA and base) parameters on rank 0 while saving; otherwise nothing to do."""
    from lightning.fabric.strategies import FSDPStrategy

    if not isinstance(fabric.strategy, FSDPStrategy):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model._forward_module, writeback=False, rank0_only=True, offload_to_cpu=True):
        yield


def optimizer_state(fabric: L.Fabric, model, optimizer) -> dict:
    from lightning.fabric.strategies import FSDPStrategy

    if isinstance(fabric.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.optim_state_dict(model._forward_module, optimizer.optimizer)
    return optimizer.state_dict()


def rng_states(fabric: L.Fabric) -> torch.Tensor:
    """Every process's torch RNG state (dropout), (world_size, n) uint8."""
    state = torch.get_rng_state()
    return state[None] if fabric.world_size == 1 else fabric.all_gather(state).cpu()


def save(fabric: L.Fabric, directory: Path, model, optimizer, progress: Progress, config: TrainConfig,
         template: str | None, resumable: bool) -> None:
    """step-XXXXXX/ or final/: the adapter, plus (when resumable) everything --resume needs. Rank 0 writes."""
    optim = optimizer_state(fabric, model, optimizer) if resumable else None
    rng = rng_states(fabric) if resumable else None
    with full_params(fabric, model):
        if fabric.global_rank == 0:
            with atomic_dir(directory, overwrite=True) as tmp:
                write_adapter_files(tmp, model.module, Path(config.checkpoint_dir), template)
                if resumable:
                    torch.save({"progress": vars(progress), "optimizer": optim, "rng": rng,
                                "world_size": fabric.world_size, "global_batch_size": config.train.global_batch_size,
                                "seed": config.seed}, tmp / TRAINING_STATE)
    fabric.barrier()


def find_resume(resume: str | None, out_dir: Path) -> Path | None:
    """The checkpoint to resume from: a path, the newest step-* in out_dir for 'auto' (None if there is none)."""
    if resume is None:
        if out_dir.is_dir() and any(out_dir.glob("step-*")):
            raise UserError(f"{out_dir} already holds checkpoints; continue with --resume auto or choose another "
                            f"out_dir")
        return None
    if resume == "auto":
        found = sorted(out_dir.glob(f"step-*/{TRAINING_STATE}"))
        return found[-1].parent if found else None
    path = Path(resume)
    if not (path / TRAINING_STATE).is_file():
        raise UserError(f"{path} is not a resumable checkpoint (no {TRAINING_STATE}); pass a step-XXXXXX directory "
                        f"or --resume auto")
    return path


def restore(fabric: L.Fabric, path: Path, model, optimizer, config: TrainConfig) -> Progress:
    state = torch.load(path / TRAINING_STATE, weights_only=True)
    if state["global_batch_size"] != config.train.global_batch_size or state["seed"] != config.seed:
        raise UserError(f"{path} was trained with another global_batch_size or seed; resume with the same config")
    with full_params(fabric, model):
        load_lora_state_dict(model.module, dict(iter_safetensors(path / ADAPTER_WEIGHTS)))
    from lightning.fabric.strategies import FSDPStrategy

    optim = state["optimizer"]
    if isinstance(fabric.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        optim = FSDP.optim_state_dict_to_load(model._forward_module, optimizer.optimizer, optim)
    optimizer.load_state_dict(optim)
    if state["world_size"] == fabric.world_size:
        torch.set_rng_state(state["rng"][fabric.global_rank])
    else:
        fabric.print(f"note: {path} was saved by {state['world_size']} processes, not {fabric.world_size}: "
                     f"dropout randomness will differ from an uninterrupted run")
    return Progress(**state["progress"])


# ---------------------------------------------------------------------------------------------- logging
class MetricsLog:
    """metrics.csv (and TensorBoard through Fabric's loggers); rank 0 only."""

    COLUMNS = ["step", "epoch", "split", "loss", "perplexity", "lr", "tokens", "tokens_per_s", "elapsed_s",
               "peak_memory_gb"]

    def __init__(self, fabric: L.Fabric, path: Path, append: bool) -> None:
        self.fabric, self.path = fabric, path
        self.rows: list[dict[str, Any]] = []
        if fabric.global_rank == 0 and (not append or not path.is_file()):
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(self.COLUMNS)

    def log(self, **row: Any) -> None:
        self.rows.append(row)
        if self.fabric.global_rank != 0:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.COLUMNS).writerow(row)
        values = {f"{row['split']}/{k}": v for k, v in row.items() if k in ("loss", "perplexity", "lr", "tokens_per_s")}
        self.fabric.log_dict(values, step=row["step"])


def plot_losses(metrics_csv: Path, out: Path) -> str | None:
    """loss.png from metrics.csv; returns a note instead when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss.png"
    rows = list(csv.DictReader(open(metrics_csv)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for split in ("train", "val"):
        points = [(int(r["step"]), float(r["loss"])) for r in rows if r["split"] == split]
        if points:
            ax.plot(*zip(*points), marker="o" if split == "val" else None, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return None


def peak_memory_bytes(fabric: L.Fabric) -> tuple[str, int]:
    if fabric.device.type == "cuda":
        return "max_allocated", torch.cuda.max_memory_allocated(fabric.device)
    return "peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------- signals
class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step, so it can save before exiting."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------- training
def finetune(config: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Train a LoRA adapter as `config` says; returns the summary (also written to out_dir/summary.json)."""
    out_dir = Path(config.out_dir)
    train_data, val_data = load_datasets(config)
    world_size = config.devices * config.num_nodes
    check_inputs(config, train_data, world_size)
    resume_from = find_resume(resume, out_dir)

    fabric = make_fabric(config)
    fabric.launch()
    fabric.seed_everything(config.seed)
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(out_dir / "config.yaml", config.to_dict())

    model = build_model(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    t = config.train
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate,
                                  weight_decay=t.weight_decay, betas=tuple(t.betas))
    model = fabric.setup_module(model)
    model.mark_forward_method("hidden_states")  # so DDP/FSDP and autocast see it as a forward pass
    optimizer = fabric.setup_optimizers(optimizer)

    progress = restore(fabric, resume_from, model, optimizer, config) if resume_from else Progress()
    if resume_from:
        fabric.print(f"resuming from {resume_from} at step {progress.step}")
    max_steps = total_steps(config, len(train_data))
    template = train_data.meta.get("template")
    tokenizer = Tokenizer(config.checkpoint_dir)
    pad_id = tokenizer.pad_id
    max_seq_length = train_data.meta["max_seq_length"]
    metrics = MetricsLog(fabric, out_dir / "metrics.csv", append=resume_from is not None)

    def evaluate() -> float:
        loss = validate(fabric, model, val_data, config, pad_id)
        metrics.log(step=progress.step, epoch=progress.epoch, split="val", loss=loss, perplexity=math.exp(min(loss, 50)))
        if fabric.global_rank == 0 and config.strategy != "fsdp":  # sampling uses the unsharded model
            prompt = get_template(template).prompt(config.eval.prompt) if template else config.eval.prompt
            sample = greedy_sample(model.module, tokenizer.encode(prompt), config.eval.max_new_tokens, tokenizer.stop_ids)
            fabric.print(f"\nstep {progress.step}: val loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.2f}\n"
                         f"  sample for {config.eval.prompt!r}: {tokenizer.decode(sample)!r}")
        return loss

    val_losses = [evaluate()] if progress.step == 0 else []
    bar = None
    if fabric.global_rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, initial=progress.step, desc="finetune", dynamic_ncols=True)
    order_epoch, order = -1, []
    start_time, start_tokens, start_step = time.perf_counter(), progress.tokens, progress.step
    train_losses: list[float] = []
    stopped_by_signal = False

    with StopRequest() as stop:
        while progress.step < max_steps:
            if order_epoch != progress.epoch:
                order = epoch_order(train_data.lengths, t.global_batch_size, config.seed, progress.epoch, t.group_by_length)
                order_epoch = progress.epoch
            micro = step_micro_batches(order, progress.step_in_epoch, t.global_batch_size, t.micro_batch_size,
                                       fabric.global_rank, fabric.world_size)
            batches = [fabric.to_device(make_batch([train_data[i] for i in m], pad_id, t.packing, max_seq_length,
                                                  t.pad_multiple))
                       for m in micro]
            # Target tokens, tokens, padded tokens of this step over all processes: the loss is normalised by the first.
            counts = torch.tensor([[(b["targets"] != IGNORE_INDEX).sum(), (b["input_ids"] != pad_id).sum(),
                                    b["input_ids"].numel()] for b in batches]).sum(0).float()
            counts = fabric.all_reduce(counts, reduce_op="sum")
            lr = learning_rate(progress.step, config, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss_sum = torch.zeros((), device=fabric.device)
            for j, batch in enumerate(batches):
                with fabric.no_backward_sync(model, enabled=j < len(batches) - 1):
                    ce = micro_batch_loss(model, batch, t.loss_chunk_size)
                    fabric.backward(ce * fabric.world_size / counts[0].clamp(min=1))
                loss_sum += ce.detach().float()
            stats = fabric.all_reduce(torch.stack([loss_sum.cpu(), torch.tensor(float(stop.requested))]), reduce_op="sum")
            loss = (stats[0] / counts[0].clamp(min=1)).item()
            if not math.isfinite(loss):
                last = sorted(out_dir.glob(f"step-*/{TRAINING_STATE}"))
                kept = f"the last good checkpoint is {last[-1].parent}" if last else "no checkpoint was saved yet"
                raise UserError(f"training loss became {loss} at step {progress.step + 1}; stopped without applying "
                                f"it ({kept}); lower train.learning_rate or check the data")
            if t.grad_clip is not None:
                fabric.clip_gradients(model, optimizer, max_norm=t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            progress.step += 1
            progress.step_in_epoch += 1
            if progress.step_in_epoch * t.global_batch_size + t.global_batch_size > len(order):
                progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
            progress.tokens += int(counts[1])
            progress.tokens_padded += int(counts[2])
            train_losses.append(loss)
            elapsed = time.perf_counter() - start_time
            tokens_per_s = (progress.tokens - start_tokens) / max(elapsed, 1e-9)
            if progress.step % t.log_interval == 0 or progress.step == max_steps:
                metrics.log(step=progress.step, epoch=progress.epoch, split="train", loss=loss, lr=lr,
                            tokens=progress.tokens, tokens_per_s=round(tokens_per_s, 1), elapsed_s=round(elapsed, 2),
                            peak_memory_gb=round(peak_memory_bytes(fabric)[1] / 1e9, 3))
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
                bar.update(1)

            if stats[1] > 0:  # some process got SIGINT/SIGTERM: all save and stop together
                stopped_by_signal = True
                break
            if progress.step % config.eval.interval == 0 or progress.step == max_steps:
                val_losses.append(evaluate())
            if progress.step % t.save_interval == 0 and progress.step < max_steps:
                save(fabric, out_dir / f"step-{progress.step:06d}", model, optimizer, progress, config, template, True)

    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start_time
    if stopped_by_signal:
        path = out_dir / f"step-{progress.step:06d}"
        save(fabric, path, model, optimizer, progress, config, template, True)
        fabric.print(f"interrupted at step {progress.step}: saved {path}; continue with --resume auto")
    else:
        save(fabric, out_dir / "final", model, optimizer, progress, config, template, False)

    memory_kind, memory = peak_memory_bytes(fabric)
    adapter = out_dir / ("final" if not stopped_by_signal else f"step-{progress.step:06d}") / ADAPTER_WEIGHTS
    summary = {
        "interrupted": stopped_by_signal,
        "steps": progress.step,
        "steps_this_run": progress.step - start_step,
        "epochs": progress.step * t.global_batch_size / len(train_data),
        "tokens_seen": progress.tokens,
        "tokens_seen_with_padding": progress.tokens_padded,
        "wall_time_s": round(elapsed, 2),
        "tokens_per_s": round((progress.tokens - start_tokens) / max(elapsed, 1e-9), 1),
        f"{memory_kind}_bytes": memory,
        "trainable_params": trainable,
        "total_params": total,
        "adapter_bytes": adapter.stat().st_size if adapter.is_file() else None,
        "first_train_loss": train_losses[0] if train_losses else None,
        "last_train_loss": train_losses[-1] if train_losses else None,
        "val_loss_first": val_losses[0] if val_losses else None,
        "val_loss_last": val_losses[-1] if val_losses else None,
    }
    if fabric.global_rank == 0:
        note = plot_losses(out_dir / "metrics.csv", out_dir / "loss.png")
        if note:
            fabric.print(f"note: {note}")
        write_json(out_dir / "summary.json", summary)
        fabric.print("summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return summary
