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


# ------------------------------------------------------------------------------------------ data preparation


# ------------------------------------------------------------------------------------------ training


# ------------------------------------------------------------------------------------------ generation, merge, export


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
