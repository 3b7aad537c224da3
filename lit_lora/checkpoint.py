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

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from safetensors.torch import save_file

from lit_lora.errors import UserError
from lit_lora.model import LLaMA, Config

MODEL_CONFIG = "model_config.yaml"
CHECKPOINT_INFO = "checkpoint.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 2 * 1024**3  # a shard is held in memory (and copied once by save_file) while written

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# ---------------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out`, on any error it is removed."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
                      tokenizer_src: Path | None = None) -> dict:
    """Complete a checkpoint being built: close the weights, copy the tokenizer files of `tokenizer_src`
    (callers that build their own tokenizer files pass None), write model_config.yaml and checkpoint.json."""
    directory = Path(directory)
    weight_files = writer.close()
    if tokenizer_src is not None:
        copy_tokenizer_files(tokenizer_src, directory)
    write_yaml(directory / MODEL_CONFIG, config.to_dict())
    hashes = {f: sha256_file(directory / f) for f in weight_files}
    content_hash = hashlib.sha256("".join(f"{f}:{h}\n" for f, h in sorted(hashes.items())).encode()).hexdigest()
    info = {"format": "lit-lora", "format_version": FORMAT_VERSION, "dtype": dtype_name(dtype), "source": source,
            "weights_sha256": hashes, "content_hash": content_hash}
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
    state = {k: v.detach() for k, v in model.state_dict().items() if "lora_" not in k}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


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
    return json.loads(path.read_text()) if path.is_file() else {}


def weight_files(checkpoint_dir: Path) -> list[Path]:
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / WEIGHTS).is_file():
        return [checkpoint_dir / WEIGHTS]
    if (checkpoint_dir / WEIGHTS_INDEX).is_file():
        index = json.loads((checkpoint_dir / WEIGHTS_INDEX).read_text())
        return [checkpoint_dir / f for f in sorted(set(index["weight_map"].values()))]
    raise UserError(f"{checkpoint_dir} has no {WEIGHTS}; the checkpoint is incomplete, convert it again")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def iter_safetensors(path: Path, dtype: torch.dtype | None = None, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from one safetensors file, one tensor at a time; a damaged file is a UserError.

    Reads with plain file reads into fresh tensors instead of memory-mapping, so loading a checkpoint in
    another dtype holds one source tensor at a time, not the whole mapped file, in resident memory.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
            start = 8 + n
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                if start + end > size:
                    raise ValueError(f"tensor {name} runs past the end of the file")
                t = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
                f.seek(start + begin)
                buffer = t.reshape(-1).view(torch.uint8).numpy()
                if f.readinto(memoryview(buffer)) != end - begin or buffer.nbytes != end - begin:
                    raise ValueError(f"tensor {name} is incomplete")
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                yield name, t.to(device)
    except (ValueError, KeyError, TypeError, OSError) as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f"cannot read {path}: {e} (the file is truncated or not safetensors)") from None


def load_model(
    checkpoint_dir: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> LLaMA:
    """Build the model on the meta device and fill it from the checkpoint: no random init, no second copy."""
    config = load_config(checkpoint_dir)
    with torch.device("meta"):
        model = LLaMA(config)
    state = {}
    for path in weight_files(checkpoint_dir):
        state.update(iter_safetensors(path, dtype, str(device)))
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"checkpoint {checkpoint_dir} does not match its model_config.yaml: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model


# ---------------------------------------------------------------------------------------------- adapters
ADAPTER_WEIGHTS = "lora.safetensors"
ADAPTER_CONFIG = "adapter_config.yaml"


def write_adapter_files(directory: Path, model: LLaMA, base_checkpoint_dir: Path | None, template: str | None,
                        dtype: torch.dtype | None = None) -> None:
    """Write lora.safetensors (LoRA tensors only) and adapter_config.yaml into an existing directory.

    Callers wrap this in `atomic_dir` together with whatever else belongs in the same directory.
    """
    from lit_lora.lora import lora_state_dict

    config = model.lora_config
    state = {k: (v.detach().to(dtype) if dtype else v.detach()).contiguous() for k, v in lora_state_dict(model).items()}
    save_file(state, str(Path(directory) / ADAPTER_WEIGHTS), metadata={"format": "pt", "lit_lora": "adapter"})
    base_info = load_info(base_checkpoint_dir) if base_checkpoint_dir else {}
    meta = {
        **config.to_dict(),
        "scaling": config.scaling,
        "base_checkpoint": str(base_checkpoint_dir) if base_checkpoint_dir else None,
        "base_content_hash": base_info.get("content_hash"),
        "base_model": model.config.to_dict(),
        "template": template,
    }
    write_yaml(Path(directory) / ADAPTER_CONFIG, meta)


def load_adapter(path: Path) -> tuple["LoRAConfig", dict[str, torch.Tensor], dict[str, Any]]:
    """(LoRA config, LoRA tensors, everything adapter_config.yaml records) from an adapter dir or its file."""
    from lit_lora.lora import LoRAConfig

    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights = path if path.is_file() else directory / ADAPTER_WEIGHTS
    if not path.exists():
        raise UserError(f"adapter {path} does not exist")
    from lit_lora.convert.peft import is_peft_adapter, load_peft_adapter

    if not (directory / ADAPTER_CONFIG).is_file() and is_peft_adapter(directory):
        return load_peft_adapter(directory)  # an adapter trained elsewhere with Hugging Face PEFT
    if not (directory / ADAPTER_CONFIG).is_file() or not weights.is_file():
        raise UserError(f"{path} is not a LoRA adapter: expected {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}")
    try:
        meta = yaml.safe_load((directory / ADAPTER_CONFIG).read_text()) or {}
        config = LoRAConfig(r=meta["r"], alpha=meta["alpha"], dropout=meta.get("dropout", 0.0),
                            targets=list(meta["targets"]), use_rslora=meta.get("use_rslora", False))
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise UserError(f"{directory / ADAPTER_CONFIG} is not a valid adapter config: {e!r}") from None
    state = dict(iter_safetensors(weights))
    return config, state, meta


# Fields that decide whether adapter tensors fit a base (name and context length do not).
_ARCHITECTURE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim")


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
