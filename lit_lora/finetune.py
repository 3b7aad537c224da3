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
With `adapters:` several adapters train together over one base: each has its own Run (its config, data, optimizer,
progress and out_dir/<name>/ with all of the above), their micro-batches go through the model as one (multi_lora.py),
and out_dir keeps the whole config and a summary of them all.
The loss is in loss.py; checkpoints of the run, resuming and the complete-run check in train_state.py;
metrics.csv and loss.png in metrics.py; Ctrl-C handling in stop.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning_fabric as L
import torch
from lightning_fabric.strategies import DDPStrategy, ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lit_lora.adapter import ADAPTER_WEIGHTS, adapter_sha256, load_checked_adapter
from lit_lora.checkpoint import check_checkpoint_dir, load_config, load_model, stored_shapes
from lit_lora.data.batching import concat_batches, epoch_order, make_batch, step_micro_batches
from lit_lora.data.dataset import IGNORE_INDEX, PreparedDataset, check_tokenizer
from lit_lora.device import PRECISIONS, peak_memory_bytes, resolve_precision, unmap_freed_memory
from lit_lora.errors import UserError
from lit_lora.fileio import hold_lock, write_json, write_yaml
from lit_lora.generate import Sampling, complete
from lit_lora.lora import LoRAConfig, apply_lora, load_lora_state_dict, mark_only_lora_as_trainable, optimizer_groups
from lit_lora.loss import eval_batches, segment_losses, summed_loss
from lit_lora.metrics import MetricsLog, plot_losses
from lit_lora.model import LLaMA
from lit_lora.multi_lora import AdapterRNG, adapter_parameters, alone, apply_adapters, row_parts, split
from lit_lora.preference import (PREFERENCE_COLUMNS, PREFERENCE_STATS, PreferencePairs, batch_log_probs,
                                  check_method, pair_log_probs, pair_stats, preference_terms, reference_weights, rows,
                                  sft_weight, snapshot, stats_dict)
from lit_lora.prompts.format import prompt_format, recorded_prompt
from lit_lora.quantize import check_nf4_sharding
from lit_lora.stop import StopRequest
from lit_lora.tokenizer import Tokenizer
from lit_lora.train_config import TrainConfig, check_hardware
from lit_lora.train_state import (FINAL, Progress, ResumePoint, check_resume_settings, find_resume, is_sharded,
                                  last_checkpoint_note, restore, run_is_complete, save)


# ---------------------------------------------------------------------------------------------- checks
def load_datasets(config: TrainConfig) -> tuple[Any, Any]:
    """The train and val splits: examples, or with method dpo/orpo chosen/rejected pairs (refused on the other
    kind of data)."""
    train, val = PreparedDataset(config.data_dir, "train"), PreparedDataset(config.data_dir, "val")
    check_method(config.method, train.meta, config.data_dir)
    return (train, val) if config.method == "sft" else (PreferencePairs(train), PreferencePairs(val))


def init_adapter(config: TrainConfig) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """init_lora's LoRA config (with the run's dropout) and tensors, checked against the base."""
    try:
        lora, state, _ = load_checked_adapter(Path(config.init_lora), Path(config.checkpoint_dir),
                                              load_config(config.checkpoint_dir), verify=config.verify)
    except UserError as e:
        raise UserError(f"init_lora: {e}") from None
    return LoRAConfig(**{**lora.to_dict(), "dropout": config.lora.dropout}), state


def with_init_lora(config: TrainConfig) -> TrainConfig:
    """The config with init_lora's r, alpha, targets, variant and scaling in place of lora:'s (its tensors fit
    no other shape), so config.yaml and the checkpoints record what is trained."""
    return config if config.init_lora is None else dataclasses.replace(config, lora=init_adapter(config)[0])


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
        from lightning_fabric.loggers import TensorBoardLogger

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


def build_model(config: TrainConfig, adapters: dict[str, LoRAConfig] | None = None) -> tuple[LLaMA, AdapterRNG | None]:
    """The frozen base from the checkpoint (every process reads it) with fresh trainable LoRA tensors: the config's
    adapter, or several (`adapters`, by name) trained together (and then their generator states)."""
    base_dtype, lora_dtype = PRECISIONS[config.precision]
    model = load_model(config.checkpoint_dir, dtype=base_dtype, verify=config.verify, quantize=config.quantize)
    rng = None
    if adapters:
        rng = apply_adapters(model, adapters, dtype=lora_dtype)
    else:
        apply_lora(model, config.lora, dtype=lora_dtype)
        if config.init_lora is not None:
            load_lora_state_dict(model, init_adapter(config)[1])
    mark_only_lora_as_trainable(model)
    model.gradient_checkpointing = config.train.gradient_checkpointing
    return model, rng


# ---------------------------------------------------------------------------------------------- evaluation
def validation_batches(fabric: L.Fabric, lengths, config: TrainConfig) -> tuple[list[list[int]], list[list[int]]]:
    """(this process's share of the validation micro-batches, the extra ones it runs uncounted): under FSDP each
    forward all-gathers the shards, so a process with a batch fewer runs one more for the collectives' sake."""
    t = config.train
    limit = config.eval.max_batches * t.micro_batch_size if config.eval.max_batches else None
    batches = eval_batches(lengths, limit, t.micro_batch_size)
    mine = batches[fabric.global_rank :: fabric.world_size]
    extra = [batches[0]] * (-(-len(batches) // fabric.world_size) - len(mine)) if is_sharded(fabric) else []
    return mine, extra


@torch.no_grad()
def validation_loss(fabric: L.Fabric, model, val_data, config: TrainConfig, pad_id: int) -> float:
    """Mean cross-entropy per target token over (part of) the validation split, all processes together."""
    model.eval()
    t = config.train
    mine, extra = validation_batches(fabric, val_data.lengths, config)

    def losses(batches: list[list[int]]) -> torch.Tensor:
        return summed_loss(model, val_data, batches, pad_id, t.packing, t.pad_multiple, t.loss_chunk_size,
                           fabric.to_device, fabric.autocast)
    loss_sum = losses(mine)
    losses(extra)  # for FSDP's collectives only
    loss_sum = fabric.all_reduce(loss_sum, reduce_op="sum")
    model.train()
    return (loss_sum[0] / loss_sum[1].clamp(min=1)).item()


@torch.no_grad()
def validation_preference(fabric: L.Fabric, model, val_data: PreferencePairs, config: TrainConfig, pad_id: int,
                          reference: dict[str, torch.Tensor] | None) -> tuple[float, dict[str, float]]:
    """The preference loss and PREFERENCE_STATS per pair, and the chosen answers' loss per token, over (part of) the
    validation pairs, all processes together; the DPO reference is the run's starting point, as in training."""
    model.eval()
    t = config.train
    mine, extra = validation_batches(fabric, val_data.lengths, config)

    p = config.preference

    def log_probs(indices: list[list[int]]):
        return pair_log_probs(model, val_data, indices, pad_id, t.pad_multiple, t.loss_chunk_size, fabric.to_device,
                              fabric.autocast, p.compare)
    rows = log_probs(mine)
    log_probs(extra)  # for FSDP's collectives only
    ref = None
    if config.method == "dpo":
        with reference_weights(model.module, reference):
            ref = log_probs(mine).logps
            log_probs(extra)
    losses, chosen, rejected, nll = preference_terms(config.method, rows, ref, p)
    chosen_tokens = rows.whole_counts[0::2].sum().float()
    sums = torch.cat([torch.stack([losses.sum(), nll, chosen_tokens, torch.tensor(float(len(losses)))]),
                      pair_stats(chosen, rejected)])
    sums = fabric.all_reduce(sums, reduce_op="sum").cpu()
    model.train()
    pairs, chosen_loss = sums[3].clamp(min=1), sums[1] / sums[2].clamp(min=1)
    loss = sums[0] / pairs + sft_weight(config.method, p.sft_weight) * chosen_loss
    return float(loss), {**stats_dict(sums[4:], float(pairs)), "chosen_loss": float(chosen_loss)}


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
    """One adapter's training, so the steps below take one argument; adapters trained together (`adapters:`) each
    have one, sharing Fabric and the model, each with the config of a run that trained it alone."""

    config: TrainConfig  # this adapter's own
    fabric: L.Fabric
    model: Any  # the Fabric-wrapped LLaMA with LoRA
    optimizer: Any
    train_data: Any  # PreparedDataset, or PreferencePairs
    val_data: Any
    tokenizer: Tokenizer
    progress: Progress
    max_steps: int
    metrics: MetricsLog
    prompt_meta: dict[str, Any]  # the data's format (adapter.PROMPT_KEYS), recorded in every adapter
    name: str | None = None  # its name among several trained together (None: the run's one adapter)
    rng: AdapterRNG | None = None  # with several: every adapter's generator state
    order: list[int] = field(default_factory=list)  # this epoch's order of the training examples
    order_epoch: int = -1
    start_step: int = 0
    start_tokens: int = 0
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    no_val_noted: bool = False  # the data has no validation split and the user was told so
    reference: dict[str, torch.Tensor] | None = None  # method dpo: the trainable tensors the run started from
    pair_means: dict[str, float] = field(default_factory=dict)  # method dpo/orpo: the last step's PREFERENCE_STATS
    init_lora_sha256: str | None = None  # recorded in every checkpoint (Plan.init_lora_sha256)

    @property
    def active(self) -> bool:
        return self.progress.step < self.max_steps

    def save(self, directory: Path) -> None:
        save(self.fabric, directory, self.model, self.optimizer, self.progress, self.config, self.train_data.meta,
             self.max_steps, self.name, self.rng, self.init_lora_sha256)


def low_memory_note(config: TrainConfig, done: bool) -> str:
    if not done:
        return "note: train.low_memory has no effect here: it sets glibc's malloc, and this C library is not glibc"
    chosen_by = "quantize nf4" if config.quantize == "nf4" else "gradient_checkpointing"
    why = "" if config.train.low_memory else f" (train.low_memory null, with {chosen_by})"
    return (f"note: low memory{why}: freed tensors go back to the system at once, for a peak near the plan's "
            f"(finetune-lora --dry-run) at slower steps; train.low_memory false for speed")


@dataclass
class Plan:
    """An adapter to train, read and checked before anything starts."""

    config: TrainConfig
    train_data: Any
    val_data: Any
    max_steps: int
    point: ResumePoint | None
    warnings: list[str]
    init_lora_sha256: str | None  # init_lora's weights when the run was planned (before they seeded the model)


def plan_runs(config: TrainConfig, fabric: L.Fabric, resume: str | None) -> dict[str | None, Plan]:
    """Each adapter's data, steps and checkpoint to resume from, checked (reads only); the complete ones left out
    (said so). One adapter is named None."""
    solos: dict[str | None, TrainConfig] = {**config.solo_configs()} or {None: config}
    world_size = config.devices * config.num_nodes
    if len(solos) > 1 and resume not in (None, "auto"):
        raise UserError(f"--resume {resume} names one checkpoint; a run of several adapters resumes each from its "
                        f"own folder with --resume auto")
    plans = {}
    for name, solo in solos.items():
        try:
            plan = plan_run(solo, fabric, resume, world_size)
        except UserError as e:
            raise UserError(f"adapter {name}: {e}" if name else str(e)) from None
        if plan is not None:
            plans[name] = plan
    rope = load_config(config.checkpoint_dir).rope_scaling or {}
    longest = max((p.train_data.meta["max_seq_length"] for p in plans.values()), default=0)
    if len(solos) > 1 and rope.get("rope_type") == "longrope" and longest > rope["original_max_position_embeddings"]:
        # LongRoPE picks its factors by the longest position in the forward pass: one adapter's long rows would
        # change another's rotation
        raise UserError(f"this model's LongRoPE changes its rotation past {rope['original_max_position_embeddings']} "
                        f"positions, and the adapters' data reach {longest}; train them together on data prepared "
                        f"with --max_seq_length {rope['original_max_position_embeddings']} or less, or alone")
    remaining = {p.max_steps - (p.point.step if p.point else 0) for p in plans.values()}
    if world_size > 1 and len(remaining) > 1:  # DDP would wait for gradients of an adapter that has finished
        raise UserError(f"under {world_size} processes the adapters trained together must have as many steps left "
                        f"(here {', '.join(map(str, sorted(remaining)))}); set train.max_steps, or train them on "
                        f"one device")
    return plans


def plan_run(config: TrainConfig, fabric: L.Fabric, resume: str | None, world_size: int) -> Plan | None:
    """One adapter's plan; None (said so) when its out_dir holds its complete run."""
    train_data, val_data = load_datasets(config)
    check_inputs(config, train_data, world_size)
    max_steps = total_steps(config, len(train_data))
    point, warnings = find_resume(resume, Path(config.out_dir))  # every check here comes before any write
    init_sha = adapter_sha256(Path(config.init_lora)) if config.init_lora is not None else None
    if point is not None:
        check_resume_settings(point, config, train_data.meta, init_sha)
    if run_is_complete(fabric, Path(config.out_dir), resume, point, max_steps):
        return None
    return Plan(config, train_data, val_data, max_steps, point, warnings, init_sha)


def setup(config: TrainConfig, fabric: L.Fabric, resume: str | None) -> list[Run]:
    """Check the inputs and the checkpoints to resume from, start Fabric, build the model and optimizers, restore
    the checkpoints, then write config.yaml: one Run per adapter still to train (none, said so and nothing
    touched, when every one is complete)."""
    plans = plan_runs(config, fabric, resume)
    if not plans:
        return []
    fabric.launch()
    fabric.seed_everything(config.seed)
    if config.wants_low_memory():
        fabric.print(low_memory_note(config, unmap_freed_memory()))

    several = {name: plan.config.lora for name, plan in plans.items() if name is not None}
    model, rng = build_model(config, several)
    skip_base_broadcast(fabric, model)
    model = fabric.setup_module(model)
    model.mark_forward_method("hidden_states")  # so DDP sees it as a forward pass (FSDP: shard_model hooks it)
    if rng is not None:
        rng.to(fabric.device)
    # Before any checkpoint is restored: the tensors the run started from (fresh, or init_lora's)
    reference = snapshot(model.module) if config.method == "dpo" else None
    # Made after setup_module: FSDP replaces the parameters with sharded ones.
    optimizers = fabric.setup_optimizers(*(make_optimizer(model, name, plan.config) for name, plan in plans.items()))
    optimizers = [optimizers] if len(plans) == 1 else list(optimizers)
    if is_sharded(fabric):
        fabric.print("note: strategy fsdp logs no greedy sample at validation: generating needs the whole model "
                     "in one process, and FSDP holds it in none")
    if several and fabric.global_rank == 0:
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        write_yaml(Path(config.out_dir) / "config.yaml", config.to_dict())
    tokenizer = Tokenizer(config.checkpoint_dir)
    runs = [start_run(fabric, plan, name, model, optimizer, rng, tokenizer)
            for (name, plan), optimizer in zip(plans.items(), optimizers)]
    runs[0].reference = reference
    return runs


def make_optimizer(model, name: str | None, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over adapter `name`'s tensors alone: its own learning rate, LoRA+ ratio and gradient clipping."""
    t = config.train
    return torch.optim.AdamW(optimizer_groups(adapter_parameters(model.module, name), t.lora_plus_ratio),
                             lr=t.learning_rate, weight_decay=t.weight_decay, betas=tuple(t.betas))


def start_run(fabric: L.Fabric, plan: Plan, name: str | None, model, optimizer, rng: AdapterRNG | None,
              tokenizer: Tokenizer) -> Run:
    """An adapter's run: its checkpoint restored (said so), its out_dir's config.yaml written, its metrics opened."""
    point, out_dir = plan.point, Path(plan.config.out_dir)
    progress = restore(fabric, point, model, optimizer, name, rng) if point else Progress()
    for warning in plan.warnings:
        fabric.print(warning)
    if point:
        fabric.print(f"resuming from {point.path} at step {progress.step}")
        note = schedule_note(point, plan.config, plan.max_steps)
        if note:
            fabric.print(note)
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(out_dir / "config.yaml", plan.config.to_dict())
    metrics = MetricsLog(fabric, out_dir / "metrics.csv", resume_step=progress.step if point else None,
                         extra=PREFERENCE_COLUMNS if plan.config.method != "sft" else ())
    return Run(plan.config, fabric, model, optimizer, plan.train_data, plan.val_data, tokenizer, progress,
               plan.max_steps, metrics, recorded_prompt(plan.train_data.meta), name, rng,
               start_step=progress.step, start_tokens=progress.tokens, init_lora_sha256=plan.init_lora_sha256)


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
    named = f" ({run.name})" if run.name else ""
    if len(run.val_data) == 0:
        if not run.no_val_noted:
            fabric.print(f"note: {config.data_dir} has no validation examples (prepared with --val_size 0): "
                         f"training{named} without validation, no val loss will be reported")
            run.no_val_noted = True
        return None
    with alone(run.model.module, run.name):
        if config.method == "sft":
            loss = validation_loss(fabric, run.model, run.val_data, config, run.tokenizer.pad_id)
            run.metrics.log(step=progress.step, epoch=progress.epoch, split="val", loss=loss,
                            perplexity=math.exp(min(loss, 50)))
            line = f"\nstep {progress.step}{named}: val loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.2f}"
        else:
            loss, means = validation_preference(fabric, run.model, run.val_data, config, run.tokenizer.pad_id,
                                                run.reference)
            run.metrics.log(step=progress.step, epoch=progress.epoch, split="val", loss=loss, **means)
            weight = sft_weight(config.method, config.preference.sft_weight)
            with_sft = f" (with {weight:g} x the chosen loss)" if config.method == "dpo" and weight else ""
            line = (f"\nstep {progress.step}: val {config.method} loss {loss:.4f}{with_sft}, chosen loss "
                    f"{means['chosen_loss']:.4f}, reward accuracy {means['accuracy']:.1%}, margin "
                    f"{means['margin']:.4f}")
        if is_sharded(fabric):  # generating needs the whole model in one process (setup said so)
            fabric.print(line)
        elif fabric.global_rank == 0:
            sample = sample_answer(run.model.module, run.tokenizer, run.prompt_meta, config.eval.prompt,
                                   config.eval.max_new_tokens)
            fabric.print(f"{line}\n  sample for {config.eval.prompt!r}: {sample!r}")
    run.val_losses.append(loss)
    return loss


def step_batches(run: Run) -> list[dict[str, torch.Tensor]]:
    """This process's micro-batches of the run's next optimizer step (a new epoch's order drawn first)."""
    t, progress = run.config.train, run.progress
    if run.order_epoch != progress.epoch:
        run.order = epoch_order(run.train_data.lengths, t.global_batch_size, run.config.seed, progress.epoch,
                                t.group_by_length)
        run.order_epoch = progress.epoch
    micro = step_micro_batches(run.order, progress.step_in_epoch, t.global_batch_size, t.micro_batch_size,
                               run.fabric.global_rank, run.fabric.world_size)
    return [make_batch(rows(run.train_data, m), run.tokenizer.pad_id, t.packing,
                       run.train_data.meta["max_seq_length"], t.pad_multiple) for m in micro]


def train_step(runs: list[Run], stop: StopRequest) -> tuple[list[float], list[float], bool]:
    """One optimizer step of every run still training: (their losses, their learning rates, did any process get a
    signal). Their j-th micro-batches go through the model together, each row through its own adapter only; each
    adapter's loss is normalised by its own target tokens, so one backward pass gives each its own gradient."""
    fabric, model, t = runs[0].fabric, runs[0].model, runs[0].config.train
    pad_id = runs[0].tokenizer.pad_id
    batches = [step_batches(run) for run in runs]
    # Per run: target tokens, tokens, padded tokens, and the chosen answers' target tokens (rows 0, 2, ... of a batch
    # of pairs) of this step over all processes; the first (the last with ORPO) normalise its loss.
    counts = torch.tensor([[[(b["targets"] != IGNORE_INDEX).sum(), (b["input_ids"] != pad_id).sum(),
                             b["input_ids"].numel(), (b["targets"][0::2] != IGNORE_INDEX).sum()]
                            for b in run_batches] for run_batches in batches]).sum(1).float()
    counts = fabric.all_reduce(counts, reduce_op="sum")
    lrs = [learning_rate(run.progress.step, run.config, run.max_steps) for run in runs]
    for run, lr in zip(runs, lrs):
        for group in run.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # saved before LoRA+ existed: none

    shares, pair_sums = torch.zeros(len(runs)), torch.zeros(len(PREFERENCE_STATS))
    for j in range(len(batches[0])):
        parts = [b[j] for b in batches]
        batch = fabric.to_device(parts[0] if len(parts) == 1 else concat_batches(parts, pad_id))
        parts = row_parts([run.name for run in runs], parts)
        with fabric.no_backward_sync(model, enabled=j < len(batches[0]) - 1), split(model.module, parts):
            # the backward pass inside: recomputed
            objective, share, pairs = micro_objective(runs, batch, parts, counts)
            fabric.backward(objective)
        shares += share.cpu()
        pair_sums += pairs if pairs is not None else 0
    stats = fabric.all_reduce(torch.cat([shares, pair_sums, torch.tensor([float(stop.requested)])]), reduce_op="sum")
    # sft: summed cross-entropy, normalised here; dpo/orpo: already a share of the step's mean
    norm = counts[:, 0].clamp(min=1) if runs[0].config.method == "sft" else torch.ones(len(runs))
    losses = (stats[: len(runs)] / norm).tolist()
    if runs[0].config.method != "sft":
        runs[0].pair_means = stats_dict(stats[len(runs):-1], t.global_batch_size)
    for run, loss in zip(runs, losses):  # before any adapter steps: every one stays at its last checkpoint
        check_finite(run, loss)
    for run, loss, n in zip(runs, losses, counts):
        apply_step(run, loss, n)
    return losses, lrs, bool(stats[-1] > 0)


def micro_objective(runs: list[Run], batch: dict[str, torch.Tensor], parts: list[tuple], counts: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(what this process backpropagates for a micro-batch, times the world size as DDP averages; each run's summed
    loss (sft) or share of its step loss (dpo/orpo); sums of the PREFERENCE_STATS or None), normalised by the step's
    global counts.

    sft: each run's summed cross-entropy over its own target tokens. dpo/orpo (one run): the preference loss per
    pair over the step's pairs, plus the chosen answers' NLL over their target tokens times sft_weight (ORPO: 1)."""
    run, model, t = runs[0], runs[0].model, runs[0].config.train
    if run.config.method == "sft":
        ces = segment_losses(model, batch, parts, t.loss_chunk_size)
        objective = sum(ce * run.fabric.world_size / n.clamp(min=1) for ce, n in zip(ces, counts[:, 0]))
        return objective, torch.stack([ce.detach().float() for ce in ces]), None
    ref, p = None, run.config.preference
    if run.config.method == "dpo":  # first: its activations are gone before the policy's are kept for backward
        with reference_weights(model.module, run.reference):
            ref = batch_log_probs(model, batch, t.loss_chunk_size, p.compare).logps
    rows = batch_log_probs(model, batch, t.loss_chunk_size, p.compare)
    losses, chosen, rejected, nll = preference_terms(run.config.method, rows, ref, p)
    share = losses.sum() / t.global_batch_size
    weight = sft_weight(run.config.method, p.sft_weight)
    if weight:
        share = share + weight * nll / counts[0, 3].clamp(min=1)
    return share * run.fabric.world_size, share.detach().float()[None], pair_stats(chosen, rejected)


def check_finite(run: Run, loss: float) -> None:
    if not math.isfinite(loss):
        named = f" of adapter {run.name}" if run.name else ""
        raise UserError(f"training loss{named} became {loss} at step {run.progress.step + 1}; stopped without "
                        f"applying it ({last_checkpoint_note(Path(run.config.out_dir))}); lower train.learning_rate "
                        f"or check the data")


def apply_step(run: Run, loss: float, counts: torch.Tensor) -> None:
    """The run's clipped optimizer step on the gradient its rows gave, and its progress."""
    fabric, progress, t = run.fabric, run.progress, run.config.train
    if t.grad_clip is not None:
        fabric.clip_gradients(run.model, run.optimizer, max_norm=t.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.step_in_epoch += 1
    if progress.step_in_epoch * t.global_batch_size + t.global_batch_size > len(run.order):
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
    progress.tokens += int(counts[1])
    progress.tokens_padded += int(counts[2])
    run.train_losses.append(loss)


def finetune(config: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Train a LoRA adapter (or several together) as `config` says; returns the summary (also written to
    out_dir/summary.json)."""
    check_hardware(config)  # before Fabric, whose own errors are tracebacks
    config.precision = resolve_precision(config.precision, config.accelerator)
    if config.adapters and config.precision == "16-mixed":  # one loss scaler, updated after each optimizer's step
        raise UserError("precision 16-mixed cannot train several adapters together (its loss scale would change "
                        "between their optimizer steps); use bf16-mixed, bf16-true or 32-true, or train them alone")
    config = with_init_lora(config)
    fabric = make_fabric(config)
    # Only global rank 0 locks out_dir (and each adapter's): the processes Fabric launches for the other ranks
    # run this too (and would find rank 0's lock), and under several nodes each node's first process does.
    with contextlib.ExitStack() as locks:
        if fabric.global_rank == 0:
            for out_dir in [config.out_dir, *(solo.out_dir for solo in config.solo_configs().values())]:
                locks.enter_context(hold_lock(Path(out_dir), "out_dir"))
        return train(config, fabric, resume)


def train(config: TrainConfig, fabric: L.Fabric, resume: str | None) -> dict[str, Any]:
    """finetune's run, with out_dir locked."""
    runs = setup(config, fabric, resume)
    if not runs:  # already complete: the summary it wrote, nothing touched
        with contextlib.suppress(OSError, ValueError):
            return {**json.loads((Path(config.out_dir) / "summary.json").read_text()), "interrupted": False,
                    "steps_this_run": 0}
        return {"interrupted": False, "steps_this_run": 0}
    for run in runs:
        if run.progress.step == 0:
            validate_and_sample(run)
    first = min(run.progress.step for run in runs)
    bar = tqdm(total=first + max(run.max_steps - run.progress.step for run in runs), initial=first, desc="finetune",
               dynamic_ncols=True, disable=fabric.global_rank != 0)
    start_time, stopped_by_signal = time.perf_counter(), False

    with StopRequest() as stop, bar:  # the bar is closed (its line ended) before any error is printed
        while any(run.active for run in runs):
            active = [run for run in runs if run.active]
            losses, lrs, stopped_by_signal = train_step(active, stop)
            elapsed = time.perf_counter() - start_time
            for run, loss, lr in zip(active, losses, lrs):
                log_step(run, loss, lr, elapsed)
            tokens_per_s = sum(run.progress.tokens - run.start_tokens for run in runs) / max(elapsed, 1e-9)
            shown = {run.name or "loss": f"{loss:.4f}" for run, loss in zip(active, losses)}
            bar.set_postfix({**shown, "lr": f"{lrs[0]:.2e}", "tok_s": f"{tokens_per_s:.0f}"}, refresh=False)
            bar.update(1)
            if stopped_by_signal:  # some process got SIGINT/SIGTERM: all save and stop together
                for run in active:
                    if not run.active:  # its last step ran: its final/, unvalidated
                        run.save(Path(run.config.out_dir) / FINAL)
                break
            for run in active:
                end_of_step(run)
    bar.close()
    elapsed = time.perf_counter() - start_time
    summaries = {run.name: finish(run, stopped_by_signal, elapsed) for run in runs}
    if None in summaries:
        return summaries[None]
    summary = {"interrupted": stopped_by_signal, "wall_time_s": round(elapsed, 2), "adapters": summaries}
    if fabric.global_rank == 0:
        write_json(Path(config.out_dir) / "summary.json", summary)
    return summary


def log_step(run: Run, loss: float, lr: float, elapsed: float) -> None:
    progress, t = run.progress, run.config.train
    if progress.step % t.log_interval == 0 or progress.step == run.max_steps:
        run.metrics.log(step=progress.step, epoch=progress.epoch, split="train", loss=loss, lr=lr,
                        tokens=progress.tokens,
                        tokens_per_s=round((progress.tokens - run.start_tokens) / max(elapsed, 1e-9), 1),
                        elapsed_s=round(elapsed, 2),
                        peak_memory_gb=round(peak_memory_bytes(run.fabric.device)[1] / 1e9, 3), **run.pair_means)


def end_of_step(run: Run) -> None:
    """Validate and save when the run's intervals say so; at its last step, final/ (at once: adapters trained
    together may end at different steps)."""
    step = run.progress.step
    if step % run.config.eval.interval == 0 or step == run.max_steps:
        validate_and_sample(run)
    if step == run.max_steps:  # final/ keeps the training state too, so raising max_steps later continues from here
        run.save(Path(run.config.out_dir) / FINAL)
    elif step % run.config.train.save_interval == 0:
        run.save(Path(run.config.out_dir) / f"step-{step:06d}")


def finish(run: Run, interrupted: bool, elapsed: float) -> dict[str, Any]:
    """The run's last checkpoint (final/, or its step when interrupted), plot and summary."""
    fabric, progress, out_dir = run.fabric, run.progress, Path(run.config.out_dir)
    stopped_early = interrupted and run.active
    adapter_dir = out_dir / (f"step-{progress.step:06d}" if stopped_early else FINAL)
    if stopped_early:  # else end_of_step saved final/
        run.save(adapter_dir)
        fabric.print(f"interrupted at step {progress.step}: saved {adapter_dir}; continue with --resume auto")
    summary = summarize(run, adapter_dir, stopped_early, elapsed)
    if fabric.global_rank == 0:
        note = plot_losses(out_dir / "metrics.csv", out_dir / "loss.png")
        if note:
            fabric.print(f"note: {note}")
        write_json(out_dir / "summary.json", summary)
        named = f" ({run.name})" if run.name else ""
        fabric.print(f"summary{named}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return summary


def summarize(run: Run, adapter_dir: Path, interrupted: bool, elapsed: float) -> dict[str, Any]:
    progress, model = run.progress, run.model
    memory_kind, memory = peak_memory_bytes(run.fabric.device)
    adapter = adapter_dir / ADAPTER_WEIGHTS
    trainable = sum(p.numel() for _, p in adapter_parameters(model.module, run.name))
    return {
        "interrupted": interrupted,
        "steps": progress.step,
        "steps_this_run": progress.step - run.start_step,
        "epochs": progress.step * run.config.train.global_batch_size / len(run.train_data),
        "tokens_seen": progress.tokens,
        "tokens_seen_with_padding": progress.tokens_padded,
        "wall_time_s": round(elapsed, 2),
        "tokens_per_s": round((progress.tokens - run.start_tokens) / max(elapsed, 1e-9), 1),
        f"{memory_kind}_bytes": memory,
        "trainable_params": trainable,
        "total_params": trainable + sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "adapter_bytes": adapter.stat().st_size if adapter.is_file() else None,
        "first_train_loss": run.train_losses[0] if run.train_losses else None,
        "last_train_loss": run.train_losses[-1] if run.train_losses else None,
        "val_loss_first": run.val_losses[0] if run.val_losses else None,
        "val_loss_last": run.val_losses[-1] if run.val_losses else None,
    }
