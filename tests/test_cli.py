"""The command line itself: every command's --help (fast, with an example), the library defaults it shows, and the
per-command programs."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import run_cli

from lit_lora import cli

COMMANDS = sorted(typer.main.get_command(cli.app).commands)
TARGETS = sorted(cli.SHOWN)  # every "module:function" whose defaults the options show


@pytest.mark.parametrize("command", COMMANDS)
def test_help_ends_with_an_example_and_shows_flags_as_flags(monkeypatch, capsys, command):
    monkeypatch.setenv("COLUMNS", "200")  # no wrapping: the example stays one line
    code, out, _ = run_cli(monkeypatch, capsys, command, "--help")
    assert code == 0 and "<bool>" not in out and "list[Path]" not in out
    last = [line.strip() for line in out.splitlines() if line.strip()][-1]
    assert last.startswith(f"Example: {command} "), last
    if command == "finetune-lora":
        assert "--dry-run" in out.split("Options")[0]  # the description says where the config keys are listed
    if command.startswith(("prepare-", "convert-", "merge-", "export-", "download")):
        assert "--overwrite" in out


def test_help_imports_neither_torch_nor_the_command():
    """--help of every command, in one fresh interpreter: the CLI reads defaults from source, imports nothing heavy."""
    script = (
        "import sys\nfrom lit_lora.cli import command_main\n"
        f"for name in {COMMANDS!r}:\n"
        "    sys.argv = [name, '--help']\n"
        "    try:\n        command_main()\n    except SystemExit as e:\n        assert not e.code, name\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'lightning', 'lightning_fabric', 'numpy', 'safetensors')"
        " or m in ('lit_lora.model', 'lit_lora.generate', 'lit_lora.finetune', 'lit_lora.data.prepare'))\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("target", TARGETS)
def test_defaults_read_from_source_are_the_library_defaults(target):
    """What --help shows (read from the source) is what the function would use (read by importing it)."""
    module, name = target.split(":")
    obj = getattr(importlib.import_module(module), name)
    if dataclasses.is_dataclass(obj):
        real = {f.name: f.default for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING}
    else:
        real = {k: p.default for k, p in inspect.signature(obj).parameters.items() if p.default is not p.empty}
    read = cli.library_defaults(target)
    assert set(read) == set(real)
    for key, node in read.items():
        try:
            value = cli.library_default(target, key)
        except TypeError:  # not a literal: the CLI must not show it (building the commands above would fail)
            continue
        assert value == real[key], key


def test_library_constants_read_from_source():
    from lit_lora.data import prepare, tasks
    from lit_lora.download import MODELS

    assert cli.library_constant("lit_lora.data.prepare", "DEFAULT_VAL_SIZE") == prepare.DEFAULT_VAL_SIZE
    assert cli.library_names("lit_lora.data.tasks", "TASKS") == list(tasks.TASKS)
    assert cli.library_names("lit_lora.download", "MODELS") == list(MODELS)


def test_defaults_read_from_odd_source(tmp_path, monkeypatch):
    """A default that is not a literal is refused; a definition with a string at column 0 is still read."""
    (tmp_path / "odd_module.py").write_text('import os\n\ndef f(a=1, b=os.sep):\n    pass\n\n\n'
                                            'def g(c="x"):\n    text = """\ndef h(): column 0\n"""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.library_default("odd_module:f", "a") == 1
    with pytest.raises(TypeError, match="literal"):
        cli.library_default("odd_module:f", "b")
    assert cli.library_default("odd_module:g", "c") == "x"


def test_every_program_is_a_command():
    """Each per-command program in pyproject.toml runs the subcommand of its own name."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    programs = {name for name, target in scripts.items() if target == "lit_lora.cli:command_main"}
    assert programs == set(COMMANDS)
