"""Our checkpoint directory: reading and writing it, atomically, with content hashes.

    checkpoints/NAME/
      model_config.yaml         the model's Config
      model.safetensors         weights (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
      checkpoint.json           format version, dtype, source, sha256 of every weights file, content hash
      tokenizer.json | tokenizer.model, tokenizer_config.json, generation_config.json   (HF's own files)

Weights are only ever read from safetensors, or from legacy pickles with torch.load(weights_only=True).
Every directory is written under a temporary name and renamed into place when complete, so an interrupted
command never leaves something that looks like a finished checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import yaml
from safetensors.torch import save_file

from lit_lora.device import dtype_name
from lit_lora.errors import UserError
from lit_lora.fileio import atomic_dir, iter_safetensors, read_safetensors_header, sha256_file, write_json, write_yaml
from lit_lora.model import LLaMA, Config
from lit_lora.prompts.chat_template import CHAT_TEMPLATE_FILE
from lit_lora.quantize import quantize_weight, use_nf4_linears

MODEL_CONFIG = "model_config.yaml"
CHECKPOINT_INFO = "checkpoint.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", CHAT_TEMPLATE_FILE)
CHECKPOINT_FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 2 * 1024**3  # a shard is held in memory (and copied once by save_file) while written
_SKIP_VERIFY = "--no-verify, or verify: false in a training config, skips this check"


def stored_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of `config` holds, by name, with their shapes: the model's parameters, a tied head
    stored once (as the embedding). Imports check against this, loading fills the model from it."""
    with torch.device("meta"):
        state = LLaMA(config).state_dict()
    return {name: tuple(t.shape) for name, t in state.items()
            if not (config.tie_embeddings and name == "lm_head.weight")}


def check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...], config: str, fix: str) -> None:
    """Refuse tensor `name` unless its `shape` is the one its model config (`config`: where that is) makes it: a
    size there that does not fit the weights (a typo, a hand edit) would otherwise fail later, inside torch."""
    if tuple(shape) != expected:
        raise UserError(f"tensor {name} is {list(shape)}, but {config} makes it {list(expected)}; {fix}")


# ---------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes tensors into safetensors shards as they come, so a conversion holds at most one shard in memory.

    One shard becomes `model.safetensors`; more become `model-0000i-of-0000n.safetensors` plus an index.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.directory, self.max_shard_bytes = Path(directory), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in names for _, names in self.shards):
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        file = f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(self.directory / file), metadata={"format": "pt"})
        self.shards.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is left and give the shards their final names; returns the weights file names."""
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            (self.directory / self.shards[0][0]).rename(self.directory / WEIGHTS)
            return [WEIGHTS]
        n = len(self.shards)
        weight_map, files = {}, []
        for i, (tmp_name, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.directory / tmp_name).rename(self.directory / final)
            weight_map.update({name: final for name in names})
            files.append(final)
        write_json(self.directory / WEIGHTS_INDEX, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return files


def finish_checkpoint(directory: Path, writer: ShardWriter, config: Config, dtype: torch.dtype, source: str,
                      tokenizer_src: Path | None = None, extra: dict[str, Any] | None = None) -> dict:
    """Complete a checkpoint being built: close the weights, copy the tokenizer files of `tokenizer_src`
    (callers that build their own tokenizer files pass None), write model_config.yaml and checkpoint.json
    (with `extra` keys: a merged checkpoint records the prompt format its adapter was trained in)."""
    directory = Path(directory)
    weight_files = writer.close()
    if tokenizer_src is not None:
        copy_tokenizer_files(tokenizer_src, directory)
    write_yaml(directory / MODEL_CONFIG, config.to_dict())
    hashes = {f: sha256_file(directory / f) for f in weight_files}
    content_hash = hashlib.sha256("".join(f"{f}:{h}\n" for f, h in sorted(hashes.items())).encode()).hexdigest()
    info = {"format": "lit-lora", "format_version": CHECKPOINT_FORMAT_VERSION, "dtype": dtype_name(dtype), "source": source,
            "weights_sha256": hashes, "content_hash": content_hash, **(extra or {})}
    write_json(directory / CHECKPOINT_INFO, info)
    return info


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def save_checkpoint(
    out: Path, model: LLaMA, tokenizer_src: Path, source: str, dtype: torch.dtype | None = None,
    overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a whole model (LoRA already merged or absent) and the tokenizer files of `tokenizer_src`."""
    with atomic_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, tensor in model_state_for_saving(model).items():
            writer.add(name, tensor if dtype is None else tensor.to(dtype))
        finish_checkpoint(tmp, writer, model.config, dtype or model.embed_tokens.weight.dtype, source, tokenizer_src)
    return Path(out)


def model_state_for_saving(model: LLaMA) -> dict[str, torch.Tensor]:
    """The base weights: LoRA tensors left out, and a tied head stored once (as the embedding)."""
    names = stored_shapes(model.config)
    return {k: v.detach() for k, v in model.state_dict().items() if k in names}


# ---------------------------------------------------------------------------------------------- reading
def check_checkpoint_dir(checkpoint_dir: Path) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"checkpoint directory {checkpoint_dir} does not exist; create one with `convert-hf`, "
                        f"`convert-gguf` or `download`")
    if not (checkpoint_dir / MODEL_CONFIG).is_file():
        raise UserError(f"{checkpoint_dir} is not a lit-lora checkpoint (no {MODEL_CONFIG}); "
                        f"convert a Hugging Face directory with `convert-hf` first")
    return checkpoint_dir


def load_config(checkpoint_dir: Path) -> Config:
    path = check_checkpoint_dir(checkpoint_dir) / MODEL_CONFIG
    try:
        return Config.from_dict(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, TypeError) as e:
        raise UserError(f"{path} is not a valid model config: {e}") from None


def load_info(checkpoint_dir: Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / CHECKPOINT_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError; an OSError is no damage: the CLI says it
        raise UserError(f"{path} is damaged ({e}); convert or download the checkpoint again") from None
    if not isinstance(info, dict):
        raise UserError(f"{path} is damaged (not a JSON object); convert or download the checkpoint again")
    return info


def weight_files(checkpoint_dir: Path) -> list[Path]:
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / WEIGHTS).is_file():
        return [checkpoint_dir / WEIGHTS]
    if (checkpoint_dir / WEIGHTS_INDEX).is_file():
        index = json.loads((checkpoint_dir / WEIGHTS_INDEX).read_text())
        return [checkpoint_dir / f for f in sorted(set(index["weight_map"].values()))]
    raise UserError(f"{checkpoint_dir} has no {WEIGHTS}; the checkpoint is incomplete, convert it again")


def weight_shapes(checkpoint_dir: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, in the order iter_weights yields them, from the headers alone."""
    shapes = []
    for path in weight_files(checkpoint_dir):
        try:
            with open(path, "rb") as f:
                header, _ = read_safetensors_header(f, path)
        except ValueError as e:
            raise UserError(f"{path} is damaged ({e}); convert the checkpoint again") from None
        shapes += [(name, tuple(info["shape"])) for name, info in header.items()]
    return shapes


def verify_weights(checkpoint_dir: Path) -> None:
    """Check every weights file against checkpoint.json's sha256 without loading it (one hashing pass): for
    readers of something made from the checkpoint, such as the llama.cpp engine's cached GGUF."""
    hashes = load_info(checkpoint_dir).get("weights_sha256") or {}
    for path in weight_files(checkpoint_dir) if hashes else ():
        if hashes.get(path.name) != sha256_file(path):
            raise UserError(f"{path} is damaged: its sha256 is not the one recorded when it was written; convert or "
                            f"download the checkpoint again ({_SKIP_VERIFY})")


def iter_weights(checkpoint_dir: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 verify: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over every weights file, one tensor at a time. With `verify`, each file is hashed while it
    is read and checked against the sha256 that checkpoint.json records (a damaged file is a UserError naming
    it, raised before its last tensor comes out); files of a checkpoint that records no hashes are not checked.
    Each tensor's shape is checked against model_config.yaml (`check_shape`)."""
    hashes = (load_info(checkpoint_dir).get("weights_sha256") or {}) if verify else {}
    expected, config = stored_shapes(load_config(checkpoint_dir)), str(Path(checkpoint_dir) / MODEL_CONFIG)
    for path in weight_files(checkpoint_dir):
        if hashes and path.name not in hashes:
            raise UserError(f"{path} is not among the weights files {CHECKPOINT_INFO} records: the checkpoint was "
                            f"changed after it was written; convert it again ({_SKIP_VERIFY})")
        for name, tensor in iter_safetensors(path, dtype, str(device), sha256=hashes.get(path.name),
                                             hint=f"; convert or download the checkpoint again ({_SKIP_VERIFY})"):
            if name in expected:
                check_shape(name, tensor.shape, expected[name], config, "convert the checkpoint again (or restore "
                            "that file)")
            yield name, tensor


def load_model(
    checkpoint_dir: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", verify: bool = True,
    quantize: str = "none",
) -> LLaMA:
    """Build the model on the meta device and fill it from the checkpoint: no random init, no second copy.

    `verify` checks each weights file against the sha256 in checkpoint.json as it is read (`iter_weights`).
    `quantize` nf4 quantises the blocks' linear weights as each is read, so the full-precision model is never
    held (quantize.py)."""
    return model_from_tensors(load_config(checkpoint_dir), iter_weights(checkpoint_dir, dtype, device, verify),
                              quantize, f"checkpoint {checkpoint_dir} does not match its model_config.yaml")


def model_from_tensors(config: Config, tensors: Iterable[tuple[str, torch.Tensor]], quantize: str = "none",
                       mismatch: str = "the tensors do not match the model config") -> LLaMA:
    """The model of `config`, built on the meta device and filled from (name, tensor) pairs as they come, each
    quantised as `quantize` says before the next is read (load_model, and the benchmarks' random models)."""
    with torch.device("meta"):
        model = LLaMA(config)
    state = {name: quantize_weight(name, tensor, quantize) for name, tensor in tensors}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = stored_shapes(config)
    missing, unexpected = sorted(expected.keys() - set(state)), sorted(set(state) - expected.keys())
    if missing or unexpected:
        raise UserError(f"{mismatch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return use_nf4_linears(model) if quantize == "nf4" else model
