"""finetune-lora --resume edge cases, through the CLI: a finished run, raised max_steps, metrics.csv after a
resume, rejected settings, damaged checkpoints, a full disk while saving. Each asserts the exit code, the one
line the user reads, and that what was in out_dir before is still there unchanged."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, snapshot
from test_finetune import TINY, adapter, prepared, run, tiny_args  # noqa: F401  (fixtures)

from lit_lora.train_state import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread

# Saves step-000002 and step-000004 of 6 steps; dropout on, so an inexact resume would show.
COMMON = ("--train.save_interval=2", "--lora.dropout=0.1", "--eval.interval=100")


@pytest.fixture(scope="module")
def finished(tiny_checkpoint, prepared, tmp_path_factory) -> Path:
    """Read-only: a complete 6-step run (step-000002, step-000004, final/); copy it with `copy_run`."""
    out = tmp_path_factory.mktemp("finished") / "out"
    run(tiny_checkpoint, prepared, out, *COMMON)
    return out


def copy_run(finished: Path, tmp_path: Path, interrupted: bool = False) -> Path:
    """A copy of the finished run; `interrupted`: as if killed during step 5 (no final/, no summary.json, and
    metrics.csv already holding rows after the last checkpoint, step 4)."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    if interrupted:
        shutil.rmtree(out / "final")
        for name in ("summary.json", "loss.png"):
            (out / name).unlink(missing_ok=True)
    return out


def cli(monkeypatch, capsys, checkpoint, data, out, *args) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, "finetune-lora", "--config", TINY, *tiny_args(checkpoint, data, out, *COMMON),
                   *args)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def metric_rows(out: Path) -> list[str]:
    return (out / "metrics.csv").read_text().splitlines()[1:]


def keys(rows: list[str]) -> list[tuple[int, str]]:
    return [(int(r.split(",")[0]), r.split(",")[2]) for r in rows]


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_resume_auto_on_a_finished_run_says_so_and_changes_nothing(tiny_checkpoint, prepared, finished, tmp_path,
                                                                  monkeypatch, capsys):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    for resume in ("auto", str(out / "final")):
        code, stdout, stderr = cli(monkeypatch, capsys, tiny_checkpoint, prepared, out, "--resume", resume)
        assert code in (0, None), stderr
        assert stdout.splitlines() == [
            f"{out} holds a complete run (6 steps trained, this config asks for 6); its adapter is {out}/final; "
            f"nothing was changed; raise train.max_steps (or train.epochs) to train further"]
        assert snapshot(out) == before


def test_raised_max_steps_continues_from_the_end_of_a_finished_run(tiny_checkpoint, prepared, finished, tmp_path,
                                                                   monkeypatch, capsys):
    out = copy_run(finished, tmp_path)
    before, rows_before = snapshot(out), metric_rows(out)
    code, stdout, stderr = cli(monkeypatch, capsys, tiny_checkpoint, prepared, out, "--resume", "auto",
                               "--train.max_steps=8")
    assert code in (0, None), stderr
    lines = stdout.splitlines()
    assert f"resuming from {out}/final at step 6" in lines
    assert any(line.startswith("note: the run now ends at step 8 instead of 6: from step 7 the learning rate "
                               "follows the cosine schedule to step 8") for line in lines)
    assert load_checkpoint(out / "final").step == 8
    rows = metric_rows(out)
    assert rows[: len(rows_before)] == rows_before  # nothing logged before is lost or rewritten
    assert keys(rows[len(rows_before):]) == [(7, "train"), (8, "train"), (8, "val")]
    after = snapshot(out)
    for name in ("step-000002/training_state.pt", "step-000004/lora.safetensors"):
        assert after[0, name] == before[0, name]


def test_resume_cuts_metrics_back_to_the_checkpoint(tiny_checkpoint, prepared, finished, tmp_path, monkeypatch,
                                                    capsys):
    out = copy_run(finished, tmp_path, interrupted=True)
    before, rows_before = snapshot(out), metric_rows(out)
    assert keys(rows_before)[-1][0] == 6  # rows after the checkpoint at step 4 are already there
    code, stdout, stderr = cli(monkeypatch, capsys, tiny_checkpoint, prepared, out, "--resume", "auto")
    assert code in (0, None), stderr
    assert f"resuming from {out}/step-000004 at step 4" in stdout.splitlines()
    rows = metric_rows(out)
    assert keys(rows) == keys(rows_before)  # each step once, in order
    kept = [r for r in rows_before if int(r.split(",")[0]) <= 4]
    assert rows[: len(kept)] == kept
    assert_same_adapter(out / "final", finished / "final")  # bit-identical to the uninterrupted run
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k[1].startswith("step-")} == \
        {k: v for k, v in before.items() if k[1].startswith("step-")}


def test_resume_with_changed_settings_is_refused_before_writing_anything(tiny_checkpoint, prepared, finished,
                                                                         tmp_path, monkeypatch, capsys):
    out = copy_run(finished, tmp_path, interrupted=True)
    before = snapshot(out)
    code, _, stderr = cli(monkeypatch, capsys, tiny_checkpoint, prepared, out, "--resume", "auto", "--seed=7",
                          "--lora.r=8")
    assert code == 2
    assert errors(stderr) == [f"error: cannot resume from {out}/step-000004: it was trained with other settings "
                              f"(seed 1337 -> 7; lora.r 4 -> 8); resume with the same ones or choose another out_dir"]
    assert snapshot(out) == before  # config.yaml too


@pytest.mark.parametrize("damage", ["training_state", "adapter_truncated", "adapter_bit_flip"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_checkpoint, prepared, finished, tmp_path,
                                                                  monkeypatch, capsys, damage):
    out = copy_run(finished, tmp_path, interrupted=True)
    newest = out / "step-000004"
    if damage == "training_state":
        (newest / "training_state.pt").write_bytes(b"not a checkpoint")
        why = "training_state.pt cannot be read: "
    else:
        data = bytearray((newest / "lora.safetensors").read_bytes())
        if damage == "adapter_truncated":
            data = data[: len(data) // 2]
        else:
            data[-3] ^= 0x40
        (newest / "lora.safetensors").write_bytes(bytes(data))
        why = "lora.safetensors"
    before = snapshot(out)
    code, stdout, stderr = cli(monkeypatch, capsys, tiny_checkpoint, prepared, out, "--resume", "auto")
    assert code in (0, None), stderr
    warnings = [line for line in stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {newest} is damaged ({why}")
    assert warnings[0].endswith(f"); skipped it, falling back to {out}/step-000002")
    assert f"resuming from {out}/step-000002 at step 2" in stdout.splitlines()
    assert_same_adapter(out / "final", finished / "final")
    assert load_checkpoint(newest).step == 4  # saved again, whole
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k[1].startswith("step-000002")} == \
        {k: v for k, v in before.items() if k[1].startswith("step-000002")}


def test_damaged_checkpoints_with_nothing_to_fall_back_on_stop_cleanly(tiny_checkpoint, prepared, finished, tmp_path,
                                                                       monkeypatch, capsys):
    out = copy_run(finished, tmp_path, interrupted=True)
    for step in ("step-000002", "step-000004"):
        (out / step / "training_state.pt").write_bytes(b"\0" * 10)
    before = snapshot(out)
    code, _, stderr = cli(monkeypatch, capsys, tiny_checkpoint, prepared, out, "--resume", "auto")
    assert code == 2
    (line,) = errors(stderr)
    assert line.startswith(f"error: every checkpoint in {out} is damaged (step-000004: training_state.pt cannot be "
                           f"read: ") and line.endswith("; nothing was changed; start again in another out_dir")
    code, _, stderr = cli(monkeypatch, capsys, tiny_checkpoint, prepared, out, "--resume", str(out / "step-000004"))
    assert code == 2
    (line,) = errors(stderr)
    assert line.startswith(f"error: checkpoint {out}/step-000004 is damaged: training_state.pt cannot be read: ")
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["adapter", "training_state"])
def test_full_disk_while_saving_keeps_the_last_checkpoint_and_says_so(tiny_checkpoint, prepared, finished, tmp_path,
                                                                      monkeypatch, capsys, where):
    import lit_lora.adapter
    from safetensors import SafetensorError

    out, calls = tmp_path / "out", []
    if where == "adapter":  # safetensors' own writer: the message it gives on ENOSPC
        real = lit_lora.adapter.save_file

        def save_file(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # step-000004
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(*args, **kwargs)

        monkeypatch.setattr(lit_lora.adapter, "save_file", save_file)
        failed, last = out / "step-000004", out / "step-000002"
    else:
        real = torch.save

        def save(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # final/
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
        failed, last = out / "final", out / "step-000004"
    code, _, stderr = cli(monkeypatch, capsys, tiny_checkpoint, prepared, out)
    assert code == 2
    assert errors(stderr) == [f"error: could not save {failed}: No space left on device; nothing of it was kept, and "
                              f"the last good checkpoint is {last}; free some space, then continue with --resume auto"]
    assert not failed.exists() and not list(out.glob(".*tmp*"))
    assert load_checkpoint(last).step == int(last.name[5:])
    monkeypatch.undo()
    code, _, stderr = cli(monkeypatch, capsys, tiny_checkpoint, prepared, out, "--resume", "auto")
    assert code in (0, None), stderr
    assert_same_adapter(out / "final", finished / "final")


def test_finished_run_from_before_final_kept_its_state(tiny_checkpoint, prepared, finished, tmp_path, monkeypatch,
                                                       capsys):
    out = copy_run(finished, tmp_path)
    (out / "final/training_state.pt").unlink()  # final/ as older versions wrote it: the adapter only
    before = snapshot(out)
    code, stdout, _ = cli(monkeypatch, capsys, tiny_checkpoint, prepared, out, "--resume", "auto")
    assert code in (0, None) and stdout.startswith(f"{out} holds a complete run (6 steps trained")
    code, _, stderr = cli(monkeypatch, capsys, tiny_checkpoint, prepared, out, "--resume", "auto",
                          "--train.max_steps=8")
    assert code == 2
    assert errors(stderr) == [f"error: {out}/final was saved without training state (by an older lit-lora), so the "
                              f"run cannot continue from its end to step 8; resume from a step directory with "
                              f"--resume {out}/step-XXXXXX (final/ is then replaced) or choose another out_dir"]
    code, _, stderr = cli(monkeypatch, capsys, tiny_checkpoint, prepared, out)  # no --resume: not over it
    assert code == 2 and errors(stderr) == [f"error: {out} already holds a run (checkpoints or final/); continue it "
                                            f"with --resume auto or choose another out_dir"]
    assert snapshot(out) == before
