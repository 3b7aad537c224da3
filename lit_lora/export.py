"""Export to the Hugging Face ecosystem and to llama.cpp / Ollama.

    export_hf:    config.json, model.safetensors (HF names: `model.` prefix, `lm_head.weight` when untied),
                  tokenizer files            -> transformers.AutoModelForCausalLM.from_pretrained(DIR)
    export_peft:  adapter_config.json, adapter_model.safetensors
                                             -> peft.PeftModel.from_pretrained(hf_model, DIR)
    export_gguf:  a LLaMA GGUF (base, or base + adapter merged), or the adapter alone as a llama.cpp LoRA GGUF,
                  and an Ollama Modelfile beside it
                                             -> llama-cli -m model.gguf [--lora adapter.gguf]; ollama create
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lit_lora.adapter import load_adapter, lora_pairs
from lit_lora.checkpoint import (ShardWriter, copy_tokenizer_files, iter_weights, load_config, load_info,
                                 weight_shapes)
from lit_lora.convert.gguf import (EXPORT_TYPES, add_model_metadata, add_tokenizer_metadata, check_exportable,
                                   check_tokenizer, gguf_name, rope_freqs, to_gguf_layout, write_gguf)
from lit_lora.convert.hf import config_to_hf, to_hf_tensors
from lit_lora.convert.ollama import modelfile
from lit_lora.convert.peft import write_peft_adapter
from lit_lora.device import resolve_device, torch_dtype_name
from lit_lora.errors import UserError
from lit_lora.fileio import atomic_dir, atomic_file, atomic_write_bytes, check_file_destination, write_json
from lit_lora.merge import merged_weights
from lit_lora.model import Config
from lit_lora.prompts.builtin import BUILTINS
from lit_lora.prompts.chat_template import ChatTemplate
from lit_lora.prompts.format import prompt_format, recorded_prompt
from lit_lora.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"
MODELFILE_SUFFIX = ".Modelfile"


def export_hf(checkpoint_dir: Path, out: Path, overwrite: bool = False, verify: bool = True) -> Path:
    """Write a checkpoint as a Hugging Face model directory, one tensor at a time; `verify` checks the weights
    files against the sha256 in checkpoint.json as they are read."""
    config = load_config(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    with atomic_dir(out, overwrite, inputs=[checkpoint_dir]) as tmp:
        writer = ShardWriter(tmp)  # its file names (model.safetensors or shards + index) are HF's too
        for hf_name, tensor in to_hf_tensors(config, iter_weights(checkpoint_dir, verify=verify)):
            writer.add(hf_name, tensor)
        writer.close()
        dtype = load_info(checkpoint_dir).get("dtype") or "fp32"
        hf_config = {**config_to_hf(config), "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                     "pad_token_id": tokenizer.pad_id, "torch_dtype": torch_dtype_name(dtype)}
        write_json(tmp / "config.json", hf_config)
        copy_tokenizer_files(checkpoint_dir, tmp)
    return Path(out)


def export_peft(lora_path: Path, out: Path, base_model_name_or_path: str | None = None,
                overwrite: bool = False, verify: bool = True) -> Path:
    """Write an adapter (ours or PEFT's) as a PEFT LoRA adapter directory."""
    lora_config, state, meta = load_adapter(lora_path, verify=verify)
    with atomic_dir(out, overwrite, inputs=[lora_path]) as tmp:
        base = Config.from_dict(meta["base_model"]) if meta.get("base_model") else None
        write_peft_adapter(tmp, lora_config, state, base_model_name_or_path or meta.get("base_checkpoint"), base)
    return Path(out)


# ---------------------------------------------------------------------------------------------- GGUF
def export_gguf(out: Path, checkpoint_dir: Path | None = None, lora_path: Path | None = None, type: str = "f16",
                overwrite: bool = False, verify: bool = True, write_modelfile: bool = True,
                device: str = "auto") -> Path:
    """A checkpoint (with `lora_path`: base + adapter merged, no merged checkpoint written) as a LLaMA GGUF, or
    with `lora_path` alone the adapter as a llama.cpp LoRA adapter GGUF; `NAME.Modelfile` for Ollama beside it
    (`modelfile_path`). Tensors stream one at a time; both files are written under temporary names and renamed
    when complete. `device` computes the merge (auto: the first GPU, else the CPU)."""
    if type not in EXPORT_TYPES:
        raise UserError(f"unknown --type {type!r}; use one of {', '.join(EXPORT_TYPES)}")
    if checkpoint_dir is None and lora_path is None:
        raise UserError("pass --checkpoint_dir (a model, merged with --lora_path if given) or --lora_path alone "
                        "(the adapter)")
    out = Path(out)
    if out.suffix == MODELFILE_SUFFIX:
        raise UserError(f"--out {out} is where its Modelfile would go; name the GGUF file, e.g. {out.stem}.gguf")
    for path in (out, modelfile_path(out)) if write_modelfile else (out,):
        check_file_destination(path, [checkpoint_dir, lora_path])
        if path.exists() and not overwrite:
            raise UserError(f"{path} exists; pass --overwrite to replace it, or choose another --out")
    if out.exists() and _magic(out) != GGUF_MAGIC:
        raise UserError(f"{out} exists and is not a GGUF file; lit-lora replaces only a GGUF, choose another --out")
    where = resolve_device(device)
    export = _gguf_model if checkpoint_dir is not None else _gguf_adapter
    with atomic_file(out) as tmp:
        model_text = export(tmp, out, checkpoint_dir, lora_path, type, verify, where)
    if write_modelfile:
        atomic_write_bytes(modelfile_path(out), model_text.encode())
    return out


def modelfile_path(out: Path) -> Path:
    return Path(out).with_suffix(MODELFILE_SUFFIX)


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _gguf_model(tmp: Path, out: Path, checkpoint_dir: Path, lora_path: Path | None, type: str, verify: bool,
                device) -> str:
    if lora_path is not None:
        config, prompt, tensors = merged_weights(checkpoint_dir, [lora_path], verify, device=device)
    else:
        config, prompt = load_config(checkpoint_dir), recorded_prompt(load_info(checkpoint_dir))
        tensors = iter_weights(checkpoint_dir, verify=verify)
    check_exportable(config)
    tokenizer = Tokenizer(checkpoint_dir)
    template, stops = gguf_chat_format(prompt, tokenizer)
    requested, file_type = EXPORT_TYPES[type]
    freqs = rope_freqs(config)
    infos = [(gguf_name(name, config), shape) for name, shape in weight_shapes(checkpoint_dir)]
    infos += [("rope_freqs.weight", freqs.shape)] if freqs is not None else []

    def arrays() -> Iterator[np.ndarray]:
        for name, tensor in tensors:
            yield to_gguf_layout(name, tensor, config)
        if freqs is not None:
            yield freqs

    def metadata(writer) -> None:
        add_model_metadata(writer, config, config.name or Path(checkpoint_dir).name, file_type)
        add_tokenizer_metadata(writer, tokenizer, config.vocab_size, template)

    write_gguf(tmp, config, metadata, infos, arrays(), requested)
    return modelfile(f"./{out.name}", None, template, stops, prompt.get("system"))


def _gguf_adapter(tmp: Path, out: Path, checkpoint_dir: None, lora_path: Path, type: str, verify: bool, device) -> str:
    lora_config, state, meta = load_adapter(lora_path, verify=verify)
    if lora_config.variant == "dora":  # llama.cpp's adapters are W + s B A only
        raise UserError(f"{lora_path} is a DoRA adapter, which a GGUF adapter cannot hold (llama.cpp adds s B A and "
                        f"has no magnitudes); export the merged model: export-gguf --checkpoint_dir BASE --lora_path "
                        f"{lora_path}")
    config = adapter_base_config(lora_path, meta)  # LoRA on a tied head cannot exist: apply_lora refuses it
    pairs = sorted(lora_pairs(state).items())
    infos, arrays = [], []
    for name, (A, B, _) in pairs:
        base = gguf_name(name, config)
        infos += [(f"{base}.lora_a", tuple(A.shape)), (f"{base}.lora_b", tuple(B.shape))]
        arrays += [(f"{name[:-len('weight')]}lora_A", A), (f"{name[:-len('weight')]}lora_B", B)]

    def metadata(writer) -> None:
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        # llama.cpp scales by alpha / rank, the rank read from the tensors: this alpha reproduces our scaling
        # (alpha / r, or alpha / sqrt(r) for rsLoRA, whose flag llama.cpp never reads).
        writer.add_float32("adapter.lora.alpha", lora_config.scaling * lora_config.r)

    check_exportable(config)
    write_gguf(tmp, config, metadata, infos, (to_gguf_layout(n, t, config) for n, t in arrays), EXPORT_TYPES[type][0])
    base = meta.get("base_checkpoint")  # its tokenizer finds the template's end markers, where it is still there
    tokenizer = Tokenizer(base) if base and Path(base).is_dir() else None
    prompt = recorded_prompt(meta)
    template, stops = gguf_chat_format(prompt, tokenizer)
    return "# FROM: the base model's GGUF, e.g. export-gguf --checkpoint_dir BASE --out base.gguf\n" + \
        modelfile("./base.gguf", f"./{out.name}", template, stops, prompt["system"])


def gguf_chat_format(prompt: dict[str, Any], tokenizer: Tokenizer | None) -> tuple[str | None, tuple[str, ...]]:
    """The chat template a GGUF carries, and where its answers stop: the adapter's recorded template (a built-in
    instruction template's chat form), else the checkpoint's own. Without a tokenizer, only a built-in's stops."""
    builtin = BUILTINS.get(prompt.get("template"))
    if prompt.get("chat_template"):
        template = prompt["chat_template"]["source"]
    elif builtin is not None:
        template = builtin.chat_source
    elif tokenizer is not None and tokenizer.backend == "huggingface":
        template = ChatTemplate.source_of(tokenizer)
    else:
        template = tokenizer.chat_template if tokenizer is not None else None
    if tokenizer is None or template is None:
        return template, builtin.stop_strings if builtin else ()
    return template, prompt_format("auto", prompt, tokenizer).stop_strings


def adapter_base_config(path: Path, meta: dict[str, Any]) -> Config:
    """The base config an adapter records, which its GGUF needs (llama.cpp's q/k row order is per head)."""
    if not meta.get("base_model"):
        raise UserError(f"{path} records no base model config (a PEFT adapter?), which a GGUF adapter needs; "
                        f"export it merged: export-gguf --checkpoint_dir BASE --lora_path {path} --out ...")
    return Config.from_dict(meta["base_model"])


def gguf_problem(checkpoint_dir: Path, adapters: list[tuple[Path, dict[str, Any]]]) -> str | None:
    """Why the checkpoint or an adapter ((path, what its config records), as loaded already) cannot go to
    llama.cpp, checked before anything loads; None when nothing stands in the way."""
    try:
        config, tokenizer = load_config(checkpoint_dir), Tokenizer(checkpoint_dir)
        check_exportable(config)
        check_tokenizer(tokenizer, config.vocab_size)
        for path, meta in adapters:
            adapter_base_config(path, meta)
    except UserError as e:
        return str(e)
    return None
