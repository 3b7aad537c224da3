"""LoRA fine-tuning under Lightning Fabric: one plain loop, read top to bottom.

    finetune(config) -> check inputs -> Fabric -> load the frozen base, add LoRA -> for each optimizer step:
        the step's micro-batches -> forward, chunked loss on target tokens, backward (accumulating) -> clip ->
        AdamW -> log / validate / save

Gradient accumulation and data parallelism give the same gradient as one big batch: each micro-batch's summed
cross-entropy is divided by the number of target tokens in the whole global batch (counted over all processes
before the first forward), and multiplied by the world size because DDP and FSDP average gradients over
processes.

The out_dir holds config.yaml (the resolved config), metrics.csv, step-XXXXXX/ (adapter + training state, for
--resume), final/ (the same at the end: a finished run can be continued with a higher max_steps), loss.png
and summary.json. Everything a resume depends on is read and checked before anything in out_dir is written,
and one run at a time uses an out_dir: it is locked (fileio.hold_lock) from before those checks to the end.
The loss is in loss.py; checkpoints of the run, resuming and the complete-run check in train_state.py;
metrics.csv and loss.png in metrics.py; Ctrl-C handling in stop.py.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lit_lora.adapter import ADAPTER_WEIGHTS
from lit_lora.checkpoint import check_checkpoint_dir, load_config, load_model, stored_shapes
from lit_lora.data.batching import epoch_order, make_batch, step_micro_batches
from lit_lora.data.dataset import IGNORE_INDEX, PreparedDataset, check_tokenizer
from lit_lora.device import PRECISIONS, peak_memory_bytes, resolve_precision, unmap_freed_memory
from lit_lora.errors import UserError
from lit_lora.fileio import hold_lock, write_json, write_yaml
from lit_lora.generate import Sampling, complete
from lit_lora.lora import apply_lora, mark_only_lora_as_trainable, optimizer_groups
from lit_lora.loss import eval_batches, micro_batch_loss, summed_loss
from lit_lora.metrics import MetricsLog, plot_losses
from lit_lora.model import LLaMA
from lit_lora.prompts.format import prompt_format, recorded_prompt
from lit_lora.quantize import check_nf4_sharding
from lit_lora.stop import StopRequest
from lit_lora.tokenizer import Tokenizer
from lit_lora.train_config import TrainConfig, check_hardware
from lit_lora.train_state import (FINAL, Progress, ResumePoint, check_resume_settings, find_resume, is_sharded,
                                  last_checkpoint_note, restore, run_is_complete, save)


# ---------------------------------------------------------------------------------------------- checks
def load_datasets(config: TrainConfig) -> tuple[PreparedDataset, PreparedDataset]:
    return PreparedDataset(config.data_dir, "train"), PreparedDataset(config.data_dir, "val")


def check_inputs(config: TrainConfig, train_data, world_size: int) -> None:
    """Everything that can be wrong before any model is loaded, each as one clear error (the hardware is
    checked before, by `finetune`)."""
    t = config.train
    if t.global_batch_size % (t.micro_batch_size * world_size):
        raise UserError(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x devices x num_nodes ({world_size})"
        )
    if len(train_data) < t.global_batch_size:
        raise UserError(f"the training split has {len(train_data)} examples, fewer than one global batch "
                        f"({t.global_batch_size}); lower train.global_batch_size")
    check_tokenizer(train_data, Tokenizer(check_checkpoint_dir(config.checkpoint_dir)), config.checkpoint_dir)
    if config.quantize == "nf4" and config.strategy == "fsdp":
        check_nf4_sharding(stored_shapes(load_config(config.checkpoint_dir)), world_size)


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
        # Every process is data parallel: the strategy's "auto" sizes would put a node's devices into tensor
        # parallelism instead. Its backend is Fabric's default for the device (gloo on a CPU, NCCL on GPUs).
        strategy = ModelParallelStrategy(shard_model, data_parallel_size=config.devices * config.num_nodes,
                                         tensor_parallel_size=1)
    loggers = []
    with contextlib.suppress(ImportError, ModuleNotFoundError):
        import tensorboard  # noqa: F401  (Fabric's logger needs it)
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(root_dir=Path(config.out_dir) / "tensorboard", name="", version=""))
    return L.Fabric(accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
                    strategy=strategy, precision=config.precision, loggers=loggers)


def shard_model(model: LLaMA, mesh: DeviceMesh) -> LLaMA:
    """strategy fsdp (FSDP2): one unit per transformer block and one for the rest (embeddings, final norm, head),
    each sharded over the data-parallel processes. A unit may mix dtypes (a bf16 or NF4 base beside fp32 LoRA
    tensors): FSDP2 all-gathers those as bytes, and only the LoRA tensors have gradients to reduce."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # public from torch 2.6

    for block in model.layers:
        fully_shard(block, mesh=mesh["data_parallel"])
    fully_shard(model, mesh=mesh["data_parallel"])
    # The loss calls hidden_states, not forward; FSDP2 changes the model in place, so Fabric's redirection of
    # marked forward methods does not apply, and the root's all-gather must be hooked to it here.
    register_fsdp_forward_method(model, "hidden_states")
    return model


def skip_base_broadcast(fabric: L.Fabric, model: LLaMA) -> None:
    """DDP broadcasts rank 0's parameters when it wraps a model, and that changes NF4 tensors, on every process (a
    2-process run over an NF4 base then trained away from a 1-process one). Every process loaded the same frozen
    base, so DDP is told to leave it alone: it keeps only the LoRA tensors in sync."""
    if isinstance(fabric.strategy, DDPStrategy):
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)


def build_model(config: TrainConfig) -> LLaMA:
    """The frozen base from the checkpoint (every process reads it) with fresh trainable LoRA tensors."""
    base_dtype, lora_dtype = PRECISIONS[config.precision]
    model = load_model(config.checkpoint_dir, dtype=base_dtype, verify=config.verify, quantize=config.quantize)
    apply_lora(model, config.lora, dtype=lora_dtype)
    mark_only_lora_as_trainable(model)
    model.gradient_checkpointing = config.train.gradient_checkpointing
    return model


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def validation_loss(fabric: L.Fabric, model, val_data, config: TrainConfig, pad_id: int) -> float:
    """Mean cross-entropy per target token over (part of) the validation split, all processes together."""
    model.eval()
    t = config.train
    limit = config.eval.max_batches * t.micro_batch_size if config.eval.max_batches else None
    batches = eval_batches(val_data.lengths, limit, t.micro_batch_size)
    mine = batches[fabric.global_rank :: fabric.world_size]
    loss_sum = summed_loss(model, val_data, mine, pad_id, t.packing, t.pad_multiple, t.loss_chunk_size,
                           fabric.to_device, fabric.autocast)
    if is_sharded(fabric):  # each forward all-gathers the shards: a process with a batch fewer runs one, uncounted
        extra = [batches[0]] * (-(-len(batches) // fabric.world_size) - len(mine))
        summed_loss(model, val_data, extra, pad_id, t.packing, t.pad_multiple, t.loss_chunk_size, fabric.to_device,
                    fabric.autocast)
    loss_sum = fabric.all_reduce(loss_sum, reduce_op="sum")
    model.train()
    return (loss_sum[0] / loss_sum[1].clamp(min=1)).item()


def sample_answer(model: LLaMA, tokenizer: Tokenizer, prompt_meta: dict[str, Any], prompt: str,
                  max_new_tokens: int) -> str:
    """Greedy answer of the unwrapped model to one prompt, in the data's format, through the generation code."""
    chosen = prompt_format("auto", prompt_meta, tokenizer)
    model.eval()
    try:
        return complete(model, tokenizer, [chosen.question_ids(tokenizer, prompt)], chosen.stop_strings,
                        Sampling(max_new_tokens=max_new_tokens, temperature=0)).texts[0]
    finally:
        model.train()


# ---------------------------------------------------------------------------------------------- training
@dataclass
class Run:
    """Everything one training run holds, so the steps below take one argument."""

    config: TrainConfig
    fabric: L.Fabric
    model: Any  # the Fabric-wrapped LLaMA with LoRA
    optimizer: Any
    train_data: PreparedDataset
    val_data: PreparedDataset
    tokenizer: Tokenizer
    progress: Progress
    max_steps: int
    metrics: MetricsLog
    prompt_meta: dict[str, Any]  # the data's format (adapter.PROMPT_KEYS), recorded in every adapter
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    no_val_noted: bool = False  # the data has no validation split and the user was told so


def low_memory_note(config: TrainConfig, done: bool) -> str:
    if not done:
        return "note: train.low_memory has no effect here: it sets glibc's malloc, and this C library is not glibc"
    chosen_by = "quantize nf4" if config.quantize == "nf4" else "gradient_checkpointing"
    why = "" if config.train.low_memory else f" (train.low_memory null, with {chosen_by})"
    return (f"note: low memory{why}: freed tensors go back to the system at once, for a peak near the plan's "
            f"(finetune-lora --dry-run) at slower steps; train.low_memory false for speed")


def setup(config: TrainConfig, fabric: L.Fabric, resume: str | None) -> Run | None:
    """Check the inputs and the checkpoint to resume from, start Fabric, build the model and optimizer, restore
    the checkpoint, then write config.yaml; None (said so, nothing touched) when the run is already complete."""
    out_dir = Path(config.out_dir)
    train_data, val_data = load_datasets(config)
    check_inputs(config, train_data, config.devices * config.num_nodes)
    max_steps = total_steps(config, len(train_data))
    point, warnings = find_resume(resume, out_dir)  # reads only; every check below comes before any write
    if point is not None:
        check_resume_settings(point, config, train_data.meta)
    if run_is_complete(fabric, out_dir, resume, point, max_steps):
        return None

    fabric.launch()
    fabric.seed_everything(config.seed)
    if config.wants_low_memory():
        fabric.print(low_memory_note(config, unmap_freed_memory()))

    model = build_model(config)
    skip_base_broadcast(fabric, model)
    model = fabric.setup_module(model)
    model.mark_forward_method("hidden_states")  # so DDP sees it as a forward pass (FSDP: shard_model hooks it)
    t = config.train
    # Made after setup_module: FSDP replaces the parameters with sharded ones.
    optimizer = torch.optim.AdamW(optimizer_groups(model, t.lora_plus_ratio), lr=t.learning_rate,
                                  weight_decay=t.weight_decay, betas=tuple(t.betas))
    optimizer = fabric.setup_optimizers(optimizer)

    progress = restore(fabric, point, model, optimizer) if point else Progress()
    for warning in warnings:
        fabric.print(warning)
    if is_sharded(fabric):
        fabric.print("note: strategy fsdp logs no greedy sample at validation: generating needs the whole model "
                     "in one process, and FSDP holds it in none")
    if point:
        fabric.print(f"resuming from {point.path} at step {progress.step}")
        note = schedule_note(point, config, max_steps)
        if note:
            fabric.print(note)
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(out_dir / "config.yaml", config.to_dict())
    metrics = MetricsLog(fabric, out_dir / "metrics.csv", resume_step=progress.step if point else None)
    return Run(config, fabric, model, optimizer, train_data, val_data, Tokenizer(config.checkpoint_dir), progress,
               max_steps, metrics, recorded_prompt(train_data.meta))


def schedule_note(point: ResumePoint, config: TrainConfig, max_steps: int) -> str | None:
    """The learning rate follows a cosine over the run's total steps: say so when a resume changes them."""
    before, step = point.state.get("max_steps"), point.step
    if before is None or before == max_steps or step >= max_steps:
        return None
    return (f"note: the run now ends at step {max_steps} instead of {before}: from step {step + 1} the learning rate "
            f"follows the cosine schedule to step {max_steps} ({learning_rate(step, config, max_steps):.2e}; the "
            f"last step ran at {learning_rate(max(step - 1, 0), config, before):.2e}), so the adapter will differ "
            f"from one trained with {max_steps} steps from the start")


def validate_and_sample(run: Run) -> float | None:
    """Validation loss (logged), and on rank 0 a greedy sample for the configured prompt. None, said once, when
    the data has no validation split (prepared with --val_size 0): no loss is logged rather than a fake 0.0."""
    config, fabric, progress = run.config, run.fabric, run.progress
    if len(run.val_data) == 0:
        if not run.no_val_noted:
            fabric.print(f"note: {config.data_dir} has no validation examples (prepared with --val_size 0): "
                         f"training without validation, no val loss will be reported")
            run.no_val_noted = True
        return None
    loss = validation_loss(fabric, run.model, run.val_data, config, run.tokenizer.pad_id)
    run.metrics.log(step=progress.step, epoch=progress.epoch, split="val", loss=loss, perplexity=math.exp(min(loss, 50)))
    line = f"\nstep {progress.step}: val loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.2f}"
    if is_sharded(fabric):  # generating needs the whole model in one process (setup said so)
        fabric.print(line)
    elif fabric.global_rank == 0:
        sample = sample_answer(run.model.module, run.tokenizer, run.prompt_meta, config.eval.prompt,
                               config.eval.max_new_tokens)
        fabric.print(f"{line}\n  sample for {config.eval.prompt!r}: {sample!r}")
    run.val_losses.append(loss)
    return loss


def train_step(run: Run, order: list[int], stop: StopRequest) -> tuple[float, float, bool]:
    """One optimizer step over this process's micro-batches: (loss, learning rate, did any process get a signal)."""
    config, fabric, model, progress, t = run.config, run.fabric, run.model, run.progress, run.config.train
    pad_id, max_seq_length = run.tokenizer.pad_id, run.train_data.meta["max_seq_length"]
    micro = step_micro_batches(order, progress.step_in_epoch, t.global_batch_size, t.micro_batch_size,
                               fabric.global_rank, fabric.world_size)
    batches = [fabric.to_device(make_batch([run.train_data[i] for i in m], pad_id, t.packing, max_seq_length,
                                          t.pad_multiple))
               for m in micro]
    # Target tokens, tokens, padded tokens of this step over all processes: the loss is normalised by the first.
    counts = torch.tensor([[(b["targets"] != IGNORE_INDEX).sum(), (b["input_ids"] != pad_id).sum(),
                            b["input_ids"].numel()] for b in batches]).sum(0).float()
    counts = fabric.all_reduce(counts, reduce_op="sum")
    lr = learning_rate(progress.step, config, run.max_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # saved before LoRA+ existed: none

    loss_sum = torch.zeros((), device=fabric.device)
    for j, batch in enumerate(batches):
        with fabric.no_backward_sync(model, enabled=j < len(batches) - 1):
            ce = micro_batch_loss(model, batch, t.loss_chunk_size)
            fabric.backward(ce * fabric.world_size / counts[0].clamp(min=1))
        loss_sum += ce.detach().float()
    stats = fabric.all_reduce(torch.stack([loss_sum.cpu(), torch.tensor(float(stop.requested))]), reduce_op="sum")
    loss = (stats[0] / counts[0].clamp(min=1)).item()
    if not math.isfinite(loss):
        raise UserError(f"training loss became {loss} at step {progress.step + 1}; stopped without applying "
                        f"it ({last_checkpoint_note(Path(config.out_dir))}); lower train.learning_rate or check the data")
    if t.grad_clip is not None:
        fabric.clip_gradients(model, run.optimizer, max_norm=t.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)

    progress.step += 1
    progress.step_in_epoch += 1
    if progress.step_in_epoch * t.global_batch_size + t.global_batch_size > len(order):
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
    progress.tokens += int(counts[1])
    progress.tokens_padded += int(counts[2])
    run.train_losses.append(loss)
    return loss, lr, bool(stats[1] > 0)


def finetune(config: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Train a LoRA adapter as `config` says; returns the summary (also written to out_dir/summary.json)."""
    check_hardware(config)  # before Fabric, whose own errors are tracebacks
    config.precision = resolve_precision(config.precision, config.accelerator)
    fabric = make_fabric(config)
    # Only global rank 0 locks out_dir: the processes Fabric launches for the other ranks run this too (and
    # would find rank 0's lock), and under several nodes each node's first process does.
    with hold_lock(Path(config.out_dir), "out_dir") if fabric.global_rank == 0 else contextlib.nullcontext():
        return train(config, fabric, resume)


def train(config: TrainConfig, fabric: L.Fabric, resume: str | None) -> dict[str, Any]:
    """finetune's run, with out_dir locked."""
    run = setup(config, fabric, resume)
    if run is None:  # already complete: the summary it wrote, nothing touched
        with contextlib.suppress(OSError, ValueError):
            return {**json.loads((Path(config.out_dir) / "summary.json").read_text()), "interrupted": False,
                    "steps_this_run": 0}
        return {"interrupted": False, "steps_this_run": 0}
    progress, t, out_dir = run.progress, config.train, Path(config.out_dir)
    if progress.step == 0:
        validate_and_sample(run)
    bar = tqdm(total=run.max_steps, initial=progress.step, desc="finetune", dynamic_ncols=True,
               disable=fabric.global_rank != 0)
    order_epoch, order = -1, []
    start_time, start_tokens, start_step = time.perf_counter(), progress.tokens, progress.step
    stopped_by_signal = False

    with StopRequest() as stop, bar:  # the bar is closed (its line ended) before any error is printed
        while progress.step < run.max_steps:
            if order_epoch != progress.epoch:
                order = epoch_order(run.train_data.lengths, t.global_batch_size, config.seed, progress.epoch,
                                    t.group_by_length)
                order_epoch = progress.epoch
            loss, lr, stopped_by_signal = train_step(run, order, stop)
            elapsed = time.perf_counter() - start_time
            tokens_per_s = (progress.tokens - start_tokens) / max(elapsed, 1e-9)
            if progress.step % t.log_interval == 0 or progress.step == run.max_steps:
                run.metrics.log(step=progress.step, epoch=progress.epoch, split="train", loss=loss, lr=lr,
                                tokens=progress.tokens, tokens_per_s=round(tokens_per_s, 1),
                                elapsed_s=round(elapsed, 2),
                                peak_memory_gb=round(peak_memory_bytes(fabric.device)[1] / 1e9, 3))
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            bar.update(1)
            if stopped_by_signal:  # some process got SIGINT/SIGTERM: all save and stop together
                break
            if progress.step % config.eval.interval == 0 or progress.step == run.max_steps:
                validate_and_sample(run)
            if progress.step % t.save_interval == 0 and progress.step < run.max_steps:
                save(fabric, out_dir / f"step-{progress.step:06d}", run.model, run.optimizer, progress, config,
                     run.train_data.meta, run.max_steps)
    bar.close()
    elapsed = time.perf_counter() - start_time

    adapter_dir = out_dir / (f"step-{progress.step:06d}" if stopped_by_signal else FINAL)
    # final/ keeps the training state too, so raising max_steps later continues from here.
    save(fabric, adapter_dir, run.model, run.optimizer, progress, config, run.train_data.meta, run.max_steps)
    if stopped_by_signal:
        fabric.print(f"interrupted at step {progress.step}: saved {adapter_dir}; continue with --resume auto")
    summary = summarize(run, adapter_dir, stopped_by_signal, elapsed, start_tokens, start_step)
    if fabric.global_rank == 0:
        note = plot_losses(out_dir / "metrics.csv", out_dir / "loss.png")
        if note:
            fabric.print(f"note: {note}")
        write_json(out_dir / "summary.json", summary)
        fabric.print("summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return summary


def summarize(run: Run, adapter_dir: Path, interrupted: bool, elapsed: float, start_tokens: int,
              start_step: int) -> dict[str, Any]:
    progress, model = run.progress, run.model
    memory_kind, memory = peak_memory_bytes(run.fabric.device)
    adapter = adapter_dir / ADAPTER_WEIGHTS
    return {
        "interrupted": interrupted,
        "steps": progress.step,
        "steps_this_run": progress.step - start_step,
        "epochs": progress.step * run.config.train.global_batch_size / len(run.train_data),
        "tokens_seen": progress.tokens,
        "tokens_seen_with_padding": progress.tokens_padded,
        "wall_time_s": round(elapsed, 2),
        "tokens_per_s": round((progress.tokens - start_tokens) / max(elapsed, 1e-9), 1),
        f"{memory_kind}_bytes": memory,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "adapter_bytes": adapter.stat().st_size if adapter.is_file() else None,
        "first_train_loss": run.train_losses[0] if run.train_losses else None,
        "last_train_loss": run.train_losses[-1] if run.train_losses else None,
        "val_loss_first": run.val_losses[0] if run.val_losses else None,
        "val_loss_last": run.val_losses[-1] if run.val_losses else None,
    }
