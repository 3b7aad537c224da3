"""The `lit-lora` program: typer commands that parse arguments, call the library and print.

Every subcommand is also installed as its own console script (`convert-hf`, `finetune-lora`, ...).
A `UserError` from the library becomes one line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import click
import typer

from lit_lora.errors import UserError

app = typer.Typer(
    help="LoRA fine-tuning of LLaMA-family models: import, prepare data, fine-tune, generate, merge, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# ------------------------------------------------------------------------------------------ model import
@app.command("convert-hf")
def convert_hf(
    src_dir: Path = typer.Argument(..., help="Hugging Face model directory: config.json, *.safetensors or "
                                             "pytorch_model*.bin, tokenizer files."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to create, e.g. checkpoints/NAME."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32; default: keep the source "
                                                              "tensors' dtype."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it already exists."),
) -> None:
    """Convert a Hugging Face LLaMA directory into a lit-lora checkpoint, streaming tensor by tensor."""
    from lit_lora.convert.hf import convert_hf

    print(f"wrote {convert_hf(src_dir, out, dtype, overwrite)}")


@app.command("convert-gguf")
def convert_gguf(
    file: Path = typer.Argument(..., help="A LLaMA-architecture .gguf file (llama.cpp format)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to create, e.g. checkpoints/NAME."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32; default: fp32 for quantised "
                                                              "files, the file's own type otherwise."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it already exists."),
) -> None:
    """Dequantise a GGUF file into a lit-lora checkpoint, tokenizer.json rebuilt from its vocabulary."""
    from lit_lora.convert.gguf import convert_gguf

    print(f"wrote {convert_gguf(file, out, dtype, overwrite)}")


@app.command("download")
def download(
    name: str = typer.Argument(..., help="Model to fetch; known: smollm2-135m-instruct."),
    out: Optional[Path] = typer.Option(None, "--out", help="Checkpoint directory; default checkpoints/NAME."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32; default fp32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it already exists."),
) -> None:
    """Download a known model (cached in $LIT_LORA_CACHE, default ~/.cache/lit-lora) and import it."""
    from lit_lora.download import download

    print(f"wrote {download(name, out, dtype, overwrite)}")



# ------------------------------------------------------------------------------------------ data preparation
# Options shared by the three prepare commands (typer reads these OptionInfo objects; reusing them is safe).
_CHECKPOINT_DIR = typer.Option(..., "--checkpoint_dir", help="Checkpoint whose tokenizer to use, e.g. checkpoints/NAME.")
_DATA_FILE = typer.Option(None, "--data_file", help="Local JSON/JSONL file to prepare (instead of --url).")
_TEMPLATE = typer.Option("alpaca", "--template", help="Prompt template: alpaca, chatml (the checkpoint's chat "
                                                      "format, for instruct models) or plain.")
_VAL_SIZE = typer.Option(None, "--val_size", help="Examples held out for validation; default 2000.")
_VAL_FRACTION = typer.Option(None, "--val_fraction", help="Fraction held out for validation (instead of --val_size).")
_MAX_SEQ_LENGTH = typer.Option(512, "--max_seq_length", help="Longest example in tokens; longer responses are cut "
                                                             "and keep their EOS.")
_MASK_INPUTS = typer.Option(True, "--mask_inputs/--no-mask_inputs", help="Train on responses only (prompt labels "
                                                                          "are -100).")
_SEED = typer.Option(42, "--seed", help="Seed of the train/val split.")


def _prepare(destination: Path, **kwargs) -> None:
    from lit_lora.data.prepare import prepare, summary

    lines, warnings = summary(prepare(destination=destination, **kwargs), destination)
    print("\n".join(lines))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


@app.command("prepare-alpaca")
def prepare_alpaca(
    checkpoint_dir: Path = _CHECKPOINT_DIR,
    data_file: Optional[Path] = _DATA_FILE,
    url: Optional[str] = typer.Option(None, "--url", help="Download from here when no --data_file is given; "
                                                          "default: alpaca-lora's alpaca_data_cleaned_archive.json."),
    destination: Path = typer.Option(Path("data/alpaca"), "--destination", help="Directory to write."),
    template: str = _TEMPLATE,
    val_size: Optional[int] = _VAL_SIZE,
    val_fraction: Optional[float] = _VAL_FRACTION,
    max_seq_length: int = _MAX_SEQ_LENGTH,
    mask_inputs: bool = _MASK_INPUTS,
    seed: int = _SEED,
) -> None:
    """Tokenise the (cleaned) Alpaca data: a JSON list of {instruction, input, output}."""
    _prepare(destination, checkpoint_dir=checkpoint_dir, data_file=data_file, url=url, format="alpaca",
             template=template, val_size=val_size, val_fraction=val_fraction, max_seq_length=max_seq_length,
             mask_inputs=mask_inputs, seed=seed)


@app.command("prepare-dolly")
def prepare_dolly(
    checkpoint_dir: Path = _CHECKPOINT_DIR,
    data_file: Optional[Path] = _DATA_FILE,
    url: Optional[str] = typer.Option(None, "--url", help="Download from here when no --data_file is given; "
                                                          "default: databricks-dolly-15k.jsonl."),
    destination: Path = typer.Option(Path("data/dolly"), "--destination", help="Directory to write."),
    template: str = _TEMPLATE,
    val_size: Optional[int] = _VAL_SIZE,
    val_fraction: Optional[float] = _VAL_FRACTION,
    max_seq_length: int = _MAX_SEQ_LENGTH,
    mask_inputs: bool = _MASK_INPUTS,
    seed: int = _SEED,
) -> None:
    """Tokenise Dolly-15k: JSONL of {instruction, context, response, category}; context is the input."""
    _prepare(destination, checkpoint_dir=checkpoint_dir, data_file=data_file, url=url, format="dolly",
             template=template, val_size=val_size, val_fraction=val_fraction, max_seq_length=max_seq_length,
             mask_inputs=mask_inputs, seed=seed)


@app.command("prepare-json")
def prepare_json(
    checkpoint_dir: Path = _CHECKPOINT_DIR,
    data_file: Optional[Path] = _DATA_FILE,
    url: Optional[str] = typer.Option(None, "--url", help="Download the file from here instead of --data_file."),
    format: str = typer.Option("auto", "--format", help="alpaca (instruction/input/output), dolly "
                                                        "(instruction/context/response) or auto (from the first record)."),
    field_map: Optional[str] = typer.Option(None, "--field_map", help="Your field names, e.g. "
                                                                      "instruction=question,input=context,output=answer."),
    destination: Path = typer.Option(Path("data/custom"), "--destination", help="Directory to write."),
    template: str = _TEMPLATE,
    val_size: Optional[int] = _VAL_SIZE,
    val_fraction: Optional[float] = _VAL_FRACTION,
    max_seq_length: int = _MAX_SEQ_LENGTH,
    mask_inputs: bool = _MASK_INPUTS,
    seed: int = _SEED,
) -> None:
    """Tokenise your own JSON list or JSONL of instruction records."""
    from lit_lora.data.readers import parse_field_map

    _prepare(destination, checkpoint_dir=checkpoint_dir, data_file=data_file, url=url, format=format,
             field_map=parse_field_map(field_map), template=template, val_size=val_size,
             val_fraction=val_fraction, max_seq_length=max_seq_length, mask_inputs=mask_inputs, seed=seed)



# ------------------------------------------------------------------------------------------ training
@app.command("finetune-lora", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def finetune_lora(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (see configs/); any key can be "
                                          "overridden after it, dotted for sections: --train.micro_batch_size 2."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'auto' (newest step-* in out_dir, if any) or a "
                                         "step-XXXXXX checkpoint directory to continue from."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
) -> None:
    """Fine-tune a LoRA adapter on prepared data; writes checkpoints, metrics and a summary to out_dir."""
    from lit_lora.train_config import config_to_yaml, load_config

    resolved = load_config(config, ctx.args)
    if dry_run:
        print(config_to_yaml(resolved), end="")
        return
    from lit_lora.finetune import finetune

    if finetune(resolved, resume)["interrupted"]:
        sys.exit(130)




# ------------------------------------------------------------------------------------------ generation, merge, export
@app.command("generate")
def generate(
    checkpoint_dir: Path = typer.Option(..., "--checkpoint_dir", help="Base checkpoint directory (checkpoints/NAME)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The instruction to answer."),
    input: str = typer.Option("", "--input", help="Optional input/context for the instruction."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts_file", help="Text file with one prompt per line, "
                                                "generated as one left-padded batch (instead of --prompt)."),
    lora_path: Optional[List[Path]] = typer.Option(None, "--lora_path", help="Adapter directory or file (ours or "
                                                   "a PEFT adapter directory); repeat to answer with each in turn."),
    template: str = typer.Option("auto", "--template", help="alpaca, chatml, plain or auto (the adapter's "
                                 "template; else chatml for ChatML tokenizers; else plain)."),
    max_new_tokens: int = typer.Option(200, "--max_new_tokens", help="Most tokens to generate per answer."),
    temperature: float = typer.Option(0.8, "--temperature", help="Sampling temperature; 0 is greedy."),
    top_k: Optional[int] = typer.Option(200, "--top_k", help="Sample among the k most likely tokens (>= 1)."),
    top_p: float = typer.Option(1.0, "--top_p", help="Nucleus sampling: keep the smallest set with this mass."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling (per adapter)."),
    num_samples: int = typer.Option(1, "--num_samples", help="Answers to generate per prompt."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they are generated "
                                "(single prompt only)."),
    precision: str = typer.Option("bf16-true", "--precision", help="bf16-true or 32-true."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model step (slow warm-up on CPU)."),
) -> None:
    """Generate text with a base checkpoint, optionally through one or more LoRA adapters.

    The answer goes to stdout; "Time for inference" and "Memory used" go to stderr.
    """
    from lit_lora.generate import Sampling, run_generate

    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    run_generate(checkpoint_dir, prompt, input, prompts_file, lora_path or [], template, sampling, seed,
                 num_samples, stream, precision, compile)


@app.command("merge-lora")
def merge_lora(
    checkpoint_dir: Path = typer.Option(..., "--checkpoint_dir", help="Base checkpoint the adapter was trained on."),
    lora_path: Path = typer.Option(..., "--lora_path", help="Adapter directory or file (ours or PEFT's)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to create, e.g. checkpoints/NAME-merged."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32; default: the base's dtype."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it already exists."),
) -> None:
    """Fold a LoRA adapter into the base weights (W + alpha/r B A) and write a standalone checkpoint."""
    from lit_lora.merge import merge_checkpoint

    print(f"wrote {merge_checkpoint(checkpoint_dir, lora_path, out, dtype, overwrite)}")


@app.command("export-hf")
def export_hf(
    checkpoint_dir: Path = typer.Option(..., "--checkpoint_dir", help="Checkpoint to export (merge adapters first)."),
    out: Path = typer.Option(..., "--out", help="Hugging Face model directory to create."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it already exists."),
) -> None:
    """Write a checkpoint as a Hugging Face directory that AutoModelForCausalLM.from_pretrained loads."""
    from lit_lora.convert.export import export_hf

    print(f"wrote {export_hf(checkpoint_dir, out, overwrite)}")


@app.command("export-peft")
def export_peft(
    lora_path: Path = typer.Option(..., "--lora_path", help="Adapter directory or file to export."),
    out: Path = typer.Option(..., "--out", help="PEFT adapter directory to create."),
    base_model_name_or_path: Optional[str] = typer.Option(None, "--base_model_name_or_path", help="Hub id or path "
                                                          "of the HF base recorded in adapter_config.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it already exists."),
) -> None:
    """Write an adapter as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)."""
    from lit_lora.convert.export import export_peft

    print(f"wrote {export_peft(lora_path, out, base_model_name_or_path, overwrite)}")



# ------------------------------------------------------------------------------------------ entry points
def _run(command: click.Command, prog_name: str) -> None:
    try:
        command(prog_name=prog_name)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _run(typer.main.get_command(app), "lit-lora")


def _script(name: str):
    """An entry point that runs one subcommand as a program of its own."""

    def run() -> None:
        _run(typer.main.get_command(app).commands[name], name)

    return run


convert_hf_main = _script("convert-hf")
convert_gguf_main = _script("convert-gguf")
download_main = _script("download")
prepare_alpaca_main = _script("prepare-alpaca")
prepare_dolly_main = _script("prepare-dolly")
prepare_json_main = _script("prepare-json")
finetune_lora_main = _script("finetune-lora")
generate_main = _script("generate")
merge_lora_main = _script("merge-lora")
export_hf_main = _script("export-hf")
export_peft_main = _script("export-peft")

if __name__ == "__main__":
    main()
