"""A training run's checkpoints: what `--resume` needs, written and read the same way under any Fabric strategy.

    out_dir/step-000200/   lora.safetensors, adapter_config.yaml (an adapter), training_state.pt
    out_dir/final/         the same at the end of the run (so a finished run can be continued further)

training_state.pt holds the progress (step, epoch, tokens), the optimizer state, every process's RNG state
(dropout), the settings a resume must not change (the data's identity among them), the run's total steps and
the sha256 of lora.safetensors.
Every checkpoint is read and checked in full (`load_checkpoint`) before a run writes anything; a damaged one
is skipped by `--resume auto` (said so) and refused when named. Only rank 0 writes. FSDP is the one strategy that
shards what is saved: the LoRA tensors and AdamW's moments are gathered whole for saving (never the frozen base)
and re-sharded when resuming, so a checkpoint is the same under every strategy and any number of processes;
everything that knows this lives in the small DTensor helpers below.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning_fabric as L
import torch
import yaml
from lightning_fabric.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor, distribute_tensor

from lit_lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_adapter_files
from lit_lora.checkpoint import load_info
from lit_lora.data.dataset import data_identity
from lit_lora.errors import UserError
from lit_lora.fileio import atomic_dir, iter_safetensors, sha256_file
from lit_lora.device import rng_state, set_rng_state
from lit_lora.lora import copy_lora_tensors
from lit_lora.multi_lora import AdapterRNG, adapter_parameters
from lit_lora.train_config import TrainConfig

TRAINING_STATE = "training_state.pt"
FINAL = "final"
_STATE_KEYS = ("progress", "optimizer", "rng", "world_size", "global_batch_size", "seed")
# LoRA settings a resume must keep: they decide the tensors' shapes and what they mean.
_LORA_KEYS = ("r", "alpha", "targets", "use_rslora", "variant")


@dataclass
class Progress:
    """Where training is; saved with every resumable checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0  # target and prompt tokens seen, without padding, all processes
    tokens_padded: int = 0  # the same including padding


def is_sharded(fabric: L.Fabric) -> bool:
    """strategy fsdp: FSDP2 (Fabric's ModelParallelStrategy), each parameter a DTensor sharded over the processes."""
    return isinstance(fabric.strategy, ModelParallelStrategy)


# ---------------------------------------------------------------------------------------------- FSDP plumbing
# Under FSDP2 the LoRA parameters and AdamW's moments (of the same shapes) are DTensors, each process holding a
# shard; under any other strategy none is, and these helpers change nothing.
def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole, on the CPU (a collective: every process calls it in the same order)."""
    return t.full_tensor().cpu() if isinstance(t, DTensor) else t


def _shard_like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A saved full tensor of `param`'s shape (its value or a moment) as this process's shard of it."""
    if isinstance(param, DTensor) and t.shape == param.shape:
        return distribute_tensor(t.to(param.device), param.device_mesh, param.placements)
    return t


def _lora_tensors(model, adapter: str | None) -> dict[str, torch.Tensor]:
    return {name: _full(p.detach()) for name, p in adapter_parameters(model.module, adapter)}


def _load_lora(model, lora: dict[str, torch.Tensor], adapter: str | None) -> None:
    own = dict(adapter_parameters(model.module, adapter))  # a name or shape that does not fit: copy_lora_tensors says
    copy_lora_tensors(own, {k: _shard_like(t, own[k]) if k in own else t for k, t in lora.items()})


def _optimizer_state(optimizer) -> dict:
    state = optimizer.state_dict()
    return {**state, "state": {i: {k: _full(v) for k, v in s.items()} for i, s in state["state"].items()}}


def _load_optimizer_state(optimizer, state: dict) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    moments = {i: {k: _shard_like(v, params[i]) for k, v in s.items()} for i, s in state["state"].items()}
    optimizer.load_state_dict({**state, "state": moments})


# ---------------------------------------------------------------------------------------------- save, resume
def _rng_states(fabric: L.Fabric, rng: AdapterRNG | None, adapter: str | None) -> torch.Tensor:
    """Every process's state of the generator the adapter's dropout draws from, (world_size, n) uint8."""
    state = rng_state(fabric.device) if rng is None else rng.states[adapter]
    return state[None] if fabric.world_size == 1 else fabric.all_gather(state).cpu()


def save(fabric: L.Fabric, directory: Path, model, optimizer, progress: Progress, config: TrainConfig,
         data_meta: dict[str, Any], max_steps: int, adapter: str | None = None, rng: AdapterRNG | None = None,
         init_lora_sha256: str | None = None) -> None:
    """step-XXXXXX/ or final/: the adapter and everything --resume needs. Rank 0 writes.

    `data_meta` is the training data's meta.json: the adapter records its format, the training state its identity.
    `adapter` and `rng` name one of several adapters trained together (multi_lora) and hold its generator state.

    The directory is built under a temporary name and renamed when complete, so a failed save (a full disk)
    leaves the previous checkpoints as they were; it ends in one UserError naming both.
    """
    lora, optim = _lora_tensors(model, adapter), _optimizer_state(optimizer)  # collectives
    rng_states = _rng_states(fabric, rng, adapter)
    if fabric.global_rank == 0:
        try:
            with atomic_dir(directory, overwrite=True) as tmp:
                write_adapter_files(tmp, model.module, Path(config.checkpoint_dir), data_meta, tensors=lora,
                                    lora_config=config.lora)
                _write_state(tmp / TRAINING_STATE, {
                    "progress": vars(progress), "optimizer": optim, "rng": rng_states, "world_size": fabric.world_size,
                    "global_batch_size": config.train.global_batch_size, "seed": config.seed,
                    "lora_plus_ratio": config.train.lora_plus_ratio, "max_steps": max_steps,
                    **method_settings(config), "init_lora_sha256": init_lora_sha256,
                    "data": data_identity(data_meta),
                    "adapter_sha256": sha256_file(tmp / ADAPTER_WEIGHTS)})
        except Exception as e:
            reason = _io_failure(e)
            if reason is None:
                raise
            raise UserError(f"could not save {directory}: {reason}; nothing of it was kept, and "
                            f"{last_checkpoint_note(directory.parent)}; free some space, then continue with "
                            f"--resume auto") from None
    fabric.barrier()


def _write_state(path: Path, state: dict[str, Any]) -> None:
    # Serialised in memory and written by Python: a full disk is then an OSError naming its cause, where
    # torch.save's own writer reports only "unexpected pos".
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def _io_failure(e: Exception) -> str | None:
    """Why writing failed, when it was the file system (full disk, quota, permissions), else None (a bug)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if type(e).__name__ == "SafetensorError" and "I/O error" in str(e):  # safetensors' writer, e.g. ENOSPC
        return str(e).split("I/O error:", 1)[1].split(" (os error", 1)[0].strip()
    return None


@dataclass
class ResumePoint:
    """A checkpoint read in full and checked: its training state, LoRA tensors and adapter config."""

    path: Path
    state: dict[str, Any]
    lora: dict[str, torch.Tensor]
    adapter_config: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["progress"]["step"])


def _read_state(path: Path) -> dict[str, Any]:
    """training_state.pt of a checkpoint directory; ValueError (with the reason) when it is unusable."""
    file = path / TRAINING_STATE
    if not file.is_file():
        raise ValueError(f"no {TRAINING_STATE}")
    try:
        state = torch.load(file, weights_only=True, map_location="cpu")
    except OSError:  # the file system's (permissions, I/O), not a damaged file: said as such, not skipped
        raise
    except Exception as e:  # unpickling, zip and EOF errors of a truncated or overwritten file
        first_line = (str(e).strip().splitlines() or [""])[0][:120]
        raise ValueError(f"{TRAINING_STATE} cannot be read: {type(e).__name__}: {first_line}") from None
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
        raise ValueError(f"{TRAINING_STATE} is incomplete")
    return state


def load_checkpoint(path: Path) -> ResumePoint:
    """Read and check a checkpoint directory in full; a UserError saying what is damaged otherwise."""
    path = Path(path)
    try:
        state = _read_state(path)
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise ValueError(f"{ADAPTER_WEIGHTS} is missing")
        if state.get("adapter_sha256") and sha256_file(path / ADAPTER_WEIGHTS) != state["adapter_sha256"]:
            raise ValueError(f"{ADAPTER_WEIGHTS} differs from the one saved with it (sha256)")
        try:
            lora = dict(iter_safetensors(path / ADAPTER_WEIGHTS))
        except UserError:
            raise ValueError(f"{ADAPTER_WEIGHTS} is truncated or not safetensors") from None
        try:
            adapter_config = yaml.safe_load((path / ADAPTER_CONFIG).read_text())
        except (FileNotFoundError, yaml.YAMLError):
            adapter_config = None
        if not isinstance(adapter_config, dict):
            raise ValueError(f"{ADAPTER_CONFIG} is missing or unreadable")
    except ValueError as e:
        raise UserError(f"checkpoint {path} is damaged: {e}") from None
    return ResumePoint(path, state, lora, adapter_config)


def _checkpoint_dirs(out_dir: Path) -> list[Path]:
    """out_dir's checkpoint directories, newest first: step-* by number, and final/ by the step it holds."""
    def order(d: Path) -> tuple[float, int]:
        if d.name != FINAL:
            return int(d.name[len("step-"):]), 0
        try:
            return _read_state(d)["progress"]["step"], 1
        except (ValueError, KeyError, TypeError):
            return math.inf, 1  # a damaged final/ is the end of the run: tried (and reported) first

    dirs = [d for d in Path(out_dir).glob("step-*") if d.is_dir() and d.name[len("step-"):].isdigit()]
    if (Path(out_dir) / FINAL / TRAINING_STATE).is_file():
        dirs.append(Path(out_dir) / FINAL)
    return sorted(dirs, key=order, reverse=True)


def find_resume(resume: str | None, out_dir: Path) -> tuple[ResumePoint | None, list[str]]:
    """(the checkpoint to resume from, warnings to print): a path, or for 'auto' the newest valid checkpoint in
    out_dir (None if there is none). Damaged checkpoints are skipped by 'auto' with a warning each; a damaged
    named checkpoint, or out_dir holding only damaged ones, is a UserError. Reads only."""
    out_dir = Path(out_dir)
    if resume is None:
        if out_dir.is_dir() and (any(out_dir.glob("step-*")) or (out_dir / FINAL).exists()):
            raise UserError(f"{out_dir} already holds a run (checkpoints or final/); continue it with --resume auto "
                            f"or choose another out_dir")
        return None, []
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir() or not (path / TRAINING_STATE).is_file():
            raise UserError(f"{path} is not a resumable checkpoint (no {TRAINING_STATE}); pass a step-XXXXXX "
                            f"directory or --resume auto")
        return load_checkpoint(path), []
    damaged: list[tuple[Path, str]] = []
    for path in _checkpoint_dirs(out_dir):
        try:
            point = load_checkpoint(path)
        except UserError as e:
            damaged.append((path, str(e).split(" is damaged: ", 1)[-1]))
            continue
        return point, [f"warning: {bad} is damaged ({why}); skipped it, falling back to {path}"
                       for bad, why in damaged]
    if damaged:
        listed = "; ".join(f"{bad.name}: {why}" for bad, why in damaged)
        raise UserError(f"every checkpoint in {out_dir} is damaged ({listed}); nothing was changed; "
                        f"start again in another out_dir")
    return None, []


def method_settings(config: TrainConfig | None) -> dict[str, Any]:
    """What a resume must keep of the training objective (None: what a checkpoint from before methods trained)."""
    if config is None:
        return {"method": "sft", "init_lora": None, "preference.beta": None, "preference.label_smoothing": None,
                "preference.sft_weight": None, "preference.compare": None, "preference.loss": None,
                "preference.dpop_lambda": None}
    p, preference = config.preference, config.method != "sft"
    return {"method": config.method, "init_lora": config.init_lora,
            "preference.beta": p.beta if preference else None,
            "preference.label_smoothing": p.label_smoothing if preference else None,
            "preference.sft_weight": p.sft_weight if preference else None,  # as set: null before the field existed
            "preference.compare": p.compare if preference and p.compare != "whole" else None,  # null: whole, as before
            "preference.loss": p.loss if preference and p.loss != "sigmoid" else None,  # null: sigmoid, as before
            "preference.dpop_lambda": p.dpop_lambda if preference and p.loss == "dpop" else None}


def check_resume_settings(point: ResumePoint, config: TrainConfig, data_meta: dict[str, Any],
                          init_lora_sha256: str | None = None) -> None:
    """A UserError naming every setting that differs from the checkpoint's and that a resume must keep, the
    training data (`data_meta`, its meta.json) and init_lora's weights (`init_lora_sha256`) among them."""
    changed = [f"{key} {point.state.get(k)} -> {new}" for key, k, new in (
        ("train.global_batch_size", "global_batch_size", config.train.global_batch_size),
        ("seed", "seed", config.seed),
        ("train.lora_plus_ratio", "lora_plus_ratio", config.train.lora_plus_ratio)) if point.state.get(k) != new]
    saved_method = {**method_settings(None), **{k: point.state[k] for k in method_settings(None) if k in point.state}}
    changed += [f"{k} {saved_method[k]} -> {v}" for k, v in method_settings(config).items() if saved_method[k] != v]
    ours = config.lora.to_dict()
    changed += [f"lora.{k} {point.adapter_config[k]} -> {ours[k]}" for k in _LORA_KEYS
                if k in point.adapter_config and point.adapter_config[k] != ours[k]]
    saved_quantize = point.adapter_config.get("base_quantize", "none")
    if saved_quantize != config.quantize:
        changed.append(f"quantize {saved_quantize} -> {config.quantize}")
    saved_base = point.adapter_config.get("base_content_hash")
    base = load_info(Path(config.checkpoint_dir)).get("content_hash")
    if saved_base and base and saved_base != base:
        changed.append(f"checkpoint_dir {config.checkpoint_dir} is another base model than the one it was trained on")
    saved_init = point.state.get("init_lora_sha256")  # none saved by older versions
    if saved_init and init_lora_sha256 and saved_init != init_lora_sha256:
        changed.append(f"init_lora {config.init_lora} now holds another adapter than the run started from, "
                       f"weights sha256 {saved_init[:12]} -> {init_lora_sha256[:12]}")
    saved_data, data = point.state.get("data"), data_identity(data_meta)  # none saved by older versions
    if saved_data is not None and saved_data != data:
        keys = [k for k in {**saved_data, **data} if saved_data.get(k) != data.get(k)]
        changed.append(f"data_dir {config.data_dir} holds other data than the run was trained on (its meta.json "
                       f"differs in {', '.join(keys)})")
    if changed:
        raise UserError(f"cannot resume from {point.path}: it was trained with other settings "
                        f"({'; '.join(changed)}); resume with the same ones or choose another out_dir")


def restore(fabric: L.Fabric, point: ResumePoint, model, optimizer, adapter: str | None = None,
            rng: AdapterRNG | None = None) -> Progress:
    """Put a checked checkpoint's LoRA tensors, optimizer state and RNG state into the run (of adapter `adapter`
    of several, its generator state into `rng`)."""
    _load_lora(model, point.lora, adapter)
    _load_optimizer_state(optimizer, point.state["optimizer"])
    saved = point.state["rng"]
    if point.state["world_size"] == fabric.world_size and saved.shape[1] == rng_state(fabric.device).numel():
        state = saved[fabric.global_rank].clone()  # a copy: set_rng_state segfaults on a row view past the first
        if rng is None:
            set_rng_state(state, fabric.device)
        else:
            rng.states[adapter] = state
    else:
        fabric.print(f"note: {point.path} was saved by {point.state['world_size']} processes (now {fabric.world_size}) "
                     f"or on another kind of device: dropout randomness will differ from an uninterrupted run")
    return Progress(**point.state["progress"])


def run_is_complete(fabric: L.Fabric, out_dir: Path, resume: str | None, point: ResumePoint | None,
                    max_steps: int) -> bool:
    """True (and says so) when out_dir's run already trained max_steps: resuming it would change nothing.

    A finished run's final/ holds its training state, so raising train.max_steps (or epochs) continues it
    from its last step; a final/ from before that (no training state) can only be reported, not continued.
    """
    done = point.step if point is not None and point.path.name == FINAL else None
    if done is None and resume == "auto":
        done = legacy_final_steps(out_dir)
        if done is not None and 0 <= done < max_steps:
            raise UserError(f"{out_dir / FINAL} was saved without training state (by an older lit-lora), so the "
                            f"run cannot continue from its end to step {max_steps}; resume from a step directory "
                            f"with --resume {out_dir}/step-XXXXXX (final/ is then replaced) or choose another out_dir")
    if done is None or (0 <= done < max_steps):
        return False
    if fabric.global_rank == 0:  # known before launch: each process Fabric launches runs this too
        trained = f"{done} steps" if done >= 0 else "its steps"
        print(f"{out_dir} holds a complete run ({trained} trained, this config asks for {max_steps}); its adapter is "
              f"{out_dir / FINAL}; nothing was changed; raise train.max_steps (or train.epochs) to train further")
    return True


def legacy_final_steps(out_dir: Path) -> int | None:
    """For a final/ saved without training state (before final/ kept it): the steps its run trained, from
    summary.json (-1 when it does not say). None when there is no such final/."""
    final = Path(out_dir) / FINAL
    if not final.is_dir() or (final / TRAINING_STATE).exists():
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads((Path(out_dir) / "summary.json").read_text())["steps"])
    return -1


def last_checkpoint_note(out_dir: Path) -> str:
    """What a user has to fall back on when a run stops with an error."""
    last = [d for d in _checkpoint_dirs(out_dir) if (d / TRAINING_STATE).is_file()]
    return f"the last good checkpoint is {last[0]}" if last else "no checkpoint was saved yet"
