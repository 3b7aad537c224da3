"""The `lit-lora` program: typer commands that parse arguments, call the library and print.

Every subcommand is also installed as its own console script (`convert-hf`, `finetune-lora`, ...).
A `UserError` from the library, or an OSError from the file system (a full disk, a read-only
destination), becomes one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
Option defaults are read from the library functions' signatures, so each is declared once.
"""
from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import click
import typer

from lit_lora import chat
from lit_lora import download as models
from lit_lora import evaluate as ev
from lit_lora import generate as gen
from lit_lora import merge
from lit_lora.convert import export, gguf, hf
from lit_lora.data import conversations, prepare, readers, tasks
from lit_lora.errors import UserError, os_error_message


def default(func: Callable, name: str) -> Any:
    """The library's own default for parameter `name` of `func`: each default is declared once, there."""
    return inspect.signature(func).parameters[name].default


def option(func: Callable, name: str, help: str, **kwargs: Any) -> Any:
    """`--name`, defaulting to what the library function defaults to."""
    return typer.Option(default(func, name), f"--{name}", help=help, **kwargs)


def _flags_without_placeholder(params: list) -> list:
    """Boolean flags (--help too) shown as flags, without a `<bool>` value placeholder."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    return params


class Command(typer.core.TyperCommand):
    def get_params(self, ctx: click.Context) -> list:
        return _flags_without_placeholder(super().get_params(ctx))


class Group(typer.core.TyperGroup):
    def get_params(self, ctx: click.Context) -> list:
        return _flags_without_placeholder(super().get_params(ctx))


app = typer.Typer(
    help="LoRA fine-tuning of LLaMA-family models: import, prepare data, fine-tune, generate, merge, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Group,
)


def subcommand(name: str, example: str, **kwargs: Any) -> Callable:
    """`app.command(name)`, its --help ending with one copy-paste example."""
    return app.command(name, cls=Command, epilog=f"Example: {example}", **kwargs)


def out_option(help: str) -> Any:
    return typer.Option(..., "--out", help=help)


def overwrite_option(func: Callable, flag: str = "--out") -> Any:
    return option(func, "overwrite", f"Replace {flag} if it exists: only a directory lit-lora wrote (a checkpoint, "
                                     f"prepared data, an adapter, an export), never one of the command's inputs.")


def verify_option() -> Any:
    return typer.Option(True, "--verify/--no-verify", help="Check every weights file against the sha256 recorded "
                        "when it was written, while reading it (--no-verify skips the check).")


def sampling_options(command: Callable) -> Callable:
    """Give `command` the sampling options (generate and chat share them), passed to it as one `sampling`."""
    s = gen.Sampling
    options = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=value) for
               name, annotation, value in (
        ("max_new_tokens", int, option(s, "max_new_tokens", "Most tokens to generate per answer.")),
        ("temperature", float, option(s, "temperature", "Sampling temperature; 0 is greedy.")),
        ("top_k", Optional[int], option(s, "top_k", "Sample among the k most likely tokens (>= 1).")),
        ("top_p", float, option(s, "top_p", "Nucleus sampling: keep the smallest set with this mass.")))]

    @functools.wraps(command)
    def with_sampling(**kwargs: Any) -> Any:
        return command(sampling=gen.Sampling(**{p.name: kwargs.pop(p.name) for p in options}), **kwargs)

    own = inspect.signature(command).parameters
    with_sampling.__signature__ = inspect.Signature([p for name, p in own.items() if name != "sampling"] + options)
    return with_sampling


TEMPLATE_HELP = ("auto (the adapter's recorded template; else the checkpoint's own chat template; else plain), "
                 "alpaca, chatml or plain (single-turn, as prepare-alpaca writes them), llama3, or a .jinja file.")


# ------------------------------------------------------------------------------------------ model import
@subcommand("convert-hf", "convert-hf path/to/SmolLM2-135M-Instruct --out checkpoints/smollm2-135m-instruct")
def convert_hf(
    src_dir: Path = typer.Argument(..., help="Hugging Face model directory: config.json, *.safetensors or "
                                             "pytorch_model*.bin, tokenizer files."),
    out: Path = out_option("Checkpoint directory to create, e.g. checkpoints/NAME."),
    dtype: Optional[str] = option(hf.convert_hf, "dtype", "bf16, fp16 or fp32; default: keep the source tensors' dtype."),
    overwrite: bool = overwrite_option(hf.convert_hf),
) -> None:
    """Convert a Hugging Face LLaMA directory into a lit-lora checkpoint, streaming tensor by tensor."""
    print(f"wrote {hf.convert_hf(src_dir, out, dtype=dtype, overwrite=overwrite)}")


@subcommand("convert-gguf", "convert-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out checkpoints/smollm2-135m-instruct")
def convert_gguf(
    file: Path = typer.Argument(..., help="A LLaMA-architecture .gguf file (llama.cpp format)."),
    out: Path = out_option("Checkpoint directory to create, e.g. checkpoints/NAME."),
    dtype: Optional[str] = option(gguf.convert_gguf, "dtype", "bf16, fp16 or fp32; default: fp32 for quantised "
                                                               "files, the file's own type otherwise."),
    overwrite: bool = overwrite_option(gguf.convert_gguf),
) -> None:
    """Dequantise a GGUF file into a lit-lora checkpoint, tokenizer.json rebuilt from its vocabulary."""
    print(f"wrote {gguf.convert_gguf(file, out, dtype=dtype, overwrite=overwrite)}")


@subcommand("download", "download smollm2-135m-instruct --out checkpoints/smollm2-135m-instruct")
def download(
    name: str = typer.Argument(..., help=f"Model to fetch; known: {', '.join(models.MODELS)}."),
    out: Optional[Path] = option(models.download, "out", "Checkpoint directory; default checkpoints/NAME."),
    dtype: Optional[str] = option(models.download, "dtype", "bf16, fp16 or fp32; default fp32."),
    overwrite: bool = overwrite_option(models.download),
) -> None:
    """Download a known model (cached in $LIT_LORA_CACHE, default ~/.cache/lit-lora) and import it."""
    print(f"wrote {models.download(name, out=out, dtype=dtype, overwrite=overwrite)}")


# ------------------------------------------------------------------------------------------ data preparation
def _prepare_options() -> list[inspect.Parameter]:
    """The options every prepare command shares, declared once; defaults are prepare()'s."""
    p = prepare.prepare

    def param(name: str, annotation: Any, value: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=annotation)

    return [
        param("checkpoint_dir", Path, typer.Option(..., "--checkpoint_dir", help="Checkpoint whose tokenizer to "
                                                   "use, e.g. checkpoints/NAME.")),
        param("data_file", Optional[Path], option(p, "data_file", "Local JSON/JSONL file to prepare (instead of --url).")),
        param("template", str, option(p, "template", "Prompt template: alpaca, chatml (the checkpoint's chat format, "
                                                     "for instruct models) or plain.")),
        param("val_size", Optional[int], option(p, "val_size", f"Examples held out for validation; default "
                                                               f"{prepare.DEFAULT_VAL_SIZE}.")),
        param("val_fraction", Optional[float], option(p, "val_fraction", "Fraction held out for validation "
                                                                         "(instead of --val_size).")),
        param("val_file", Optional[Path], option(p, "val_file", "A file of its own as the validation split "
                                                                "(instead of --val_size / --val_fraction).")),
        param("max_seq_length", int, option(p, "max_seq_length", "Longest example in tokens; longer responses are "
                                                                 "cut and keep their EOS.")),
        param("mask_inputs", bool, typer.Option(default(p, "mask_inputs"), "--mask_inputs/--no-mask_inputs",
                                                help="Train on responses only (prompt labels are -100).")),
        param("seed", int, option(p, "seed", "Seed of the train/val split.")),
        param("overwrite", bool, overwrite_option(p, "--destination")),
    ]


def print_summary(lines: list[str], warnings: list[str]) -> None:
    """A prepare command's summary on stdout, its warnings on stderr."""
    print("\n".join(lines))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def prepare_command(name: str, doc: str, format: str | None, destination: str, url_help: str,
                    extra: tuple[inspect.Parameter, ...] = (), example_file: str = "records.json") -> None:
    """Register `name`: its own source options and destination, then the shared ones, all forwarded to prepare()."""

    def command(**kwargs: Any) -> None:
        if format is not None:
            kwargs["format"] = format
        if "field_map" in kwargs:
            kwargs["field_map"] = readers.parse_field_map(kwargs["field_map"])
        print_summary(*prepare.summary(prepare.prepare(**kwargs), kwargs["destination"]))

    own = [
        inspect.Parameter("url", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, "--url", help=url_help)),
        *extra,
        inspect.Parameter("destination", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                          default=typer.Option(Path(destination), "--destination", help="Directory to write.")),
    ]
    shared = _prepare_options()  # checkpoint_dir, data_file first: where the data comes from, then the rest
    command.__signature__ = inspect.Signature(shared[:2] + own + shared[2:])
    command.__doc__ = doc
    subcommand(name, f"{name} --checkpoint_dir checkpoints/smollm2-135m-instruct --data_file {example_file} "
                     f"--destination {destination} --template chatml")(command)


prepare_command("prepare-alpaca", "Tokenise the (cleaned) Alpaca data: a JSON list of {instruction, input, output}.",
                "alpaca", "data/alpaca", "Download from here when no --data_file is given; default: alpaca-lora's "
                                         "alpaca_data_cleaned_archive.json.", example_file="alpaca_data.json")
prepare_command("prepare-dolly", "Tokenise Dolly-15k: JSONL of {instruction, context, response, category}; context "
                                 "is the input.",
                "dolly", "data/dolly", "Download from here when no --data_file is given; default: "
                                       "databricks-dolly-15k.jsonl.", example_file="databricks-dolly-15k.jsonl")
prepare_command("prepare-json", "Tokenise your own JSON list or JSONL of instruction records.", None, "data/custom",
                "Download the file from here instead of --data_file.", extra=(
    inspect.Parameter("format", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=option(
        prepare.prepare, "format", "alpaca (instruction/input/output), dolly (instruction/context/response) or auto "
                                   "(from the first record).")),
    inspect.Parameter("field_map", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
        None, "--field_map", help="Your field names, e.g. instruction=question,input=context,output=answer.")),
))


pc = conversations.prepare_chat  # whose defaults prepare-chat's options show


@subcommand("prepare-chat", "prepare-chat --checkpoint_dir checkpoints/smollm2-135m-instruct --data_file chats.jsonl "
                            "--destination data/chats")
def prepare_chat(
    checkpoint_dir: Path = typer.Option(..., "--checkpoint_dir", help="Checkpoint whose tokenizer (and chat template) "
                                                                      "to use."),
    data_file: Path = typer.Option(..., "--data_file", help='JSON list or JSONL of {"messages": [{"role", '
                                   '"content"}]}, ShareGPT {"conversations": [{"from", "value"}]}, or instruction '
                                   'records (Alpaca, Dolly: one user and one assistant turn each).'),
    destination: Path = typer.Option(Path("data/chat"), "--destination", help="Directory to write."),
    template: str = option(pc, "template", "auto (the checkpoint's own chat template), chatml, llama3, alpaca, "
                                           "plain, or a .jinja file."),
    train_on: str = option(pc, "train_on", "Loss on: assistant (every assistant turn and its end marker), last (the "
                                           "final assistant turn), all."),
    system: Optional[str] = option(pc, "system", "System prompt for conversations that have none."),
    max_seq_length: int = option(pc, "max_seq_length", "Longest conversation in tokens; longer ones lose whole "
                                                        "exchanges (with --train_on last, the first ones)."),
    val_size: Optional[int] = option(pc, "val_size", f"Conversations held out for validation; default "
                                                     f"{prepare.DEFAULT_VAL_SIZE}."),
    val_fraction: Optional[float] = option(pc, "val_fraction", "Fraction held out (instead of --val_size)."),
    seed: int = option(pc, "seed", "Seed of the train/val split."),
    overwrite: bool = overwrite_option(pc, "--destination"),
) -> None:
    """Render conversations with the model's chat template and mask the loss per token."""
    meta = conversations.prepare_chat(checkpoint_dir, data_file, destination, template=template, train_on=train_on,
                                      system=system, max_seq_length=max_seq_length, val_size=val_size,
                                      val_fraction=val_fraction, seed=seed, overwrite=overwrite)
    print_summary(*conversations.summary(meta, destination))


@subcommand("prepare-task", "prepare-task extract --checkpoint_dir checkpoints/smollm2-135m-instruct "
                            "--destination data/task-extract")
def prepare_task(
    name: str = typer.Argument(..., help=f"Built-in task: {', '.join(tasks.TASKS)} (dates, amounts and currencies "
                                         f"out of a sentence, answered as YYYY-MM-DD;AMOUNT;CUR)."),
    checkpoint_dir: Path = typer.Option(..., "--checkpoint_dir", help="Checkpoint whose tokenizer to use."),
    destination: Path = typer.Option(..., "--destination", help="Directory to write, e.g. data/task-extract."),
    n_train: int = option(tasks.prepare_task, "n_train", "Training examples to generate."),
    n_val: int = option(tasks.prepare_task, "n_val", "Held-out examples (templates, names and values no training "
                                                     "example uses)."),
    seed: int = option(tasks.prepare_task, "seed", "Seed of the generator."),
    template: str = option(tasks.prepare_task, "template", "alpaca, chatml, plain, or auto (chatml for ChatML "
                                                           "tokenizers, else alpaca)."),
    max_seq_length: int = option(tasks.prepare_task, "max_seq_length", "Longest example in tokens."),
    overwrite: bool = overwrite_option(tasks.prepare_task, "--destination"),
) -> None:
    """Generate a built-in task whose answers can be checked exactly, and prepare it (held-out split as val)."""
    meta = tasks.prepare_task(name, checkpoint_dir, destination, n_train=n_train, n_val=n_val, seed=seed,
                              template=template, max_seq_length=max_seq_length, overwrite=overwrite)
    print("\n".join(prepare.summary(meta, destination)[0]))


# ------------------------------------------------------------------------------------------ training
@subcommand("finetune-lora", "finetune-lora --config configs/smollm2-135m-alpaca.yaml --train.max_steps 200",
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def finetune_lora(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (see configs/); any key can be "
                                          "overridden after it, dotted for sections: --train.micro_batch_size 2."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'auto' (newest step-* in out_dir, if any) or a "
                                         "step-XXXXXX checkpoint directory to continue from."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
) -> None:
    """Fine-tune a LoRA adapter on prepared data; writes checkpoints, metrics and a summary to out_dir.

    Every config key, each settable as --key value (dotted for sections: --train.max_steps 200), is listed with
    the value in effect by `finetune-lora --config FILE --dry-run`.
    """
    from lit_lora.train_config import check_hardware, config_to_yaml, load_config

    resolved = load_config(config, ctx.args)
    if dry_run:
        print(config_to_yaml(resolved), end="")
        return
    check_hardware(resolved)  # before `precision: auto` probes and prints, so a missing GPU is the only line
    from lit_lora.finetune import finetune

    if finetune(resolved, resume)["interrupted"]:
        sys.exit(130)


# ------------------------------------------------------------------------------------------ generation, merge, export
@subcommand("generate", "generate --checkpoint_dir checkpoints/smollm2-135m-instruct --lora_path "
                        "out/lora/smollm2-135m-alpaca/final --prompt \"Give three tips for staying healthy.\"")
@sampling_options
def generate(
    checkpoint_dir: Path = typer.Option(..., "--checkpoint_dir", help="Base checkpoint directory (checkpoints/NAME)."),
    prompt: Optional[str] = option(gen.run_generate, "prompt", "The instruction to answer."),
    input: str = option(gen.run_generate, "input", "Optional input/context for the instruction."),
    prompts_file: Optional[Path] = option(gen.run_generate, "prompts_file", "Text file with one prompt per line, "
                                          "generated as one left-padded batch (instead of --prompt)."),
    lora_path: Optional[List[Path]] = typer.Option(None, "--lora_path", help="Adapter directory or file (ours or "
                                                   "a PEFT adapter directory); repeat to answer with each in turn."),
    template: str = option(gen.run_generate, "template", TEMPLATE_HELP),
    system: Optional[str] = option(gen.run_generate, "system", "System prompt (needs a chat template)."),
    sampling: gen.Sampling = gen.Sampling(),  # the --max_new_tokens... options, made one by sampling_options
    seed: Optional[int] = option(gen.run_generate, "seed", "Random seed for sampling (per adapter)."),
    num_samples: int = option(gen.run_generate, "num_samples", "Answers to generate per prompt."),
    stream: bool = typer.Option(default(gen.run_generate, "stream"), "--stream/--no-stream",
                                help="Print tokens as they are generated (single prompt only)."),
    precision: str = option(gen.run_generate, "precision", "bf16-true, 32-true or auto (the faster on this "
                                                           "machine, by a short matmul probe)."),
    compile: bool = option(gen.run_generate, "compile", "torch.compile the model step (slow warm-up on CPU)."),
    verify: bool = verify_option(),
) -> None:
    """Generate text with a base checkpoint, optionally through one or more LoRA adapters.

    The answer goes to stdout; "Time for inference" and "Memory used" go to stderr.
    """
    gen.run_generate(checkpoint_dir, prompt=prompt, input=input, prompts_file=prompts_file, lora_paths=lora_path or [],
                     template=template, sampling=sampling, seed=seed, num_samples=num_samples, stream=stream,
                     precision=precision, compile=compile, verify=verify, system=system)


@subcommand("chat", "chat --checkpoint_dir checkpoints/smollm2-135m-instruct --lora_path out/lora/a/final "
                    "--lora_path out/lora/b/final")
@sampling_options
def chat_command(
    checkpoint_dir: Path = typer.Option(..., "--checkpoint_dir", help="Base checkpoint directory (checkpoints/NAME)."),
    lora_path: Optional[List[Path]] = typer.Option(None, "--lora_path", help="Adapter directory (ours or PEFT's); "
                                                   "repeat for several, then switch with /adapter NAME."),
    template: str = option(chat.run_chat, "template", TEMPLATE_HELP.replace("single-turn, as prepare-alpaca writes "
                                                                            "them", "their chat forms")),
    system: Optional[str] = option(chat.run_chat, "system", "System prompt (change it with /system TEXT)."),
    sampling: gen.Sampling = gen.Sampling(),  # the --max_new_tokens... options, made one by sampling_options
    seed: Optional[int] = option(chat.run_chat, "seed", "Random seed for sampling."),
    precision: str = option(chat.run_chat, "precision", "bf16-true, 32-true or auto (the faster on this machine)."),
    verify: bool = verify_option(),
) -> None:
    """Talk with a model and its adapters, turn by turn: one message per line, from a terminal or a pipe.

    Commands: /reset, /system TEXT, /adapter NAME (an index, the path given, or base), /help, /exit. Answers go to
    stdout; notes (switches, dropped turns, errors in a message) go to stderr.
    """
    chat.run_chat(checkpoint_dir, lora_paths=lora_path or [], template=template, system=system, sampling=sampling,
                  seed=seed, precision=precision, verify=verify)


@subcommand("merge-lora", "merge-lora --checkpoint_dir checkpoints/smollm2-135m-instruct --lora_path "
                          "out/lora/smollm2-135m-alpaca/final --out checkpoints/smollm2-alpaca-merged")
def merge_lora(
    checkpoint_dir: Path = typer.Option(..., "--checkpoint_dir", help="Base checkpoint the adapter was trained on."),
    lora_path: List[Path] = typer.Option(..., "--lora_path", help="Adapter directory or file (ours or PEFT's); "
                                         "repeat to merge several, in order, into one checkpoint."),
    out: Path = out_option("Checkpoint directory to create, e.g. checkpoints/NAME-merged."),
    dtype: Optional[str] = option(merge.merge_checkpoint, "dtype", "bf16, fp16 or fp32; default: the base's dtype."),
    overwrite: bool = overwrite_option(merge.merge_checkpoint),
    verify: bool = verify_option(),
) -> None:
    """Fold LoRA adapters into the base weights (W + alpha/r B A each) and write a standalone checkpoint."""
    merged = merge.merge_checkpoint(checkpoint_dir, lora_path, out, dtype=dtype, overwrite=overwrite, verify=verify)
    print(f"wrote {merged}")


@subcommand("export-hf", "export-hf --checkpoint_dir checkpoints/smollm2-alpaca-merged --out hf/smollm2-alpaca")
def export_hf(
    checkpoint_dir: Path = typer.Option(..., "--checkpoint_dir", help="Checkpoint to export (merge adapters first)."),
    out: Path = out_option("Hugging Face model directory to create."),
    overwrite: bool = overwrite_option(export.export_hf),
    verify: bool = verify_option(),
) -> None:
    """Write a checkpoint as a Hugging Face directory that AutoModelForCausalLM.from_pretrained loads."""
    print(f"wrote {export.export_hf(checkpoint_dir, out, overwrite=overwrite, verify=verify)}")


@subcommand("export-peft", "export-peft --lora_path out/lora/smollm2-135m-alpaca/final --out peft/smollm2-alpaca "
                           "--base_model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct")
def export_peft(
    lora_path: Path = typer.Option(..., "--lora_path", help="Adapter directory or file to export."),
    out: Path = out_option("PEFT adapter directory to create."),
    base_model_name_or_path: Optional[str] = option(export.export_peft, "base_model_name_or_path", "Hub id or path "
                                                    "of the HF base recorded in adapter_config.json."),
    overwrite: bool = overwrite_option(export.export_peft),
    verify: bool = verify_option(),
) -> None:
    """Write an adapter as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)."""
    written = export.export_peft(lora_path, out, base_model_name_or_path=base_model_name_or_path,
                                 overwrite=overwrite, verify=verify)
    print(f"wrote {written}")


# ------------------------------------------------------------------------------------------ evaluation
@subcommand("evaluate", "evaluate --checkpoint_dir checkpoints/smollm2-135m-instruct --data data/task-extract "
                        "--lora_path out/lora/smollm2-135m-task/final --limit 200")
def evaluate(
    checkpoint_dir: Path = typer.Option(..., "--checkpoint_dir", help="Base checkpoint directory (checkpoints/NAME)."),
    data: Path = typer.Option(..., "--data", help="A prepared directory (any prepare-* output) or a raw "
                                                  "Alpaca/Dolly/JSON(L) file with reference outputs."),
    lora_path: Optional[List[Path]] = typer.Option(None, "--lora_path", help="Adapter to score beside the base; "
                                                   "repeat for several (the base is loaded once)."),
    split: str = option(ev.evaluate, "split", "Split of a prepared directory: val or train."),
    metric: str = option(ev.evaluate, "metric", "loss, exact_match or both."),
    limit: Optional[int] = option(ev.evaluate, "limit", "Score only the first N examples; default: all."),
    batch_size: int = option(ev.evaluate, "batch_size", "Examples per forward pass and per generation batch."),
    max_new_tokens: int = option(ev.evaluate, "max_new_tokens", "Most tokens per generated answer."),
    template: str = option(ev.evaluate, "template", "For a raw file: " + TEMPLATE_HELP),
    precision: str = option(ev.evaluate, "precision", "auto, bf16-mixed, bf16-true or 32-true."),
    baseline: Optional[Path] = option(ev.evaluate, "baseline", "An earlier --out on the same examples: its models are "
                                                               "shown first and not scored again (before/after)."),
    verify: bool = verify_option(),
    json_output: bool = typer.Option(False, "--json", help="Print the scores as one JSON object instead of a table."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the scores and every prediction beside its "
                                                           "reference to this JSON file."),
) -> None:
    """Score the base model and its adapters on the same examples: loss, perplexity and exact match."""
    import json

    result = ev.evaluate(checkpoint_dir, data, lora_paths=lora_path or [], split=split, metric=metric, limit=limit,
                         batch_size=batch_size, max_new_tokens=max_new_tokens, template=template,
                         precision=precision, verify=verify, baseline=baseline, progress=sys.stderr.isatty(), out=out)
    summary = {k: v for k, v in result.items() if k != "predictions"}
    print(json.dumps(summary, indent=2) if json_output else ev.format_table(result))


# ------------------------------------------------------------------------------------------ entry points
def _run(command: click.Command, prog_name: str) -> None:
    try:
        command(prog_name=prog_name)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the file system's, not ours: a full disk, a read-only or missing path
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _run(typer.main.get_command(app), "lit-lora")


def command_main() -> None:
    """The entry point of every per-command program (`convert-hf`, `finetune-lora`, ...): the program's own
    name says which subcommand it runs."""
    name = Path(sys.argv[0]).name.removesuffix(".exe")
    _run(typer.main.get_command(app).commands[name], name)


if __name__ == "__main__":
    main()
