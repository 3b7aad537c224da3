"""The fine-tuning configuration: dataclasses, read from YAML, with single keys overridden from the command line.

    finetune-lora --config configs/tiny.yaml --train.micro_batch_size 2 --lora.r 16

Every key is checked against the dataclass field it sets: an unknown key names the closest valid one, and a
value of the wrong type names the type expected. What is checked here is the shape of the config; whether the
paths exist and the numbers fit together is checked by `finetune` before training starts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from lit_lora.device import check_precision
from lit_lora.errors import UserError
from lit_lora.fileio import read_yaml
from lit_lora.lora import LoRAConfig
from lit_lora.quantize import TRAIN_QUANTIZATIONS, check_quantize, torchao_nf4

STRATEGIES = ("auto", "ddp", "fsdp")
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


@dataclass
class TrainSection:
    global_batch_size: int = 128  # examples per optimizer step, over all devices and accumulation steps
    micro_batch_size: int = 4  # examples per forward/backward on one device
    epochs: int | None = 5  # stop after this many passes over the training split ...
    max_steps: int | None = None  # ... or after this many optimizer steps, whichever comes first
    learning_rate: float = 3e-4
    min_lr: float = 0.0  # the cosine schedule ends here
    warmup_steps: int = 100  # linear warmup from 0 to learning_rate
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    lora_plus_ratio: float | None = None  # LoRA+: B's learning rate this many times A's (16 is PEFT's example); null: 1
    grad_clip: float | None = 1.0  # max gradient norm; null disables clipping
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass
    # return freed tensors' memory to the system at once (glibc): less memory, slower steps; null: on with
    # quantize nf4 or gradient_checkpointing, the settings chosen to save memory
    low_memory: bool | None = None
    group_by_length: bool = True  # batch examples of similar length together (less padding)
    packing: bool = False  # lay a micro-batch's examples end to end (block-diagonal attention)
    pad_multiple: int = 16  # pad a batch's length up to a multiple of this: few distinct shapes, steady memory
    loss_chunk_size: int = 256  # target tokens per chunk of the output head + cross-entropy (256 x vocab fp32)
    save_interval: int = 200  # steps between resumable checkpoints
    log_interval: int = 1  # steps between metrics.csv rows


@dataclass
class EvalSection:
    interval: int = 100  # steps between validations (and at the end)
    max_batches: int | None = None  # micro-batches of the validation split to use; null = all
    prompt: str = "Give three tips for staying healthy."  # instruction of the logged greedy sample
    max_new_tokens: int = 64


@dataclass
class PreferenceSection:
    """method dpo and orpo (preference.py)."""

    beta: float = 0.1  # DPO: how far the policy may stray from the reference (lower: further); ORPO: odds weight
    label_smoothing: float = 0.0  # DPO: the probability that a pair's labels are flipped (conservative DPO)
    # the weight of the chosen answers' NLL per token added to the loss: null = the method's own (ORPO 1, DPO 0);
    # DPO with a weight > 0 is RPO (Pang et al. 2024; TRL's rpo_alpha), which keeps the chosen answers likely
    sft_weight: float | None = None
    # which answer tokens the preference term compares: whole (the papers'), or first_difference (up to and
    # including the pair's first different token; preference.py says why)
    compare: str = "whole"
    # DPO's loss: sigmoid (the DPO paper's), ipo (Azar et al. 2023: the squared distance of the log-ratio margin
    # from 1 / (2 beta), which stops pushing a pair apart once it is separated), or dpop (DPO-Positive, Pal et al.
    # 2024: DPO with a penalty once the chosen answer grows less likely than under the reference)
    loss: str = "sigmoid"
    dpop_lambda: float = 50.0  # preference.loss dpop: the penalty per nat the chosen answer falls (the paper's 50)


@dataclass
class AdapterEntry:
    """One of several adapters trained together over one base (`adapters:`): its name (its folder under out_dir)
    and what it changes of the config's own lora section, learning rate, LoRA+ ratio and data (null: the same)."""

    name: str = ""
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    targets: list[str] | None = None
    use_rslora: bool | None = None
    variant: str | None = None
    learning_rate: float | None = None
    lora_plus_ratio: float | None = None
    data_dir: str | None = None


def reserved_names() -> set[str]:
    """Names an adapter cannot have: attributes of the ModuleDict that holds the adapters, and out_dir's folders."""
    import torch.nn as nn

    return set(dir(nn.ModuleDict())) | {"tensorboard"}


LORA_FIELDS = ("r", "alpha", "dropout", "targets", "use_rslora", "variant")
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a folder name, and a module name (no dots)


@dataclass
class TrainConfig:
    checkpoint_dir: str = "checkpoints/model"
    data_dir: str = "data/prepared"
    out_dir: str = "out/lora"
    precision: str = "auto"  # or one of device.PRECISIONS; auto: the faster of bf16-mixed and 32-true here
    accelerator: str = "auto"  # cpu, cuda, auto
    devices: int = 1  # processes per node
    num_nodes: int = 1
    strategy: str = "auto"
    quantize: str = "none"  # nf4: QLoRA, the frozen base's linear weights in 4-bit NormalFloat (needs torchao)
    seed: int = 1337
    verify: bool = True  # check the checkpoint's weights files against checkpoint.json's sha256 while loading them
    method: str = "sft"  # sft: demonstrations; dpo or orpo: chosen/rejected pairs (prepare-preference)
    # an adapter to start from (e.g. out/sft/final), its r, alpha, targets and variant replacing lora:'s; with dpo it
    # is also the reference. null: a fresh adapter (the reference is then the base)
    init_lora: str | None = None
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # the adapter's own config, one definition
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    preference: PreferenceSection = field(default_factory=PreferenceSection)
    # several adapters trained together, each in out_dir/<name>/ as if trained alone; empty: the one adapter above
    adapters: list[AdapterEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_precision(self.precision, what="precision")
        check_quantize(self.quantize, TRAIN_QUANTIZATIONS, what="quantize")
        if self.strategy not in STRATEGIES:
            raise UserError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        t = self.train
        if t.epochs is None and t.max_steps is None:
            raise UserError("set train.epochs or train.max_steps (or both)")
        for key in ("global_batch_size", "micro_batch_size", "save_interval", "log_interval", "loss_chunk_size",
                    "pad_multiple"):
            if getattr(t, key) < 1:
                raise UserError(f"train.{key} must be >= 1, got {getattr(t, key)}")
        if len(t.betas) != 2:
            raise UserError(f"train.betas must be two numbers, got {t.betas}")
        self._check_values()
        self._check_method()
        self.solo_configs()  # each adapter's settings checked now, before anything runs

    def solo_configs(self) -> dict[str, TrainConfig]:
        """Each of `adapters` as the config of a run that trains it alone (in out_dir/<name>): a run of several
        adapters gives each the tensors, metrics and checkpoints that run would."""
        solos: dict[str, TrainConfig] = {}
        reserved = reserved_names() if self.adapters else set()
        for i, entry in enumerate(self.adapters):
            where = f"adapters[{i}]" + (f" ({entry.name})" if entry.name else "")
            if not ADAPTER_NAME.fullmatch(entry.name):
                raise UserError(f"{where} needs a name of letters, digits, '_' and '-' (its folder under out_dir), "
                                f"got {entry.name!r}")
            if entry.name in reserved:
                raise UserError(f"{where}: the name {entry.name!r} is taken (by the model's modules or by out_dir's "
                                f"tensorboard folder); choose another")
            if entry.name in solos:
                raise UserError(f"two adapters are named {entry.name!r}; each needs its own name (its folder under "
                                f"out_dir)")
            try:
                solos[entry.name] = self._solo(entry)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
        if any("head" in solo.lora.targets for solo in solos.values()):
            raise UserError("the head target cannot be trained in adapters: (the head's loss runs a chunk of target "
                            "tokens at a time, across the adapters' rows); train that adapter alone, with lora:")
        if solos and self.strategy == "fsdp":
            raise UserError("strategy fsdp trains one adapter at a time; train several adapters (adapters:) with "
                            "strategy auto or ddp")
        return solos

    def _solo(self, entry: AdapterEntry) -> TrainConfig:
        lora = LoRAConfig(**{**self.lora.to_dict(),
                             **{k: getattr(entry, k) for k in LORA_FIELDS if getattr(entry, k) is not None}})
        train = dataclasses.replace(self.train, **{k: getattr(entry, k) for k in ("learning_rate", "lora_plus_ratio")
                                                   if getattr(entry, k) is not None})
        return dataclasses.replace(self, lora=lora, train=train, data_dir=entry.data_dir or self.data_dir,
                                   out_dir=str(Path(self.out_dir) / entry.name), adapters=[])

    def _check_values(self) -> None:
        """Values of the right type that would train wrongly (or crash deep inside) are refused here."""
        t, e = self.train, self.eval
        if self.accelerator not in ACCELERATORS:
            raise UserError(f"accelerator {self.accelerator!r} is not one of {', '.join(ACCELERATORS)}")
        for key in ("checkpoint_dir", "data_dir", "out_dir"):
            if not getattr(self, key).strip():  # "" is the current directory to Path
                raise UserError(f"{key} is empty; give it a directory")
        ranges = [  # (key, value, allowed, what it must be)
            ("devices", self.devices, self.devices >= 1, ">= 1"),
            ("num_nodes", self.num_nodes, self.num_nodes >= 1, ">= 1"),
            ("train.epochs", t.epochs, t.epochs is None or t.epochs >= 1, ">= 1 (or null: train.max_steps decides)"),
            ("train.max_steps", t.max_steps, t.max_steps is None or t.max_steps >= 1,
             ">= 1 (or null: train.epochs decides); 0 steps would save an untrained adapter"),
            ("train.learning_rate", t.learning_rate, math.isfinite(t.learning_rate) and t.learning_rate > 0, "> 0"),
            ("train.min_lr", t.min_lr, math.isfinite(t.min_lr) and t.min_lr >= 0, ">= 0"),
            ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
            ("train.weight_decay", t.weight_decay, math.isfinite(t.weight_decay) and t.weight_decay >= 0, ">= 0"),
            ("train.betas", t.betas, all(0 <= b < 1 for b in t.betas), "two numbers in [0, 1)"),
            ("train.lora_plus_ratio", t.lora_plus_ratio,
             t.lora_plus_ratio is None or (math.isfinite(t.lora_plus_ratio) and t.lora_plus_ratio > 0),
             "> 0 (or null: B learns at A's rate)"),
            ("train.grad_clip", t.grad_clip, t.grad_clip is None or (math.isfinite(t.grad_clip) and t.grad_clip > 0),
             "> 0 (or null to disable clipping)"),
            ("eval.interval", e.interval, e.interval >= 1, ">= 1"),
            ("eval.max_batches", e.max_batches, e.max_batches is None or e.max_batches >= 1, ">= 1 (or null: all)"),
            ("eval.max_new_tokens", e.max_new_tokens, e.max_new_tokens >= 1, ">= 1"),
        ]
        for key, value, allowed, must in ranges:
            if not allowed:
                raise UserError(f"{key} must be {must}, got {value}")

    def _check_method(self) -> None:
        from lit_lora.preference import COMPARE, LOSSES, METHODS

        p = self.preference
        if self.method not in METHODS:
            raise UserError(f"method {self.method!r} is not one of {', '.join(METHODS)} "
                            "(IPO is method dpo with preference.loss ipo)")
        if not (math.isfinite(p.beta) and p.beta > 0):
            raise UserError(f"preference.beta must be > 0, got {p.beta}")
        if not 0 <= p.label_smoothing < 0.5:
            raise UserError(f"preference.label_smoothing must be in [0, 0.5), got {p.label_smoothing}")
        if p.sft_weight is not None and not (math.isfinite(p.sft_weight) and p.sft_weight >= 0):
            raise UserError(f"preference.sft_weight must be >= 0 (or null: the method's own), got {p.sft_weight}")
        if p.compare not in COMPARE:
            raise UserError(f"preference.compare must be one of {', '.join(COMPARE)}, got {p.compare!r}")
        if p.loss not in LOSSES:
            raise UserError(f"preference.loss must be one of {', '.join(LOSSES)}, got {p.loss!r}")
        if p.loss != "sigmoid" and self.method != "dpo":
            raise UserError(f"preference.loss {p.loss} is a loss for method dpo, not {self.method}; set method: dpo")
        if not (math.isfinite(p.dpop_lambda) and p.dpop_lambda >= 0):
            raise UserError(f"preference.dpop_lambda must be >= 0, got {p.dpop_lambda}")
        if p.loss == "ipo" and p.label_smoothing:
            raise UserError("preference.label_smoothing is for the sigmoid loss; with preference.loss ipo set it to 0")
        if self.method == "sft":
            return
        if self.adapters:
            raise UserError(f"method {self.method} trains one adapter at a time; drop adapters: (or use method sft)")
        if self.train.packing:
            raise UserError(f"method {self.method} compares whole answers row by row, so it cannot pack several "
                            f"examples into a row; set train.packing: false")
        if self.init_lora is not None and not self.init_lora.strip():
            raise UserError("init_lora is empty; give an adapter directory or null")

    def wants_low_memory(self) -> bool:
        """train.low_memory, or (null) whether the run chose to save memory: quantize nf4 or checkpointing."""
        t = self.train
        return t.low_memory if t.low_memory is not None else self.quantize == "nf4" or t.gradient_checkpointing

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_hardware(config: TrainConfig) -> None:
    """The accelerator, devices and strategy against this machine, before Fabric starts (Fabric's own errors
    come as tracebacks from deep inside it), and the library quantize nf4 needs. Not part of loading a config: one
    can be written for another machine."""
    import torch

    if config.quantize == "nf4":
        torchao_nf4()  # installed, or the line saying how
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if config.accelerator in ("cuda", "gpu") and not gpus:
        raise UserError(f"accelerator {config.accelerator} needs a CUDA GPU and torch sees none on this machine "
                        f"(torch.cuda.is_available() is False); set accelerator: cpu (or auto)")
    if config.accelerator == "mps" and not torch.backends.mps.is_available():
        raise UserError("accelerator mps needs Apple's Metal backend, which is not available here; "
                        "set accelerator: cpu (or auto)")
    if config.accelerator in ("cuda", "gpu", "auto") and gpus and config.devices > gpus:
        raise UserError(f"devices {config.devices} is more than the {gpus} CUDA GPU(s) on this machine; "
                        f"set devices: {gpus} or fewer")
    if config.strategy == "fsdp" and config.devices * config.num_nodes == 1:
        raise UserError("strategy fsdp shards the model over processes, and devices 1 x num_nodes 1 is one process; "
                        "use strategy: auto, or set devices: 2 or more")
    if config.strategy == "fsdp" and config.precision == "16-mixed":
        raise UserError("strategy fsdp does not take precision 16-mixed (Fabric's ModelParallelStrategy refuses it); "
                        "use bf16-mixed, bf16-true or 32-true")


def load_config(path: Path | str | None, overrides: list[str] | None = None) -> TrainConfig:
    """The config in `path` (None: the defaults) with `--dotted.key value` overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise UserError(f"{path} must hold a mapping of config keys")
    for key, text in parse_overrides(overrides or []):
        value = override_value(key, text)
        section = data
        *parents, leaf = key.split(".")
        for name in parents:
            section = section.setdefault(name, {})
            if not isinstance(section, dict):
                raise UserError(f"cannot set --{key}: {name} is not a section")
        section[leaf] = value
    return build(TrainConfig, data, prefix="")


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """['--train.lr', '1e-4', '--lora.r=16'] -> [('train.lr', '1e-4'), ('lora.r', '16')]: keys and their text."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument {arg!r}; overrides look like --train.micro_batch_size 2")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise UserError(f"{arg} needs a value")
            key, text = arg[2:], args[i + 1]
            i += 2
        pairs.append((key, text))
    return pairs


def override_value(key: str, text: str) -> Any:
    """The value of `--key text`: a string field takes the text as written (YAML would read an out_dir 0123 as
    the octal number 83, a prompt `yes` as true); any other field, or an unknown key, the text read as YAML."""
    if field_type(key) is str:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def field_type(key: str, cls: type = TrainConfig) -> Any:
    """The annotation of dotted config key `key` (None when there is no such key)."""
    *sections, leaf = key.split(".")
    for name in sections:
        cls = typing.get_type_hints(cls).get(name) if is_dataclass(cls) else None
    return typing.get_type_hints(cls).get(leaf) if is_dataclass(cls) else None


def build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass `cls` from `data`, checking every key and value type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(f"{prefix}{key}", valid + all_keys(), n=1)
            if isinstance(value, dict):  # a section that does not exist: is its key in another one?
                close = [k for k in all_keys() if k.rsplit(".", 1)[-1] in value][:1] or close
            hint = f"; did you mean {close[0]}?" if close else f"; valid keys here: {', '.join(valid)}"
            raise UserError(f"unknown config key {prefix}{key}{hint}")
        kind = hints[key]
        if is_dataclass(kind):
            if not isinstance(value, dict):
                raise UserError(f"config key {prefix}{key} is a section; give it as {prefix}{key}.<key>")
            kwargs[key] = build(kind, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = check_type(value, kind, f"{prefix}{key}")
    return cls(**kwargs)


def all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def check_type(value: Any, kind: Any, key: str) -> Any:
    """`value` if it fits the annotation `kind` (ints are accepted for floats), else a UserError."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return check_type(value, inner[0], key)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key {key} must be a list, got {value!r}")
        return [check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if is_dataclass(kind):  # an entry of a list of sections (adapters)
        if not isinstance(value, dict):
            raise UserError(f"config key {key} must be a mapping of {', '.join(f.name for f in fields(kind))}")
        return build(kind, value, prefix=f"{key}.")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a path or prompt that YAML read as a number
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise UserError(f"config key {key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")


def config_to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
