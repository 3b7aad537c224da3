"""merge-lora: fold an adapter into a checkpoint, W' = W + s * B A, streaming one tensor at a time.

The arithmetic is `lora.merged_weight`, the same that `adapter.merge_adapter` applies to a model in memory
for `generate`, so a merged checkpoint and a base with the adapter merged at generation time hold
bit-identical weights.
"""
from __future__ import annotations

from pathlib import Path

from lit_lora.adapter import load_checked_adapter, lora_pairs
from lit_lora.checkpoint import ShardWriter, finish_checkpoint, iter_weights, load_config
from lit_lora.device import parse_dtype
from lit_lora.errors import UserError
from lit_lora.fileio import atomic_dir, atomic_write_bytes
from lit_lora.lora import merged_weight
from lit_lora.prompts.chat_template import CHAT_TEMPLATE_FILE
from lit_lora.prompts.format import recorded_prompt


def merge_checkpoint(checkpoint_dir: Path, lora_path: Path, out: Path, dtype: str | None = None,
                     overwrite: bool = False, verify: bool = True) -> Path:
    """Write base + adapter as a standalone checkpoint, one tensor at a time (peak memory ~ one shard).

    `dtype` (bf16, fp16, fp32) converts the output; by default every tensor keeps the base's dtype. `verify`
    checks the base's weights files and the adapter's against their recorded sha256 as they are read.
    """
    dtype = parse_dtype(dtype)
    config = load_config(checkpoint_dir)
    lora_config, state, adapter_meta = load_checked_adapter(lora_path, checkpoint_dir, config, verify=verify)
    prompt = recorded_prompt(adapter_meta)
    pairs = lora_pairs(state)
    out_dtype = None
    with atomic_dir(out, overwrite, inputs=[checkpoint_dir, lora_path]) as tmp:
        writer = ShardWriter(tmp)
        for name, tensor in iter_weights(checkpoint_dir, verify=verify):
            if name in pairs:
                tensor = merged_weight(tensor, *pairs.pop(name), lora_config.scaling, dtype)
            elif dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            out_dtype = out_dtype or tensor.dtype
            writer.add(name, tensor)
        if pairs:  # check_adapter_fits saw these layers in the config, so the checkpoint lacks them
            raise UserError(f"{checkpoint_dir} has no tensors {sorted(pairs)[:2]} that the adapter updates; "
                            f"the checkpoint is incomplete, convert it again")
        finish_checkpoint(tmp, writer, config, out_dtype, source=f"merge-lora: {checkpoint_dir} + {lora_path}",
                          tokenizer_src=checkpoint_dir, extra=prompt)
        if prompt["chat_template"]:  # served anywhere (HF export included) with the template it was trained in
            atomic_write_bytes(tmp / CHAT_TEMPLATE_FILE, prompt["chat_template"]["source"].encode())
    return Path(out)
