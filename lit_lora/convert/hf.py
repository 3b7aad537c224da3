"""Import a Hugging Face LlamaForCausalLM directory into our checkpoint format, one tensor at a time.

Our module names are HF's without the leading "model.", so the conversion is a rename, an optional cast
and a re-shard. Source shards are read one at a time (safetensors lazily, legacy .bin files memory-mapped),
so peak memory stays near one source shard plus one output shard, never the whole model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from lit_lora.checkpoint import DEFAULT_SHARD_BYTES, ShardWriter, finish_checkpoint, stored_names
from lit_lora.device import parse_dtype
from lit_lora.errors import UserError
from lit_lora.fileio import atomic_dir, iter_safetensors
from lit_lora.model import Config


def to_hf_name(name: str) -> str:
    """Our names are LlamaForCausalLM's minus the decoder's `model.` prefix; the head sits outside it."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_name(hf_name: str) -> str:
    """The inverse of `to_hf_name`."""
    return hf_name.removeprefix("model.")


def convert_hf(
    src: Path, out: Path, dtype: str | None = None, overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Convert HF directory `src` into a checkpoint at `out`; dtype None keeps the source tensors' dtype."""
    src = Path(src)
    config = read_hf_config(src)
    sources = weight_sources(src)
    if not ((src / "tokenizer.json").is_file() or (src / "tokenizer.model").is_file()):
        raise UserError(f"no tokenizer in {src}: expected tokenizer.json or tokenizer.model next to config.json")
    target = parse_dtype(dtype)
    expected = stored_names(config)
    written: set[str] = set()
    saved_dtype = target
    with atomic_dir(out, overwrite, inputs=[src]) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for path in sources:
            for hf_name, tensor in iter_weights(path, target):
                name = from_hf_name(hf_name)
                if (name == "lm_head.weight" and config.tie_embeddings) or name.endswith("rotary_emb.inv_freq"):
                    continue  # a tied head is the embedding; inv_freq buffers are recomputed from the config
                if name not in expected:
                    raise UserError(f"unexpected tensor {hf_name!r} in {path.name}: it does not belong to the "
                                    f"LLaMA model that {src / 'config.json'} describes")
                if name == "embed_tokens.weight":
                    saved_dtype = saved_dtype or tensor.dtype
                writer.add(name, tensor)
                written.add(name)
        missing = sorted(expected - written)
        if missing:
            raise UserError(f"{src} lacks {len(missing)} tensors the config needs (e.g. {missing[:3]}); "
                            f"is a weights shard missing?")
        finish_checkpoint(tmp, writer, config, saved_dtype, source=f"hf: {src.resolve().name}", tokenizer_src=src)
    return Path(out)


def read_hf_config(src: Path) -> Config:
    if not src.is_dir():
        raise UserError(f"source directory {src} does not exist")
    path = src / "config.json"
    if not path.is_file():
        raise UserError(f"{src} has no config.json; point convert-hf at a Hugging Face model directory")
    try:
        hf = json.loads(path.read_text())
        return Config.from_hf_config(hf, name=src.resolve().name)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    except KeyError as e:
        raise UserError(f"{path} lacks {e}, which a LLaMA config needs") from None


def weight_sources(src: Path) -> list[Path]:
    """The weights files of an HF directory: safetensors preferred, legacy pytorch_model*.bin otherwise."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = src / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            absent = [f for f in files if not (src / f).is_file()]
            if absent:
                raise UserError(f"{index} lists shards that are not there: {absent[:3]}; download them first")
            return [src / f for f in files]
        files = sorted(src.glob(pattern))
        if files:
            return files
    raise UserError(f"no weights in {src}: expected *.safetensors or pytorch_model*.bin files")


def iter_weights(path: Path, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        yield from iter_safetensors(path, dtype)
        return
    # Legacy pickles: weights_only refuses arbitrary objects; mmap keeps the shard on disk, not in memory.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except OSError:  # the file system's (permissions, I/O), not a damaged file
        raise
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError/... for bad files
        raise UserError(f"cannot read {path}: {e} (the file is truncated or not a PyTorch state dict)") from None
    for name in list(state):
        tensor = state.pop(name)
        yield name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
