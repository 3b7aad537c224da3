"""Output directories through the CLI: nothing the user had is lost, and every refusal or file-system failure
is one `error:` line, exit code 2, with the files that existed before unchanged and nothing half-written."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from adapter_helpers import make_adapter
from conftest import run_cli, snapshot

from lit_lora import fileio

FIXTURES = Path(__file__).parent / "fixtures"
ALPACA = FIXTURES / "alpaca_tiny.json"


def one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err


@pytest.fixture
def work(tmp_path, tiny_checkpoint, monkeypatch) -> Path:
    """A project directory (the cwd) with a copy of the tiny checkpoint at checkpoints/tiny."""
    shutil.copytree(tiny_checkpoint, tmp_path / "checkpoints" / "tiny")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def prepare_args(destination, *extra) -> list:
    return ["prepare-alpaca", "--checkpoint_dir", "checkpoints/tiny", "--data_file", ALPACA, "--val_size", 2,
            "--destination", destination, *extra]


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# ---------------------------------------------------------------------------------------------- data loss
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize("what", ["checkpoint", "file", "unrelated"])
def test_prepare_refuses_what_is_not_its_own(monkeypatch, capsys, work, what, overwrite):
    target = {"checkpoint": work / "backup", "file": work / "notes.txt", "unrelated": work / "photos"}[what]
    if what == "checkpoint":
        shutil.copytree(work / "checkpoints" / "tiny", target)
    elif what == "file":
        target.write_text("mine")
    else:
        target.mkdir()
        (target / "holiday.jpg").write_bytes(b"\xff\xd8")
    before = snapshot(work)
    code, _, err = run_cli(monkeypatch, capsys, *prepare_args(target, *overwrite))
    if what == "file":
        one_line_error(code, err, str(target), "existing file", "choose another --destination")
    elif what == "unrelated" and overwrite:
        one_line_error(code, err, str(target), "does not look like a lit-lora output", "remove it yourself")
    elif what == "checkpoint" and overwrite:  # ours, so --overwrite would replace it: use it for the next test
        assert code == 0 and (target / "meta.json").is_file() and not (target / "checkpoint.json").exists()
        return
    else:
        one_line_error(code, err, str(target), "already exists", "--overwrite")
    assert snapshot(work) == before


def test_prepare_overwrites_its_own_data_only_when_asked(monkeypatch, capsys, work):
    assert run_cli(monkeypatch, capsys, *prepare_args("data/alpaca"))[0] == 0
    before = snapshot(work)
    code, _, err = run_cli(monkeypatch, capsys, *prepare_args("data/alpaca", "--seed", 7))
    one_line_error(code, err, "data/alpaca", "--overwrite")
    assert snapshot(work) == before
    code, _, _ = run_cli(monkeypatch, capsys, *prepare_args("data/alpaca", "--seed", 7, "--overwrite"))
    assert code == 0 and sorted(p.name for p in (work / "data").iterdir()) == ["alpaca"]
    val = (0, "data/alpaca/val.safetensors")
    assert snapshot(work)[val][0] != before[val][0]  # other bytes: prepared again with the new seed


@pytest.mark.parametrize("case", ["is", "contains", "inside"])
def test_destination_that_is_contains_or_is_inside_an_input(monkeypatch, capsys, work, case):
    out = {"is": "checkpoints/tiny", "contains": "checkpoints", "inside": "checkpoints/tiny/hf"}[case]
    before = snapshot(work)
    code, _, err = run_cli(monkeypatch, capsys, "export-hf", "--checkpoint_dir", "checkpoints/tiny", "--out", out,
                           "--overwrite")
    one_line_error(code, err, f"--out {out}", f"the input checkpoints/tiny", "outside it")
    assert snapshot(work) == before


def test_prepare_and_merge_check_every_input(monkeypatch, capsys, work):
    adapter = make_adapter(work / "checkpoints" / "tiny", work / "adapter")
    before = snapshot(work)
    code, _, err = run_cli(monkeypatch, capsys, *prepare_args("checkpoints/tiny", "--overwrite"))
    one_line_error(code, err, "--destination checkpoints/tiny is the input checkpoints/tiny")
    code, _, err = run_cli(monkeypatch, capsys, "merge-lora", "--checkpoint_dir", "checkpoints/tiny", "--lora_path",
                           adapter, "--out", adapter, "--overwrite")
    one_line_error(code, err, f"is the input {adapter}")
    code, _, err = run_cli(monkeypatch, capsys, "export-peft", "--lora_path", adapter, "--out", work, "--overwrite")
    one_line_error(code, err, "current directory")
    assert snapshot(work) == before


@pytest.mark.parametrize("out", [".", "..", "checkpoints/.."])
def test_current_directory_or_a_parent_is_never_a_destination(monkeypatch, capsys, work, out):
    (work / "checkpoints" / "tiny" / "copy").mkdir()  # the cwd is then checkpoints/tiny/copy, empty
    monkeypatch.chdir(work / "checkpoints" / "tiny" / "copy")
    before = snapshot(work.parent)
    code, _, err = run_cli(monkeypatch, capsys, "export-hf", "--checkpoint_dir", "..", "--out", out, "--overwrite")
    one_line_error(code, err, f"--out {out} is the current directory or one of its parents")
    assert snapshot(work.parent) == before


def test_overwrite_replaces_our_export_and_leaves_nothing_beside_it(monkeypatch, capsys, work):
    args = ["export-hf", "--checkpoint_dir", "checkpoints/tiny", "--out", "hf/tiny"]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    (work / "hf" / "tiny" / "stale.txt").write_text("from the first export")
    code, _, err = run_cli(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0 and err == ""
    assert not (work / "hf" / "tiny" / "stale.txt").exists() and (work / "hf" / "tiny" / "config.json").is_file()
    assert [p.name for p in (work / "hf").iterdir()] == ["tiny"]


# ---------------------------------------------------------------------------------------------- leftovers
def test_leftovers_of_killed_writes_are_cleaned_up_and_reported(monkeypatch, capsys, work):
    dead, alive = dead_pid(), os.getppid()
    args = ["export-hf", "--checkpoint_dir", "checkpoints/tiny", "--out", "hf/tiny"]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    for name in (f".tiny.tmp-{dead}", f".tiny.old-{dead}", f".tiny.tmp-{alive}", ".tiny-other.tmp-1"):
        (work / "hf" / name).mkdir()
        (work / "hf" / name / "model.safetensors").write_bytes(b"half")
    code, _, err = run_cli(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0 and len(err.splitlines()) == 3, err
    for name in (f".tiny.old-{dead}", f".tiny.tmp-{dead}"):
        assert f"removed {work / 'hf' / name}, left by an interrupted write (process {dead})" in err
    assert f"leaving {work / 'hf' / f'.tiny.tmp-{alive}'} alone: process {alive}" in err
    assert sorted(p.name for p in (work / "hf").iterdir()) == [".tiny-other.tmp-1", f".tiny.tmp-{alive}", "tiny"]


def test_a_version_moved_aside_by_a_killed_replacement_is_put_back(monkeypatch, capsys, work):
    dead = dead_pid()
    args = ["export-hf", "--checkpoint_dir", "checkpoints/tiny", "--out", "hf/tiny"]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    (work / "hf" / "tiny").rename(work / "hf" / f".tiny.old-{dead}")  # killed between the two renames
    before = snapshot(work / "hf" / f".tiny.old-{dead}")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert f"restored {work / 'hf' / 'tiny'} from .tiny.old-{dead}" in err
    one_line_error(code, err.splitlines()[1] + "\n", "hf/tiny", "--overwrite")  # then the usual refusal
    assert snapshot(work / "hf" / "tiny") == before and [p.name for p in (work / "hf").iterdir()] == ["tiny"]


# ---------------------------------------------------------------------------------------------- OS errors
def test_full_disk_is_one_line_and_keeps_the_previous_version(monkeypatch, capsys, work):
    """ENOSPC as safetensors' Rust writer reports it (not an OSError) while replacing prepared data."""
    from safetensors import SafetensorError

    from lit_lora.data import prepare

    assert run_cli(monkeypatch, capsys, *prepare_args("data/alpaca"))[0] == 0
    before = snapshot(work)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(prepare, "save_file", full)
    code, _, err = run_cli(monkeypatch, capsys, *prepare_args("data/alpaca", "--overwrite"))
    one_line_error(code, err, "no space left on device while writing data/alpaca", "free space")
    assert snapshot(work) == before


def test_read_only_destination(monkeypatch, capsys, work):
    shelf = work / "shelf"
    shelf.mkdir()
    if os.geteuid() == 0:  # root writes through file modes: make the file system say it instead
        real_mkdir = os.mkdir

        def read_only(path, *args, **kwargs):
            if str(path).startswith(str(shelf)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", read_only)
        words = ["cannot write", "read-only", "write somewhere else"]
    else:
        shelf.chmod(0o555)
        words = ["permission denied"]
    before = snapshot(work)
    try:
        code, _, err = run_cli(monkeypatch, capsys, "export-hf", "--checkpoint_dir", "checkpoints/tiny", "--out",
                               shelf / "hf")
    finally:
        shelf.chmod(0o755)
    one_line_error(code, err, str(shelf), *words)
    assert snapshot(work) == before


def test_out_below_an_existing_file(monkeypatch, capsys, work):
    (work / "hf").write_text("a file, not a directory")
    before = snapshot(work)
    code, _, err = run_cli(monkeypatch, capsys, "export-hf", "--checkpoint_dir", "checkpoints/tiny", "--out",
                           "hf/tiny")
    one_line_error(code, err, "hf", "already exists as a file", "use another path")
    assert snapshot(work) == before


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB tmpfs (needs root and mount); skips where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_real_full_and_read_only_tmpfs(monkeypatch, capsys, work, small_disk):
    (small_disk / "keep.txt").write_text("was here before")
    before = snapshot(small_disk)
    args = ["export-hf", "--checkpoint_dir", "checkpoints/tiny", "--out", small_disk / "hf"]
    code, _, err = run_cli(monkeypatch, capsys, *args)  # the tiny model is ~420 KB
    one_line_error(code, err, f"no space left on device while writing {small_disk / 'hf'}")
    assert snapshot(small_disk) == before
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    code, _, err = run_cli(monkeypatch, capsys, *args)
    one_line_error(code, err, str(small_disk / "hf"), "read-only")
    assert snapshot(small_disk) == before


def test_os_error_messages_name_the_path_and_the_fix():
    from lit_lora.errors import os_error_message

    assert os_error_message(OSError(errno.ENOSPC, "No space left on device", "out/x")) == \
        "no space left on device while writing out/x; free space there or write somewhere else"
    assert "permission denied: /etc/x; fix its permissions" in os_error_message(PermissionError(
        errno.EACCES, "Permission denied", "/etc/x"))
    assert os_error_message(OSError(errno.ELOOP, "Too many levels of symbolic links", "a")) == \
        "a: Too many levels of symbolic links"


def test_atomic_dir_markers_of_ours(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert not fileio.looks_ours(tmp_path / "hf")  # anyone's config.json
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    assert fileio.looks_ours(tmp_path / "hf")
