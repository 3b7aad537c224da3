"""The adapter: what lit-lora produces. Its directory format, reading any adapter (ours or PEFT's), the checks
that it belongs to a base, and merging it into a model in memory.

    out/RUN/final/
      lora.safetensors      the LoRA tensors only, under the model's parameter names (layers.0.self_attn.q_proj.lora_A)
      adapter_config.yaml   r, alpha, dropout, targets, scaling, template, the base's config and content hash,
                            and the sha256 of lora.safetensors (checked when the adapter is loaded)

`generate` merges adapters into a loaded base (`merge_adapter`) and `merge-lora` streams a checkpoint
through the same `lora.merged_weight`, so both hold bit-identical weights.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from lit_lora.checkpoint import load_info
from lit_lora.convert.peft import PEFT_WEIGHTS, is_peft_adapter, load_peft_adapter, split_fused_lora
from lit_lora.errors import UserError
from lit_lora.fileio import iter_safetensors, sha256_file, write_yaml
from lit_lora.lora import LoRAConfig, apply_lora, load_lora_state_dict, lora_state_dict, merged_weight
from lit_lora.model import LLaMA, Config
from lit_lora.prompts.format import recorded_prompt
from lit_lora.quantize import quantization

ADAPTER_WEIGHTS = "lora.safetensors"
ADAPTER_CONFIG = "adapter_config.yaml"
# Fields that decide whether adapter tensors fit a base (name and context length do not).
_ARCHITECTURE_FIELDS = ("family", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim")


# ---------------------------------------------------------------------------------------------- the format
def write_adapter_files(directory: Path, model: LLaMA, base_checkpoint_dir: Path | None, prompt: dict[str, Any],
                        dtype: torch.dtype | None = None, tensors: dict[str, torch.Tensor] | None = None,
                        lora_config: LoRAConfig | None = None) -> None:
    """Write lora.safetensors (LoRA tensors only) and adapter_config.yaml into an existing directory.

    `prompt` is the data's format (prompts.format.PROMPT_KEYS: "template", and for conversations "chat_template" {"name",
    "source"} and "system"): generation asks the adapter in exactly the format it was trained in. `tensors`, when
    given, are the LoRA tensors to write instead of the model's own (training under FSDP gathers them from shards;
    a run of several adapters gives one of them, with its `lora_config`).

    Callers wrap this in `atomic_dir` together with whatever else belongs in the same directory.
    """
    config = lora_config or model.lora_config
    tensors = lora_state_dict(model) if tensors is None else tensors
    state = {k: (v.detach().to(dtype) if dtype else v.detach()).contiguous() for k, v in tensors.items()}
    # One metadata key: safetensors writes the metadata map in a random order per process, so with two the bytes (and
    # the sha256 recorded below) would differ between identical runs.
    save_file(state, str(Path(directory) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    base_info = load_info(base_checkpoint_dir) if base_checkpoint_dir else {}
    meta = {
        **config.to_dict(),
        "scaling": config.scaling,
        "base_checkpoint": str(base_checkpoint_dir) if base_checkpoint_dir else None,
        "base_content_hash": base_info.get("content_hash"),
        "base_model": model.config.to_dict(),
        "base_quantize": quantization(model),  # generate, evaluate and merge-lora use the same base by default
        **recorded_prompt(prompt),
        "weights_sha256": sha256_file(Path(directory) / ADAPTER_WEIGHTS),
    }
    write_yaml(Path(directory) / ADAPTER_CONFIG, meta)


def load_adapter(path: Path, verify: bool = True) -> tuple[LoRAConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(LoRA config, LoRA tensors, everything adapter_config.yaml records) from an adapter dir or its file.

    With `verify`, lora.safetensors is hashed as it is read and checked against the sha256 recorded in
    adapter_config.yaml (adapters written before that was recorded are not checked).
    """
    path = Path(path)
    directory, weights, peft = adapter_files(path)
    if not path.exists():
        raise UserError(f"adapter {path} does not exist")
    if peft:
        return load_peft_adapter(directory)  # an adapter trained elsewhere with Hugging Face PEFT
    if not (directory / ADAPTER_CONFIG).is_file() or not weights.is_file():
        raise UserError(f"{path} is not a LoRA adapter: expected {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}")
    try:
        meta = yaml.safe_load((directory / ADAPTER_CONFIG).read_text()) or {}
        config = LoRAConfig(r=meta["r"], alpha=meta["alpha"], dropout=meta.get("dropout", 0.0),
                            targets=list(meta["targets"]), use_rslora=meta.get("use_rslora", False),
                            variant=meta.get("variant", "lora"))
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise UserError(f"{directory / ADAPTER_CONFIG} is not a valid adapter config: {e!r}") from None
    recorded = meta.get("weights_sha256") if verify and weights.name == ADAPTER_WEIGHTS else None
    state = dict(iter_safetensors(weights, sha256=recorded, hint="; the adapter cannot be trusted: train or copy "
                                  "it again (--no-verify skips this check)"))
    return config, state, meta


def adapter_files(path: Path) -> tuple[Path, Path, bool]:
    """(directory, weights file, whether it is a PEFT adapter) of an adapter dir or its file, as load_adapter reads
    them: a directory without our adapter_config.yaml but with PEFT's adapter_config.json is PEFT's."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    peft = not (directory / ADAPTER_CONFIG).is_file() and is_peft_adapter(directory)
    return directory, path if path.is_file() else directory / (PEFT_WEIGHTS if peft else ADAPTER_WEIGHTS), peft


def adapter_sha256(path: Path) -> str | None:
    """The sha256 of the weights file `load_adapter` reads from `path` (ours or PEFT's; None if there is none): a run
    that starts from an adapter records it, so that a resume from another adapter under the same path is refused."""
    weights = adapter_files(path)[1]
    return sha256_file(weights) if weights.is_file() else None


# ---------------------------------------------------------------------------------------------- checks
def check_adapter_base(meta: dict[str, Any], checkpoint_dir: Path, config: Config) -> None:
    """Refuse an adapter that records another base; warn when it records no base hash to compare."""
    recorded = meta.get("base_model") or {}
    for field in _ARCHITECTURE_FIELDS:
        if field in recorded and recorded[field] != getattr(config, field):
            raise UserError(f"the adapter was trained on another model ({field} {recorded[field]} != "
                            f"{getattr(config, field)} in {checkpoint_dir}); use the base it was trained on")
    want, have = meta.get("base_content_hash"), load_info(checkpoint_dir).get("content_hash")
    if want and have and want != have:
        raise UserError(f"the adapter was trained on another checkpoint than {checkpoint_dir} (content hash "
                        f"{want[:12]} != {have[:12]}, base was {meta.get('base_checkpoint')}); use that base")
    if not (want and have):
        warnings.warn(f"cannot verify that the adapter was trained on {checkpoint_dir} (no base content hash "
                      f"recorded); only tensor shapes are checked", stacklevel=2)


def check_adapter_fits(config: Config, lora_config: LoRAConfig, state: dict[str, torch.Tensor]) -> None:
    """Names and shapes of the adapter tensors against a model of `config`, without allocating the model."""
    with torch.device("meta"):
        model = apply_lora(LLaMA(config), lora_config)
    load_lora_state_dict(model, state)  # raises UserError on a missing, unexpected or misshapen tensor


def load_checked_adapter(lora_path: Path, checkpoint_dir: Path, config: Config, verify: bool = True):
    """load_adapter + the base checks: (LoRA config, tensors, metadata) that are known to fit the base."""
    lora_config, state, meta = load_adapter(lora_path, verify)
    check_adapter_base(meta, checkpoint_dir, config)
    if meta.get("format") == "peft":  # Phi 3's fused modules, split now that the base's sizes are known
        state = split_fused_lora(state, config)
    check_adapter_fits(config, lora_config, state)
    return lora_config, state, meta


# ---------------------------------------------------------------------------------------------- merging
def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """{"layers.0.self_attn.q_proj.weight": (A, B, DoRA magnitude or None)} for every adapted weight."""
    modules = {name.rsplit(".", 1)[0] for name in state}
    return {f"{m}.weight": (state[f"{m}.lora_A"], state[f"{m}.lora_B"], state.get(f"{m}.lora_magnitude"))
            for m in modules}


@torch.no_grad()
def merge_adapter(model: LLaMA, lora_config: LoRAConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merge an adapter into the model's weights in place; returns the original weights for `restore_weights`.

    Restoring the saved originals (rather than subtracting B A again) leaves the base exactly as loaded,
    which rounding would not in bf16.
    """
    originals = {}
    for name, (A, B, m) in lora_pairs(state).items():
        weight = model.get_parameter(name)
        originals[name] = weight.detach().clone()
        weight.copy_(merged_weight(weight, A, B, lora_config.scaling, magnitude=m))
    return originals


@torch.no_grad()
def restore_weights(model: LLaMA, originals: dict[str, torch.Tensor]) -> None:
    for name, weight in originals.items():
        model.get_parameter(name).copy_(weight)
