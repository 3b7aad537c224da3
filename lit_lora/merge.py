"""merge-lora: fold adapters into a checkpoint, W' = W + s1 B1 A1 + s2 B2 A2 ..., streaming one tensor at a time.

The arithmetic is `lora.merged_weight`, the same that `adapter.merge_adapter` applies to a model in memory
for `generate`, so a checkpoint merged with one adapter and a base with that adapter merged at generation time
hold bit-identical weights. Several adapters are summed in fp32 and rounded to the output dtype once.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from lit_lora.adapter import load_checked_adapter, lora_pairs
from lit_lora.checkpoint import ShardWriter, finish_checkpoint, iter_weights, load_config
from lit_lora.device import parse_dtype, resolve_device
from lit_lora.errors import UserError
from lit_lora.fileio import atomic_dir, atomic_write_bytes
from lit_lora.lora import merged_weight
from lit_lora.model import Config
from lit_lora.prompts.chat_template import CHAT_TEMPLATE_FILE
from lit_lora.prompts.format import recorded_prompt
from lit_lora.quantize import decoding_quantize, dequantized, is_quantized_weight, quantize_weight


def merge_checkpoint(checkpoint_dir: Path, lora_paths: Path | list[Path], out: Path, dtype: str | None = None,
                     overwrite: bool = False, verify: bool = True, device: str = "auto") -> Path:
    """Write base + adapters (one path or several, merged in order) as a standalone checkpoint, one tensor at a
    time (peak memory ~ one shard).

    Each adapter is checked against the base, and those that record a prompt format must record the same one: the
    merged checkpoint records it. `dtype` (bf16, fp16, fp32) converts the output; by default every tensor keeps the
    base's dtype. `verify` checks the base's weights files and the adapters' against their recorded sha256 as they
    are read. `device` computes the products B A (auto: the first GPU, else the CPU); the files are written from
    the CPU.
    """
    lora_paths = [lora_paths] if isinstance(lora_paths, (str, Path)) else list(lora_paths)
    dtype, where = parse_dtype(dtype), resolve_device(device)
    config, prompt, tensors = merged_weights(checkpoint_dir, lora_paths, verify, dtype, where)
    out_dtype = None
    with atomic_dir(out, overwrite, inputs=[checkpoint_dir, *lora_paths]) as tmp:
        writer = ShardWriter(tmp)
        for name, tensor in tensors:
            out_dtype = out_dtype or tensor.dtype
            writer.add(name, tensor)
        source = " + ".join(map(str, [checkpoint_dir, *lora_paths]))
        finish_checkpoint(tmp, writer, config, out_dtype, source=f"merge-lora: {source}", tokenizer_src=checkpoint_dir,
                          extra=prompt)
        if prompt["chat_template"]:  # served anywhere (HF export included) with the template it was trained in
            atomic_write_bytes(tmp / CHAT_TEMPLATE_FILE, prompt["chat_template"]["source"].encode())
    return Path(out)


def merged_weights(checkpoint_dir: Path, lora_paths: list[Path], verify: bool = True, dtype: torch.dtype | None = None,
                   device: torch.device = torch.device("cpu"),
                   ) -> tuple[Config, dict[str, Any], Iterator[tuple[str, torch.Tensor]]]:
    """(the base's config, the prompt format the adapters share, and (name, tensor) of base + adapters one tensor at
    a time). Every adapter is checked against the base before the first tensor is read."""
    if not lora_paths:
        raise UserError("pass at least one --lora_path")
    config = load_config(checkpoint_dir)
    adapters = [load_checked_adapter(path, checkpoint_dir, config, verify=verify) for path in lora_paths]
    prompt = shared_prompt(lora_paths, [meta for *_, meta in adapters])
    quantize = decoding_quantize(None, [meta for *_, meta in adapters])
    if quantize != "none":
        prompt = {**prompt, "dequantized_from": quantize}  # checkpoint.json records it
        print(f"note: the adapters were trained over a {quantize} base (QLoRA): merged into that base dequantised, the "
              f"weights they were trained beside, not the original ones (4-bit weights would round the update away)",
              file=sys.stderr)
    dora = [path for path, (lora_config, *_) in zip(lora_paths, adapters) if lora_config.variant == "dora"]
    if dora and len(adapters) > 1:
        raise UserError(f"{dora[0]} is a DoRA adapter: it rescales the rows of the weights it merges into, so it "
                        f"cannot be summed with other adapters; merge it alone")
    updates = [(lora_pairs(state), lora_config.scaling) for lora_config, state, _ in adapters]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in iter_weights(checkpoint_dir, verify=verify):
            base = dequantized(quantize_weight(name, tensor.float(), quantize), tensor.dtype) \
                if quantize != "none" and is_quantized_weight(name) else tensor
            yield name, merged(base, [(*pairs.pop(name), s) for pairs, s in updates if name in pairs], dtype, device)
        missing = sorted(name for pairs, _ in updates for name in pairs)
        if missing:  # check_adapter_fits saw these layers in the config, so the checkpoint lacks them
            raise UserError(f"{checkpoint_dir} has no tensors {missing[:2]} that the adapters update; "
                            f"the checkpoint is incomplete, convert it again")

    return config, prompt, tensors()


def merged(weight: torch.Tensor, updates: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]],
           dtype: torch.dtype | None, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """W + s1 B1 A1 + s2 B2 A2 ... for updates (A, B, DoRA magnitude or None, s), summed in fp32 on `device` and
    rounded once, to `dtype` or W's own, back on W's device. One update on the CPU is exactly `merged_weight`, which
    is what generate merges."""
    if not updates:
        return weight.to(dtype) if dtype is not None and weight.is_floating_point() else weight
    total = weight.to(device).float()
    for A, B, m, scaling in updates:
        total = merged_weight(total, A, B, scaling, magnitude=m)  # fp32 in, fp32 out, on `device`
    return total.to(dtype or weight.dtype).to(weight.device)


def shared_prompt(lora_paths: list[Path], metas: list[dict[str, Any]]) -> dict[str, Any]:
    """The prompt format the adapters were trained in, for the merged checkpoint to record. Adapters that record
    none (PEFT's) take any; two that record different ones cannot be asked in one, so they are refused."""
    recorded = [(path, recorded_prompt(meta)) for path, meta in zip(lora_paths, metas)
                if any(recorded_prompt(meta).values())]
    if not recorded:
        return recorded_prompt({})
    (first, shared), *others = recorded
    for path, prompt in others:
        if prompt != shared:
            same_name = " (the same name, other text)" if describe(prompt) == describe(shared) else ""
            raise UserError(f"the adapters were trained in different prompt formats ({first}: {describe(shared)}; "
                            f"{path}: {describe(prompt)}{same_name}); merge only adapters trained in the same format")
    return shared


def describe(prompt: dict[str, Any]) -> str:
    """A prompt format in a few words: its template, and the system prompt if there is one."""
    template = f"chat template {prompt['chat_template'].get('name')}" if prompt["chat_template"] else \
        f"template {prompt['template']}"
    return template + (f", system prompt {prompt['system']!r:.60}" if prompt["system"] else "")
