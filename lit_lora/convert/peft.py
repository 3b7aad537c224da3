"""PEFT's LoRA adapter format, both ways: the one place that knows PEFT's file and tensor names.

    DIR/adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    DIR/adapter_model.safetensors    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  (r, in)
                                     base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight  (out, r)
                                     base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector  (out,)
                                         (DoRA, "use_dora": true)

Our module names are Hugging Face's without the `model.` prefix and our LoRA tensors are laid out as PEFT's
(A (r, in), B (out, r)), so the mapping is a rename and nothing is transposed. Phi 3 fuses q, k and v (and gate
and up) into one projection: there the parts' LoRAs become one of their summed rank, A stacked and B block
diagonal, which computes exactly the same update (`fuse_lora`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lit_lora.convert.hf import FUSED, from_hf_name, is_number, split_fused, split_sizes, to_hf_name
from lit_lora.errors import UserError
from lit_lora.fileio import iter_safetensors, write_json
from lit_lora.lora import TARGET_GROUPS, TARGETS, LoRAConfig
from lit_lora.model import Config

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModel wraps LlamaForCausalLM, which holds the decoder as `.model`
_MODULE_TO_TARGET = {module: target for target, module in TARGETS.items()}
# A fused module's name in PEFT's target_modules -> our targets for its parts.
_FUSED_MODULES = {module.rsplit(".", 1)[1]: [_MODULE_TO_TARGET[p.rsplit(".", 1)[1]] for p in parts]
                  for modules in FUSED.values() for module, parts in modules.items()}


def is_peft_adapter(directory: Path) -> bool:
    return (Path(directory) / PEFT_CONFIG).is_file()


def to_peft_key(name: str) -> str:
    """`layers.0.self_attn.q_proj.lora_A` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; a
    DoRA magnitude `...q_proj.lora_magnitude` -> `...q_proj.lora_magnitude_vector` (PEFT saves it without .weight)."""
    if name.endswith(".lora_magnitude"):
        return f"{_PREFIX}{to_hf_name(name)}_vector"
    return f"{_PREFIX}{to_hf_name(name)}.weight"


def from_peft_key(key: str) -> str:
    """The inverse of `to_peft_key`."""
    return from_hf_name(key.removeprefix(_PREFIX).removesuffix(".weight").removesuffix("_vector"))


def peft_config(config: LoRAConfig, base_model_name_or_path: str | None, modules: list[str] | None = None,
                ranks: dict[str, int] | None = None) -> dict[str, Any]:
    """adapter_config.json for a plain LoRA on a causal LM (the fields PEFT, vLLM and llama.cpp read); `modules`
    and `ranks` (fused modules' own ranks, with the alpha that keeps our scaling) when the family fuses layers."""
    alphas = {m: config.scaling * (math.sqrt(r) if config.use_rslora else r) for m, r in (ranks or {}).items()}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": modules or [TARGETS[t] for t in config.targets],
        "use_rslora": config.use_rslora,
        "use_dora": config.variant == "dora",
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": ranks or {},
        "alpha_pattern": alphas,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def write_peft_adapter(directory: Path, config: LoRAConfig, state: dict[str, torch.Tensor],
                       base_model_name_or_path: str | None, base: Config | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an existing (temporary) directory; `base`
    (the config the adapter records) names the modules the way its family does."""
    modules, ranks = None, None
    if base is not None and base.family in FUSED:
        if config.variant == "dora":  # a fused module's magnitudes would need the base rows the adapter leaves alone
            raise UserError(f"a DoRA adapter of a {base.family} model cannot be exported to PEFT, whose {base.family} "
                            f"fuses the projections; export the merged model with export-hf instead")
        state, modules, ranks = fuse_lora(state, base, config)
    tensors = {to_peft_key(name): t.contiguous() for name, t in state.items()}
    save_file(tensors, str(Path(directory) / PEFT_WEIGHTS), metadata={"format": "pt"})
    write_json(Path(directory) / PEFT_CONFIG, peft_config(config, base_model_name_or_path, modules, ranks))


def fuse_lora(state: dict[str, torch.Tensor], base: Config, config: LoRAConfig
              ) -> tuple[dict[str, torch.Tensor], list[str], dict[str, int]]:
    """(tensors, target modules, rank of each fused module) for a family that fuses projections: the LoRAs of a
    fused module's parts become one, A stacked (parts' ranks summed) and B block diagonal (zero rows for a part
    without LoRA), so B A is exactly the parts' updates side by side."""
    state, ranks = dict(state), {}
    fused = FUSED[base.family]
    for module, parts in fused.items():
        sizes = split_sizes(base, module)
        for layer in range(base.n_layers):
            names = [f"layers.{layer}.{part}" for part in parts]
            pairs = [(state.pop(f"{n}.lora_A"), state.pop(f"{n}.lora_B")) if f"{n}.lora_A" in state else None
                     for n in names]
            if not any(pairs):
                continue
            A = torch.cat([a for a, _ in filter(None, pairs)])
            B = A.new_zeros(sum(sizes), A.shape[0])
            row, col = 0, 0
            for pair, size in zip(pairs, sizes):
                if pair is not None:
                    B[row : row + size, col : col + pair[1].shape[1]] = pair[1]
                    col += pair[1].shape[1]
                row += size
            state[f"layers.{layer}.{module}.lora_A"], state[f"layers.{layer}.{module}.lora_B"] = A, B
            ranks[module.rsplit(".", 1)[1]] = A.shape[0]
    part_names = {part.rsplit(".", 1)[1] for parts in fused.values() for part in parts}
    modules = [TARGETS[t] for t in config.targets if TARGETS[t] not in part_names] + sorted(ranks)
    return state, modules, ranks


# What a JSON file holds, in JSON's words, by the type json.loads gives
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
               type(None): "null"}


def _check_numbers(cfg: dict[str, Any], path: Path) -> None:
    """r, lora_alpha and lora_dropout as PEFT writes them, or a UserError naming the field."""
    r, dropout = cfg.get("r"), cfg.get("lora_dropout") or 0.0
    for key, ok, must in (("r", type(r) is int and r >= 1, "a whole number >= 1"),
                          ("lora_alpha", is_number(cfg.get("lora_alpha")), "a number"),
                          ("lora_dropout", is_number(dropout) and 0 <= dropout < 1, "a number in [0, 1)")):
        if not ok:
            got = repr(cfg[key]) if key in cfg else "nothing"
            raise UserError(f"{path} is not a PEFT adapter config: {key} must be {must}, got {got}")


def _lora_config_from_peft(cfg: Any, path: Path) -> LoRAConfig:
    """Our LoRAConfig for a PEFT config, refusing the PEFT features our plain LoRA layer does not compute."""
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a PEFT adapter config: it holds {_JSON_KINDS[type(cfg)]}, not a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise UserError(f"{path} is a PEFT {cfg.get('peft_type')} adapter; only LORA adapters are supported")
    _check_numbers(cfg, path)
    modules = cfg.get("target_modules")
    # Before the options: our own Phi 3 export gives its fused modules their summed ranks (rank_pattern).
    fused = isinstance(modules, list) and any(isinstance(m, str) and m in _FUSED_MODULES for m in modules)
    if fused and (cfg.get("rank_pattern") or cfg.get("alpha_pattern")):
        raise UserError(f"{path} adapts Phi 3's fused qkv_proj / gate_up_proj with ranks of their own "
                        f"(rank_pattern), which lit-lora cannot import; use the lit-lora adapter it was exported from")
    unsupported = {
        "bias": cfg.get("bias", "none") != "none",
        "fan_in_fan_out": cfg.get("fan_in_fan_out"), "rank_pattern": cfg.get("rank_pattern"),
        "alpha_pattern": cfg.get("alpha_pattern"), "modules_to_save": cfg.get("modules_to_save"),
        "layers_to_transform": cfg.get("layers_to_transform") is not None, "lora_bias": cfg.get("lora_bias"),
    }
    used = [name for name, value in unsupported.items() if value]
    if used:
        raise UserError(f"{path} uses PEFT options lit-lora does not support ({', '.join(used)}); "
                        f"only plain LoRA on linear layers can be imported")
    if modules == "all-linear":  # PEFT's shorthand excludes the output head
        targets = TARGET_GROUPS["attention"] + TARGET_GROUPS["mlp"]
    elif isinstance(modules, list) and all(isinstance(m, str) and m in {**_MODULE_TO_TARGET, **_FUSED_MODULES}
                                           for m in modules):
        targets = [t for m in modules
                   for t in _FUSED_MODULES.get(m, [_MODULE_TO_TARGET.get(m)])]
    else:
        raise UserError(f"{path}: unsupported target_modules {modules!r}; expected a list of "
                        f"{', '.join(_MODULE_TO_TARGET)}")
    return LoRAConfig(r=cfg["r"], alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout") or 0.0),
                      targets=targets, use_rslora=bool(cfg.get("use_rslora", False)),
                      variant="dora" if cfg.get("use_dora") else "lora")


def split_fused_lora(state: dict[str, torch.Tensor], base: Config) -> dict[str, torch.Tensor]:
    """A PEFT adapter's LoRA of a fused projection (Phi 3's qkv_proj) as one LoRA per part: each part keeps A
    and takes its rows of B, so each part's update is exactly its rows of the fused B A. Needs the base's sizes."""
    return {part: piece.contiguous() for name, tensor in state.items()
            for part, piece in split_fused(base, name, tensor, "the base model's config",
                                           "use the base model the adapter was trained on")}


def load_peft_adapter(directory: Path) -> tuple[LoRAConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(LoRA config, LoRA tensors under our names, metadata) of a PEFT adapter directory.

    PEFT records neither our model config nor a content hash of the base, so the metadata has no
    `base_content_hash` and the base check can only compare tensor shapes.
    """
    directory = Path(directory)
    path = directory / PEFT_CONFIG
    try:
        cfg = json.loads(path.read_text())
        config = _lora_config_from_peft(cfg, path)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is not a valid PEFT adapter config: {e!r}") from None
    weights = directory / PEFT_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{directory} has {PEFT_CONFIG} but no {PEFT_WEIGHTS} (PyTorch .bin adapters are not read; "
                        f"re-save it with safe_serialization=True)")
    state = {from_peft_key(key): t for key, t in iter_safetensors(weights)}
    meta = {**config.to_dict(), "scaling": config.scaling, "template": None, "base_content_hash": None,
            "base_checkpoint": cfg.get("base_model_name_or_path"), "format": "peft"}
    return config, state, meta
