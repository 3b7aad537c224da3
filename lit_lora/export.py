"""Export to the Hugging Face ecosystem: a whole model as a transformers directory, an adapter as PEFT's.

    export_hf:    config.json, model.safetensors (HF names: `model.` prefix, `lm_head.weight` when untied),
                  tokenizer files            -> transformers.AutoModelForCausalLM.from_pretrained(DIR)
    export_peft:  adapter_config.json, adapter_model.safetensors
                                             -> peft.PeftModel.from_pretrained(hf_model, DIR)
"""
from __future__ import annotations

from pathlib import Path

from lit_lora.adapter import load_adapter
from lit_lora.checkpoint import ShardWriter, copy_tokenizer_files, iter_weights, load_config, load_info
from lit_lora.convert.hf import to_hf_name
from lit_lora.convert.peft import write_peft_adapter
from lit_lora.device import torch_dtype_name
from lit_lora.fileio import atomic_dir, write_json
from lit_lora.tokenizer import Tokenizer


def export_hf(checkpoint_dir: Path, out: Path, overwrite: bool = False, verify: bool = True) -> Path:
    """Write a checkpoint as a Hugging Face model directory, one tensor at a time; `verify` checks the weights
    files against the sha256 in checkpoint.json as they are read."""
    config = load_config(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    with atomic_dir(out, overwrite, inputs=[checkpoint_dir]) as tmp:
        writer = ShardWriter(tmp)  # its file names (model.safetensors or shards + index) are HF's too
        for name, tensor in iter_weights(checkpoint_dir, verify=verify):
            writer.add(to_hf_name(name), tensor)
        writer.close()
        dtype = load_info(checkpoint_dir).get("dtype") or "fp32"
        hf_config = {**config.to_hf_config(), "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                     "pad_token_id": tokenizer.pad_id, "torch_dtype": torch_dtype_name(dtype)}
        write_json(tmp / "config.json", hf_config)
        copy_tokenizer_files(checkpoint_dir, tmp)
    return Path(out)


def export_peft(lora_path: Path, out: Path, base_model_name_or_path: str | None = None,
                overwrite: bool = False, verify: bool = True) -> Path:
    """Write an adapter (ours or PEFT's) as a PEFT LoRA adapter directory."""
    lora_config, state, meta = load_adapter(lora_path, verify=verify)
    with atomic_dir(out, overwrite, inputs=[lora_path]) as tmp:
        write_peft_adapter(tmp, lora_config, state, base_model_name_or_path or meta.get("base_checkpoint"))
    return Path(out)
