"""A training run's checkpoints: what `--resume` needs, written and read the same way under any Fabric strategy.

    out_dir/step-000200/   lora.safetensors, adapter_config.yaml (an adapter), training_state.pt
    out_dir/final/         the adapter only

training_state.pt holds the progress (step, epoch, tokens), the optimizer state, every process's RNG state
(dropout) and the settings a resume must not change. Only rank 0 writes. FSDP is the one strategy that
shards what is saved: its full parameters are gathered on rank 0 while saving and its optimizer state is
converted both ways; everything that knows this lives in the three `_fsdp`-guarded helpers below.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from lit_lora.adapter import ADAPTER_WEIGHTS, write_adapter_files
from lit_lora.errors import UserError
from lit_lora.fileio import atomic_dir, iter_safetensors
from lit_lora.lora import load_lora_state_dict
from lit_lora.train_config import TrainConfig

TRAINING_STATE = "training_state.pt"


@dataclass
class Progress:
    """Where training is; saved with every resumable checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0  # target and prompt tokens seen, without padding, all processes
    tokens_padded: int = 0  # the same including padding


def is_fsdp(fabric: L.Fabric) -> bool:
    return isinstance(fabric.strategy, FSDPStrategy)


# ---------------------------------------------------------------------------------------------- FSDP plumbing
# Fabric's wrapper keeps the strategy-wrapped module as `_forward_module`; FSDP's own APIs need that one.
@contextlib.contextmanager
def _full_params(fabric: L.Fabric, model):
    """Under FSDP, gather the full (LoRA and base) parameters on rank 0; otherwise nothing to do."""
    if not is_fsdp(fabric):
        yield
        return
    with FSDP.summon_full_params(model._forward_module, writeback=False, rank0_only=True, offload_to_cpu=True):
        yield


def _optimizer_state(fabric: L.Fabric, model, optimizer) -> dict:
    if is_fsdp(fabric):
        return FSDP.optim_state_dict(model._forward_module, optimizer.optimizer)
    return optimizer.state_dict()


def _load_optimizer_state(fabric: L.Fabric, model, optimizer, state: dict) -> None:
    if is_fsdp(fabric):
        state = FSDP.optim_state_dict_to_load(model._forward_module, optimizer.optimizer, state)
    optimizer.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- save, resume
def _rng_states(fabric: L.Fabric) -> torch.Tensor:
    """Every process's torch RNG state (dropout), (world_size, n) uint8."""
    state = torch.get_rng_state()
    return state[None] if fabric.world_size == 1 else fabric.all_gather(state).cpu()


def save(fabric: L.Fabric, directory: Path, model, optimizer, progress: Progress, config: TrainConfig,
         template: str | None, resumable: bool) -> None:
    """step-XXXXXX/ or final/: the adapter, plus (when resumable) everything --resume needs. Rank 0 writes."""
    optim = _optimizer_state(fabric, model, optimizer) if resumable else None
    rng = _rng_states(fabric) if resumable else None
    with _full_params(fabric, model):
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
    with _full_params(fabric, model):
        load_lora_state_dict(model.module, dict(iter_safetensors(path / ADAPTER_WEIGHTS)))
    _load_optimizer_state(fabric, model, optimizer, state["optimizer"])
    if state["world_size"] == fabric.world_size:
        torch.set_rng_state(state["rng"][fabric.global_rank])
    else:
        fabric.print(f"note: {path} was saved by {state['world_size']} processes, not {fabric.world_size}: "
                     f"dropout randomness will differ from an uninterrupted run")
    return Progress(**state["progress"])


def last_checkpoint_note(out_dir: Path) -> str:
    """What a user has to fall back on when a run stops with an error."""
    last = sorted(Path(out_dir).glob(f"step-*/{TRAINING_STATE}"))
    return f"the last good checkpoint is {last[-1].parent}" if last else "no checkpoint was saved yet"
