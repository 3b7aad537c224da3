"""The `lit-lora` program: typer commands that parse arguments, call the library and print.

Every subcommand is also installed as its own console script (`convert-hf`, `finetune-lora`, ...).
A `UserError` from the library, or an OSError from the file system (a full disk, a read-only
destination), becomes one line on stderr and exit code 2; anything else is a bug and keeps its traceback.

The CLI is lazy: nothing here imports torch or a command's library module until that command runs, so `--help`
answers at once. Option defaults are the library functions' own, each declared once there, and read from their
source (`library_default`) rather than by importing them; tests/test_cli.py checks that the two agree.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import click
import typer

from lit_lora.errors import UserError, os_error_message


# ------------------------------------------------------------------------------------------ defaults, unimported
@functools.cache
def _source(module: str) -> str:
    origin = importlib.util.find_spec(module).origin  # imports the parent packages only (no torch there)
    return Path(origin).read_text(encoding="utf-8")


_NEXT_TOP_LEVEL = re.compile(r"^[\w@#]", re.M)


def _definition(module: str, name: str) -> ast.stmt:
    """The top-level def, class or assignment of `name` in `module`, parsed on its own (parsing whole modules
    would take most of --help's time); the whole module when the cut is not a statement of its own."""
    source = _source(module)
    start = re.search(rf"^(?:def |class ){name}\b|^{name}\s*[:=]", source, re.M)
    if start is None:
        raise LookupError(f"{module} defines no {name}")
    end = _NEXT_TOP_LEVEL.search(source, start.end())
    try:
        return ast.parse(source[start.start():end.start() if end else None]).body[0]
    except SyntaxError:  # e.g. a string with lines at column 0 inside the definition
        return next(n for n in ast.parse(source).body if name in _names(n))


def _names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _literal(node: ast.expr | None, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise TypeError(f"{where}: the CLI shows only literal defaults; make it a literal") from None


@functools.cache
def library_defaults(target: str) -> dict[str, Any]:
    """{parameter: default's AST} of "module:function" (or of a dataclass's fields, "module:Class"), from its source;
    evaluated when asked for, so only the defaults the CLI shows must be literals."""
    node = _definition(*target.split(":"))
    if isinstance(node, ast.ClassDef):
        return {s.target.id: s.value for s in node.body if isinstance(s, ast.AnnAssign) and s.value is not None}
    args = node.args
    positional = args.posonlyargs + args.args
    pairs = [*zip(positional[len(positional) - len(args.defaults):], args.defaults),
             *((a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None)]
    return {a.arg: d for a, d in pairs}


SHOWN: set[str] = set()  # every target whose defaults the options show (tests compare them with the imported ones)


def library_default(target: str, name: str) -> Any:
    SHOWN.add(target)
    return _literal(library_defaults(target)[name], f"{target}({name}=...)")


def library_constant(module: str, constant: str) -> Any:
    return _literal(_definition(module, constant).value, f"{module}.{constant}")


def library_names(module: str, constant: str) -> list[str]:
    """The keys of a module-level dict constant, read from the source: for help texts."""
    return [_literal(key, f"{module}.{constant}") for key in _definition(module, constant).value.keys]


# ------------------------------------------------------------------------------------------ options, declared once
def option(target: str, name: str, help: str, **kwargs: Any) -> Any:
    """`--name`, defaulting to what the library function `target` ("module:function") defaults to."""
    return typer.Option(library_default(target, name), f"--{name}", help=help, **kwargs)


def flag(target: str, name: str, help: str) -> Any:
    """A --name/--no-name switch defaulting to the library's value."""
    return typer.Option(library_default(target, name), f"--{name}/--no-{name}", help=help)


def checkpoint_option(help: str = "Base checkpoint directory (checkpoints/NAME).") -> Any:
    return typer.Option(..., "--checkpoint_dir", help=help)


def lora_paths_option(help: str) -> Any:
    return typer.Option(None, "--lora_path", help=help, metavar="<path>")


def out_option(help: str) -> Any:
    return typer.Option(..., "--out", help=help)


def overwrite_option(target: str, flag_name: str = "--out") -> Any:
    return option(target, "overwrite", f"Replace {flag_name} if it exists: only a directory lit-lora wrote (a "
                                       f"checkpoint, prepared data, an adapter, an export), never one of the "
                                       f"command's inputs.")


def verify_option() -> Any:
    return typer.Option(True, "--verify/--no-verify", help="Check every weights file against the sha256 recorded "
                        "when it was written, while reading it (--no-verify skips the check).")


def device_option(target: str, what: str) -> Any:
    return option(target, "device", f"Where {what}: auto (the first CUDA GPU, else Apple's MPS, else the CPU), "
                                    f"cpu, cuda, cuda:N or mps.")


def dtype_option(target: str, help: str) -> Any:
    return option(target, "dtype", f"bf16, fp16 or fp32; default: {help}.")


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
    rich_markup_mode=None,  # click's plain help: importing rich would cost --help more than all the rest
    cls=Group,
)


def subcommand(name: str, example: str, **kwargs: Any) -> Callable:
    """`app.command(name)`, its --help ending with one copy-paste example (\\b: click does not wrap it)."""
    return app.command(name, cls=Command, epilog=f"\b\nExample: {example}", **kwargs)


def keyword(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


SAMPLING = "lit_lora.generate:Sampling"


def decoding_options(target: str) -> Callable:
    """Give a command the options generate and chat share: sampling (passed on as one `sampling`), seed,
    precision, verify, engine and device, defaulting to `target`'s."""
    sampling = [
        keyword("max_new_tokens", int, option(SAMPLING, "max_new_tokens", "Most tokens to generate per answer.")),
        keyword("temperature", float, option(SAMPLING, "temperature", "Sampling temperature; 0 is greedy.")),
        keyword("top_k", Optional[int], option(SAMPLING, "top_k", "Sample among the k most likely tokens (>= 1).")),
        keyword("top_p", float, option(SAMPLING, "top_p", "Nucleus sampling: keep the smallest set with this mass.")),
    ]
    passed = [
        keyword("seed", Optional[int], option(target, "seed", "Random seed for sampling (each adapter starts from "
                                                              "it).")),
        keyword("precision", str, option(target, "precision", "bf16-true, 32-true or auto (the faster on this "
                                                              "machine, by a short matmul probe).")),
        keyword("verify", bool, verify_option()),
        keyword("engine", str, option(target, "engine", "torch; llama.cpp (the checkpoint and adapters exported to "
                                                        "GGUF once, cached; pip install 'lit-lora[llamacpp]'); or auto "
                                                        "(llama.cpp where installed, on the CPU).")),
        keyword("device", str, device_option(target, "the torch engine runs")),
        keyword("quantize", Optional[str], quantize_option(target)),
    ]

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def with_options(**kwargs: Any) -> Any:
            from lit_lora.generate import Sampling

            return command(sampling=Sampling(**{p.name: kwargs.pop(p.name) for p in sampling}), **kwargs)

        own = [p for p in inspect.signature(command).parameters.values() if p.kind != p.VAR_KEYWORD]
        with_options.__signature__ = inspect.Signature(own + sampling + passed)
        return with_options

    return decorate


def quantize_option(target: str) -> Any:
    return option(target, "quantize", "The torch engine's base weights: none; int8 (weight-only, per channel: faster "
                                      "decoding); nf4 (4-bit, as QLoRA trains). Default: nf4 for an adapter trained "
                                      "over it, else none.")


def library(target: str) -> Callable:
    """The library function `target` names, imported when its command runs: the one whose defaults it shows."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def template_help(single_turn: str) -> str:
    return (f"auto (the adapter's recorded template; else the checkpoint's own chat template; else plain), "
            f"alpaca, chatml or plain ({single_turn}), llama3, or a .jinja file.")


# ------------------------------------------------------------------------------------------ model import
def import_command(name: str, example: str, target: str, source: tuple[str, Any, Any], out: Any, dtype_help: str,
                   doc: str) -> None:
    """Register `name`, which makes a checkpoint from `source` (its parameter name, type and typer.Argument)."""

    def command(**kwargs: Any) -> None:
        print(f"wrote {library(target)(kwargs.pop(source[0]), **kwargs)}")

    command.__signature__ = inspect.Signature([
        keyword(*source), keyword("out", Optional[Path], out),
        keyword("dtype", Optional[str], dtype_option(target, dtype_help)),
        keyword("overwrite", bool, overwrite_option(target)),
    ])
    command.__doc__ = doc
    subcommand(name, example)(command)


CHECKPOINT_OUT = out_option("Checkpoint directory to create, e.g. checkpoints/NAME.")
import_command("convert-hf", "convert-hf path/to/SmolLM2-135M-Instruct --out checkpoints/smollm2-135m-instruct",
               "lit_lora.convert.hf:convert_hf",
               ("src_dir", Path, typer.Argument(..., help="Hugging Face model directory: config.json, *.safetensors "
                                                          "or pytorch_model*.bin, tokenizer files.")),
               CHECKPOINT_OUT, "keep the source tensors' dtype",
               "Convert a Hugging Face LLaMA directory into a lit-lora checkpoint, streaming tensor by tensor.")
import_command("convert-gguf", "convert-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out checkpoints/smollm2-135m-instruct",
               "lit_lora.convert.gguf:convert_gguf",
               ("file", Path, typer.Argument(..., help="A LLaMA-architecture .gguf file (llama.cpp format).")),
               CHECKPOINT_OUT, "fp32 for quantised files, the file's own type otherwise",
               "Dequantise a GGUF file into a lit-lora checkpoint, tokenizer.json rebuilt from its vocabulary.")
import_command("download", "download smollm2-135m-instruct --out checkpoints/smollm2-135m-instruct",
               "lit_lora.download:download",
               ("name", str, typer.Argument(..., help="Model to fetch; known: "
                                                      f"{', '.join(library_names('lit_lora.download', 'MODELS'))}.")),
               option("lit_lora.download:download", "out", "Checkpoint directory; default checkpoints/NAME."),
               "fp32", "Download a known model (cached in $LIT_LORA_CACHE, default ~/.cache/lit-lora) and import it.")


# ------------------------------------------------------------------------------------------ data preparation
PREPARE_MODULE = "lit_lora.data.prepare"
PREPARE, PREPARE_CHAT = f"{PREPARE_MODULE}:prepare", "lit_lora.data.conversations:prepare_chat"
PREPARE_TASK = "lit_lora.data.tasks:prepare_task"
PREPARE_PREFERENCE = "lit_lora.data.preference:prepare_preference"


def val_size_help(what: str) -> str:
    return f"{what} held out for validation; default {library_constant(PREPARE_MODULE, 'DEFAULT_VAL_SIZE')}."


def _prepare_options() -> list[inspect.Parameter]:
    """The options every prepare command shares, declared once; defaults are prepare()'s."""
    return [
        keyword("checkpoint_dir", Path, checkpoint_option("Checkpoint whose tokenizer to use, e.g. checkpoints/NAME.")),
        keyword("data_file", Optional[Path], option(PREPARE, "data_file", "Local JSON/JSONL file to prepare (instead "
                                                                          "of --url).")),
        keyword("template", str, option(PREPARE, "template", "Prompt template: alpaca, chatml (the checkpoint's chat "
                                                             "format, for instruct models) or plain.")),
        keyword("val_size", Optional[int], option(PREPARE, "val_size", val_size_help("Examples"))),
        keyword("val_fraction", Optional[float], option(PREPARE, "val_fraction", "Fraction held out for validation "
                                                                                 "(instead of --val_size).")),
        keyword("val_file", Optional[Path], option(PREPARE, "val_file", "A file of its own as the validation split "
                                                                        "(instead of --val_size / --val_fraction).")),
        keyword("max_seq_length", int, option(PREPARE, "max_seq_length", "Longest example in tokens; longer "
                                                                         "responses are cut and keep their EOS.")),
        keyword("mask_inputs", bool, typer.Option(library_default(PREPARE, "mask_inputs"),
                                                  "--mask_inputs/--no-mask_inputs",
                                                  help="Train on responses only (prompt labels are -100).")),
        keyword("seed", int, option(PREPARE, "seed", "Seed of the train/val split.")),
        keyword("overwrite", bool, overwrite_option(PREPARE, "--destination")),
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
        from lit_lora.data.prepare import prepare, summary
        from lit_lora.data.readers import parse_field_map

        if format is not None:
            kwargs["format"] = format
        if "field_map" in kwargs:
            kwargs["field_map"] = parse_field_map(kwargs["field_map"])
        print_summary(*summary(prepare(**kwargs), kwargs["destination"]))

    own = [
        keyword("url", Optional[str], typer.Option(None, "--url", help=url_help)),
        *extra,
        keyword("destination", Path, typer.Option(Path(destination), "--destination", help="Directory to write.")),
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
    keyword("format", str, option(PREPARE, "format", "alpaca (instruction/input/output), dolly (instruction/context/"
                                                     "response) or auto (from the first record).")),
    keyword("field_map", Optional[str], typer.Option(None, "--field_map", help="Your field names, e.g. "
                                                     "instruction=question,input=context,output=answer.")),
))


@subcommand("prepare-chat", "prepare-chat --checkpoint_dir checkpoints/smollm2-135m-instruct --data_file chats.jsonl "
                            "--destination data/chats")
def prepare_chat(
    checkpoint_dir: Path = checkpoint_option("Checkpoint whose tokenizer (and chat template) to use."),
    data_file: Path = typer.Option(..., "--data_file", help='JSON list or JSONL of {"messages": [{"role", '
                                   '"content"}]}, ShareGPT {"conversations": [{"from", "value"}]}, or instruction '
                                   'records (Alpaca, Dolly: one user and one assistant turn each).'),
    destination: Path = typer.Option(Path("data/chat"), "--destination", help="Directory to write."),
    template: str = option(PREPARE_CHAT, "template", "auto (the checkpoint's own chat template), chatml, llama3, "
                                                     "alpaca, plain, or a .jinja file."),
    train_on: str = option(PREPARE_CHAT, "train_on", "Loss on: assistant (every assistant turn and its end marker), "
                                                     "last (the final assistant turn), all."),
    system: Optional[str] = option(PREPARE_CHAT, "system", "System prompt for conversations that have none."),
    max_seq_length: int = option(PREPARE_CHAT, "max_seq_length", "Longest conversation in tokens; longer ones lose "
                                                                 "whole exchanges (with --train_on last, the first "
                                                                 "ones)."),
    val_size: Optional[int] = option(PREPARE_CHAT, "val_size", val_size_help("Conversations")),
    val_fraction: Optional[float] = option(PREPARE_CHAT, "val_fraction", "Fraction held out (instead of --val_size)."),
    seed: int = option(PREPARE_CHAT, "seed", "Seed of the train/val split."),
    overwrite: bool = overwrite_option(PREPARE_CHAT, "--destination"),
) -> None:
    """Render conversations with the model's chat template and mask the loss per token."""
    from lit_lora.data.conversations import summary

    meta = library(PREPARE_CHAT)(checkpoint_dir, data_file, destination, template=template, train_on=train_on,
                                 system=system, max_seq_length=max_seq_length, val_size=val_size,
                                 val_fraction=val_fraction, seed=seed, overwrite=overwrite)
    print_summary(*summary(meta, destination))


@subcommand("prepare-preference", "prepare-preference --checkpoint_dir checkpoints/smollm2-135m-instruct --data_file "
                                  "pairs.json --destination data/pairs")
def prepare_preference(
    checkpoint_dir: Path = checkpoint_option("Checkpoint whose tokenizer (and chat template) to use."),
    data_file: Path = typer.Option(..., "--data_file", help='JSON list or JSONL of chosen/rejected pairs: {"prompt", '
                                   '"chosen", "rejected"} as strings or message lists (TRL), {"chosen": [messages], '
                                   '"rejected": [messages]}, or ShareGPT {"conversations", "chosen": {"from", '
                                   '"value"}, "rejected"} (LLaMA-Factory).'),
    destination: Path = typer.Option(Path("data/pairs"), "--destination", help="Directory to write."),
    template: str = option(PREPARE_PREFERENCE, "template", "auto (the checkpoint's own chat template), chatml, "
                                                           "llama3, alpaca, plain, or a .jinja file."),
    system: Optional[str] = option(PREPARE_PREFERENCE, "system", "System prompt for pairs that have none."),
    max_seq_length: int = option(PREPARE_PREFERENCE, "max_seq_length", "Longest prompt + answer in tokens; longer "
                                                                       "pairs lose their first exchanges, then have "
                                                                       "their answers cut."),
    val_size: Optional[int] = option(PREPARE_PREFERENCE, "val_size", "Pairs held out for validation; default 10%."),
    val_fraction: Optional[float] = option(PREPARE_PREFERENCE, "val_fraction", "Fraction held out (instead of "
                                                                               "--val_size)."),
    val_file: Optional[Path] = option(PREPARE_PREFERENCE, "val_file", "A file of its own as the validation pairs."),
    seed: int = option(PREPARE_PREFERENCE, "seed", "Seed of the train/val split."),
    overwrite: bool = overwrite_option(PREPARE_PREFERENCE, "--destination"),
) -> None:
    """Render chosen/rejected pairs with the model's chat template, the loss on the answers, for method dpo/orpo."""
    from lit_lora.data.preference import summary

    meta = library(PREPARE_PREFERENCE)(checkpoint_dir, data_file, destination, template=template, system=system,
                                       max_seq_length=max_seq_length, val_size=val_size, val_fraction=val_fraction,
                                       val_file=val_file, seed=seed, overwrite=overwrite)
    print_summary(*summary(meta, destination))


@subcommand("prepare-task", "prepare-task extract --checkpoint_dir checkpoints/smollm2-135m-instruct "
                            "--destination data/task-extract")
def prepare_task(
    name: str = typer.Argument(..., help=f"Built-in task: {', '.join(library_names('lit_lora.data.tasks', 'TASKS'))} "
                                         "(dates, amounts and currencies out of a sentence, answered as "
                                         "YYYY-MM-DD;AMOUNT;CUR)."),
    checkpoint_dir: Path = checkpoint_option("Checkpoint whose tokenizer to use."),
    destination: Path = typer.Option(..., "--destination", help="Directory to write, e.g. data/task-extract."),
    n_train: int = option(PREPARE_TASK, "n_train", "Training examples to generate."),
    n_val: int = option(PREPARE_TASK, "n_val", "Held-out examples (templates, names and values no training "
                                                     "example uses)."),
    seed: int = option(PREPARE_TASK, "seed", "Seed of the generator."),
    template: str = option(PREPARE_TASK, "template", "alpaca, chatml, plain, or auto (chatml for ChatML "
                                                           "tokenizers, else alpaca)."),
    max_seq_length: int = option(PREPARE_TASK, "max_seq_length", "Longest example in tokens."),
    overwrite: bool = overwrite_option(PREPARE_TASK, "--destination"),
    preference: bool = flag(PREPARE_TASK, "preference", "The same prompts as chosen/rejected pairs for method "
                                                        "dpo/orpo: the right answer chosen, a typical miss (day and "
                                                        "month swapped, a distractor number as the amount) rejected."),
) -> None:
    """Generate a built-in task whose answers can be checked exactly, and prepare it (held-out split as val)."""
    if preference:
        from lit_lora.data.preference import summary
    else:
        from lit_lora.data.prepare import summary

    meta = library(PREPARE_TASK)(name, checkpoint_dir, destination, n_train=n_train, n_val=n_val, seed=seed,
                                 template=template, max_seq_length=max_seq_length, overwrite=overwrite,
                                 preference=preference)
    print("\n".join(summary(meta, destination)[0]))


# ------------------------------------------------------------------------------------------ training
@subcommand("finetune-lora", "finetune-lora --config configs/smollm2-135m-alpaca.yaml --train.max_steps 200",
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def finetune_lora(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (see configs/); any key can be "
                                          "overridden after it, dotted for sections: --train.micro_batch_size 2."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'auto' (newest step-* in out_dir, if any) or a "
                                         "step-XXXXXX checkpoint directory to continue from."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and the memory plan (weights, "
                                 "LoRA, optimizer state, activations with and without gradient checkpointing), "
                                 "then exit. checkpoint_dir may name a preset."),
    sweep: Optional[list[str]] = typer.Option(None, "--sweep", metavar="KEY=V1,V2", help="KEY=V1,V2,... (r, alpha, "
                                              "dropout, variant, use_rslora, learning_rate, lora_plus_ratio; repeat "
                                              "for a grid): train one adapter per combination together, then score "
                                              "each on the validation split into out_dir/sweep.md, .csv and .png."),
    sweep_group: Optional[int] = typer.Option(None, "--sweep_group", help="Train the sweep's adapters this many at "
                                              "a time (default: as many as the memory plan fits in 80% of the memory "
                                              "available, all on a GPU)."),
) -> None:
    """Fine-tune a LoRA adapter on prepared data; writes checkpoints, metrics and a summary to out_dir.

    Every config key, each settable as --key value (dotted for sections: --train.max_steps 200), is listed with
    the value in effect by `finetune-lora --config FILE --dry-run`. With `adapters:` (or --sweep) several adapters
    train together over one base, each in out_dir/NAME/ exactly as if trained alone.
    """
    from lit_lora.train_config import check_hardware, config_to_yaml, load_config

    resolved = load_config(config, ctx.args)
    if sweep:
        from lit_lora.sweep import expand

        resolved = expand(resolved, sweep)
    if dry_run:
        from lit_lora.memory_plan import dry_run_plan

        memory = dry_run_plan(resolved)  # any refusal before anything is printed
        print(config_to_yaml(resolved), end="")
        print("\n".join(f"# {line}" for line in memory.splitlines()))  # comments: the output stays the YAML config
        return
    check_hardware(resolved)  # before `precision: auto` probes and prints, so a missing GPU is the only line
    if sweep:
        from lit_lora.sweep import run_sweep

        interrupted = run_sweep(resolved, resume, sweep_group)
    else:
        from lit_lora.finetune import finetune

        interrupted = finetune(resolved, resume)["interrupted"]
    if interrupted:
        sys.exit(130)


# ------------------------------------------------------------------------------------------ generation, merge, export
GENERATE, CHAT, MERGE = "lit_lora.generate:run_generate", "lit_lora.chat:run_chat", "lit_lora.merge:merge_checkpoint"
EXPORT_HF, EXPORT_PEFT = "lit_lora.export:export_hf", "lit_lora.export:export_peft"
EXPORT_GGUF = "lit_lora.export:export_gguf"
EVALUATE = "lit_lora.evaluate:evaluate"


@subcommand("generate", "generate --checkpoint_dir checkpoints/smollm2-135m-instruct --lora_path "
                        "out/lora/smollm2-135m-alpaca/final --prompt \"Give three tips for staying healthy.\"")
@decoding_options(GENERATE)
def generate(
    checkpoint_dir: Path = checkpoint_option(),
    prompt: Optional[str] = option(GENERATE, "prompt", "The instruction to answer."),
    input: str = option(GENERATE, "input", "Optional input/context for the instruction."),
    prompts_file: Optional[Path] = option(GENERATE, "prompts_file", "Text file with one prompt per line, generated "
                                                                    "as one left-padded batch (instead of --prompt)."),
    lora_path: Optional[List[Path]] = lora_paths_option("Adapter directory or file (ours or a PEFT adapter "
                                                        "directory); repeat to answer with each in turn."),
    template: str = option(GENERATE, "template", template_help("single-turn, as prepare-alpaca writes them")),
    system: Optional[str] = option(GENERATE, "system", "System prompt (needs a chat template)."),
    num_samples: int = option(GENERATE, "num_samples", "Answers to generate per prompt."),
    stream: bool = flag(GENERATE, "stream", "Print tokens as they are generated (single prompt only)."),
    compile: bool = option(GENERATE, "compile", "torch.compile the model step (slow warm-up on CPU)."),
    **decoding: Any,  # sampling (one Sampling), seed, precision, verify, engine: decoding_options
) -> None:
    """Generate text with a base checkpoint, optionally through one or more LoRA adapters.

    The answer goes to stdout; "Time for inference" and "Memory used" go to stderr.
    """
    library(GENERATE)(checkpoint_dir, prompt=prompt, input=input, prompts_file=prompts_file,
                      lora_paths=lora_path or [], template=template, system=system, num_samples=num_samples,
                      stream=stream, compile=compile, **decoding)


@subcommand("chat", "chat --checkpoint_dir checkpoints/smollm2-135m-instruct --lora_path out/lora/a/final "
                    "--lora_path out/lora/b/final")
@decoding_options(CHAT)
def chat(
    checkpoint_dir: Path = checkpoint_option(),
    lora_path: Optional[List[Path]] = lora_paths_option("Adapter directory (ours or PEFT's); repeat for several, "
                                                        "then switch with /adapter NAME."),
    template: str = option(CHAT, "template", template_help("their chat forms")),
    system: Optional[str] = option(CHAT, "system", "System prompt (change it with /system TEXT)."),
    **decoding: Any,  # sampling (one Sampling), seed, precision, verify, engine: decoding_options
) -> None:
    """Talk with a model and its adapters, turn by turn: one message per line, from a terminal or a pipe.

    Commands: /reset, /system TEXT, /adapter NAME (an index, the path given, or base), /help, /exit. Answers go to
    stdout; notes (switches, dropped turns, errors in a message) go to stderr.
    """
    library(CHAT)(checkpoint_dir, lora_paths=lora_path or [], template=template, system=system, **decoding)


SERVE = "lit_lora.serve.server:run_serve"


@subcommand("serve", "serve --checkpoint_dir checkpoints/smollm2-135m-instruct --lora_dir out/adapters "
                     "--lora_path alpaca=out/lora/smollm2-135m-alpaca/final")
def serve(
    checkpoint_dir: Path = checkpoint_option(),
    lora_path: Optional[List[str]] = typer.Option(None, "--lora_path", metavar="[NAME=]PATH", help="An adapter to "
                                                  "serve as NAME (default: its folder's name); repeat for several."),
    lora_dir: Optional[Path] = option(SERVE, "lora_dir", "Serve every adapter folder in this directory, by folder "
                                                         "name; new ones are found without a restart."),
    host: str = option(SERVE, "host", "Address to listen on (0.0.0.0: every interface; then set --api_key)."),
    port: int = option(SERVE, "port", "Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api_key", envvar="LIT_LORA_API_KEY", help="Require "
                                          "'Authorization: Bearer KEY' on /v1 (or set LIT_LORA_API_KEY)."),
    max_adapters: int = option(SERVE, "max_adapters", "Adapters held in memory at once (least recently used out)."),
    max_batch: int = option(SERVE, "max_batch", "Requests decoded together in one batch (each a cache row)."),
    max_queue: int = option(SERVE, "max_queue", "Requests waiting beyond the batch before 429 Too Many Requests."),
    max_tokens: int = option(SERVE, "max_tokens", "max_tokens of a chat answer that does not say (a request may "
                                                   "ask up to the context)."),
    max_seq_length: Optional[int] = option(SERVE, "max_seq_length", "Tokens of prompt plus answer per request "
                                                                     "(default: the model's context, at most 2048)."),
    precision: str = option(SERVE, "precision", "bf16-true, 32-true or auto (the faster here)."),
    device: str = device_option(SERVE, "the model runs"),
    quantize: Optional[str] = quantize_option(SERVE),
    verify: bool = verify_option(),
) -> None:
    """Serve the base and its adapters over the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions).

    Requests for different adapters are decoded together in one batch, each row with its own adapter; the request's
    `model` picks the base (by its folder's name) or an adapter. Stop with Ctrl-C or SIGTERM.
    """
    library(SERVE)(checkpoint_dir, lora_paths=lora_path or [], lora_dir=lora_dir, host=host, port=port,
                   api_key=api_key, max_adapters=max_adapters, max_batch=max_batch, max_queue=max_queue,
                   max_tokens=max_tokens, max_seq_length=max_seq_length, precision=precision, device=device,
                   quantize=quantize, verify=verify)


@subcommand("merge-lora", "merge-lora --checkpoint_dir checkpoints/smollm2-135m-instruct --lora_path "
                          "out/lora/smollm2-135m-alpaca/final --out checkpoints/smollm2-alpaca-merged")
def merge_lora(
    checkpoint_dir: Path = checkpoint_option("Base checkpoint the adapters were trained on."),
    lora_path: List[Path] = typer.Option(..., "--lora_path", metavar="<path>", help="Adapter directory or file (ours "
                                         "or PEFT's); repeat to merge several, in order, into one checkpoint."),
    out: Path = out_option("Checkpoint directory to create, e.g. checkpoints/NAME-merged."),
    dtype: Optional[str] = dtype_option(MERGE, "the base's dtype"),
    overwrite: bool = overwrite_option(MERGE),
    verify: bool = verify_option(),
    device: str = device_option(MERGE, "the products B A are computed"),
) -> None:
    """Fold LoRA adapters into the base weights (W + alpha/r B A each) and write a standalone checkpoint."""
    written = library(MERGE)(checkpoint_dir, lora_path, out, dtype=dtype, overwrite=overwrite, verify=verify,
                             device=device)
    print(f"wrote {written}")


@subcommand("export-hf", "export-hf --checkpoint_dir checkpoints/smollm2-alpaca-merged --out hf/smollm2-alpaca")
def export_hf(
    checkpoint_dir: Path = checkpoint_option("Checkpoint to export (merge adapters first)."),
    out: Path = out_option("Hugging Face model directory to create."),
    overwrite: bool = overwrite_option(EXPORT_HF),
    verify: bool = verify_option(),
) -> None:
    """Write a checkpoint as a Hugging Face directory that AutoModelForCausalLM.from_pretrained loads."""
    print(f"wrote {library(EXPORT_HF)(checkpoint_dir, out, overwrite=overwrite, verify=verify)}")


@subcommand("export-peft", "export-peft --lora_path out/lora/smollm2-135m-alpaca/final --out peft/smollm2-alpaca "
                           "--base_model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct")
def export_peft(
    lora_path: Path = typer.Option(..., "--lora_path", help="Adapter directory or file to export."),
    out: Path = out_option("PEFT adapter directory to create."),
    base_model_name_or_path: Optional[str] = option(EXPORT_PEFT, "base_model_name_or_path", "Hub id or path of the "
                                                    "HF base recorded in adapter_config.json."),
    overwrite: bool = overwrite_option(EXPORT_PEFT),
    verify: bool = verify_option(),
) -> None:
    """Write an adapter as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)."""
    written = library(EXPORT_PEFT)(lora_path, out, base_model_name_or_path=base_model_name_or_path,
                                   overwrite=overwrite, verify=verify)
    print(f"wrote {written}")


@subcommand("export-gguf", "export-gguf --checkpoint_dir checkpoints/smollm2-135m-instruct --lora_path "
                           "out/lora/smollm2-135m-chat/final --out smollm2-chat.gguf --type q8_0")
def export_gguf(
    out: Path = out_option("GGUF file to write; NAME.Modelfile (for Ollama) is written beside it."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint_dir", help="Checkpoint to export (with "
                                                  "--lora_path: base + adapter merged)."),
    lora_path: Optional[Path] = typer.Option(None, "--lora_path", help="Adapter: merged into --checkpoint_dir, or "
                                             "alone a llama.cpp LoRA adapter GGUF (llama-cli --lora, Ollama ADAPTER)."),
    type: str = option(EXPORT_GGUF, "type", "Weights type: "
                       f"{', '.join(library_names('lit_lora.convert.gguf', 'EXPORT_TYPES'))} (norms stay f32)."),
    overwrite: bool = option(EXPORT_GGUF, "overwrite", "Replace --out (and its Modelfile) if it is a GGUF file."),
    verify: bool = verify_option(),
    device: str = device_option(EXPORT_GGUF, "an adapter is merged"),
) -> None:
    """Write a model, or an adapter alone, as GGUF for llama.cpp, Ollama and LM Studio."""
    written = library(EXPORT_GGUF)(out, checkpoint_dir=checkpoint_dir, lora_path=lora_path, type=type,
                                   overwrite=overwrite, verify=verify, device=device)
    modelfile = library("lit_lora.export:modelfile_path")(written)
    print(f"wrote {written} and {modelfile}")


# ------------------------------------------------------------------------------------------ evaluation
@subcommand("evaluate", "evaluate --checkpoint_dir checkpoints/smollm2-135m-instruct --data data/task-extract "
                        "--lora_path out/lora/smollm2-135m-task/final --limit 200")
def evaluate(
    checkpoint_dir: Path = checkpoint_option(),
    data: Path = typer.Option(..., "--data", help="A prepared directory (any prepare-* output) or a raw "
                                                  "Alpaca/Dolly/JSON(L) file with reference outputs."),
    lora_path: Optional[List[Path]] = lora_paths_option("Adapter to score beside the base; repeat for several (the "
                                                        "base is loaded once)."),
    split: str = option(EVALUATE, "split", "Split of a prepared directory: val or train."),
    metric: str = option(EVALUATE, "metric", "loss, exact_match or both."),
    limit: Optional[int] = option(EVALUATE, "limit", "Score only the first N examples; default: all."),
    batch_size: int = option(EVALUATE, "batch_size", "Examples per forward pass and per generation batch."),
    max_new_tokens: int = option(EVALUATE, "max_new_tokens", "Most tokens per generated answer."),
    template: str = option(EVALUATE, "template", "For a raw file: " + template_help("single-turn, as prepare-alpaca "
                                                                                  "writes them")),
    precision: str = option(EVALUATE, "precision", "auto, bf16-mixed, bf16-true or 32-true."),
    baseline: Optional[Path] = option(EVALUATE, "baseline", "An earlier --out on the same examples: its models are "
                                                            "shown first and not scored again (before/after)."),
    engine: str = option(EVALUATE, "engine", "What generates the answers for exact match: torch, llama.cpp or auto "
                                             "(llama.cpp where installed); losses are always torch's."),
    device: str = device_option(EVALUATE, "the torch model runs"),
    quantize: Optional[str] = quantize_option(EVALUATE),
    beta: float = option(EVALUATE, "beta", "On preference data (prepare-preference): the scale of the implicit DPO "
                                           "reward beta * (log p - log p_base) behind the margin and the DPO loss."),
    verify: bool = verify_option(),
    json_output: bool = typer.Option(False, "--json", help="Print the scores as one JSON object instead of a table."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the scores and every prediction beside its "
                                                           "reference to this JSON file."),
) -> None:
    """Score the base model and its adapters on the same examples: loss, perplexity and exact match, and on
    chosen/rejected pairs each adapter's reward accuracy and margin against the base."""
    import json

    from lit_lora.evaluate import format_table

    result = library(EVALUATE)(checkpoint_dir, data, lora_paths=lora_path or [], split=split, metric=metric,
                               limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, template=template,
                               precision=precision, verify=verify, baseline=baseline, progress=sys.stderr.isatty(),
                               out=out, engine=engine, device=device, quantize=quantize, beta=beta)
    summary = {k: v for k, v in result.items() if k != "predictions"}
    print(json.dumps(summary, indent=2) if json_output else format_table(result))


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
