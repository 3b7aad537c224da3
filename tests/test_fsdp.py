"""strategy fsdp (FSDP2 through Fabric's ModelParallelStrategy) on a CPU: 2 processes over gloo against 1, exact
resume, an NF4 base (also under DDP), and the settings it refuses.

Each 2-process run is a subprocess of the CLI, as a user starts one. A reduction that summed the gradients instead
of averaging them (pytorch#162338, FSDP2 over gloo) fails the comparisons with 1 process: checked by forcing one.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_checkpoint, run_cli
from test_finetune import ONE_THREAD, TINY, assert_same_adapter, prepared, run, tiny_args  # noqa: F401 (a fixture)
from test_integrity import assert_error, assert_not_written, finetune_args

pytestmark = pytest.mark.usefixtures("one_thread")
SAME = {"rtol": 1e-5, "atol": 1e-6}  # as for DDP (test_finetune)
ONE_STEP_EACH = ("--train.max_steps=2", "--eval.interval=100", "--train.micro_batch_size=4")


@pytest.fixture(scope="module")
def nf4_checkpoint(tmp_path_factory) -> Path:
    """The tiny model widened (dim 256, MLP 512) until every NF4 weight holds an even number of scale groups, which
    2 processes can share (the tiny model's hold one each); the same tokenizer, so `prepared` fits it."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "wide", dim=256, hidden_dim=512)


def two_processes(checkpoint: Path, data: Path, out: Path, *overrides: str) -> str:
    """Train with `devices: 2` in a subprocess of the CLI; its stdout."""
    cmd = [sys.executable, "-m", "lit_lora.cli", "finetune-lora", "--config", str(TINY),
           *tiny_args(checkpoint, data, out, "--devices=2", *overrides)]
    done = subprocess.run(cmd, env=ONE_THREAD, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_fsdp_two_processes_equal_one_process(tiny_checkpoint, prepared, tmp_path):
    # bf16-mixed: each unit holds the bf16 base beside the fp32 LoRA tensors.
    common = (*ONE_STEP_EACH, "--precision=bf16-mixed")
    out = two_processes(tiny_checkpoint, prepared, tmp_path / "fsdp", *common, "--strategy=fsdp")
    assert out.count("logs no greedy sample") == 1 and "step 2: val loss" in out
    run(tiny_checkpoint, prepared, tmp_path / "single", *common)
    assert_same_adapter(tmp_path / "fsdp/final", tmp_path / "single/final", **SAME)


def test_fsdp_resume_continues_exactly(tiny_checkpoint, prepared, tmp_path):
    # Dropout on: each process's RNG state is restored; the optimizer state is gathered, saved and re-sharded.
    common = ("--train.max_steps=4", "--train.save_interval=2", "--eval.interval=100", "--lora.dropout=0.1",
              "--strategy=fsdp")
    two_processes(tiny_checkpoint, prepared, tmp_path / "straight", *common)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "straight/step-000002", resumed / "step-000002")
    out = two_processes(tiny_checkpoint, prepared, resumed, *common, "--resume=auto")
    assert "at step 2" in out
    assert_same_adapter(tmp_path / "straight/final", resumed / "final", **SAME)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_nf4_base_two_processes_equal_one_process(nf4_checkpoint, prepared, tmp_path, strategy):
    common = (*ONE_STEP_EACH, "--quantize=nf4")
    two_processes(nf4_checkpoint, prepared, tmp_path / strategy, *common, f"--strategy={strategy}")
    run(nf4_checkpoint, prepared, tmp_path / "single", *common)
    assert_same_adapter(tmp_path / strategy / "final", tmp_path / "single/final", **SAME)


@pytest.mark.parametrize("overrides,words", [
    (["--devices=1"], ["strategy fsdp shards the model over processes", "strategy: auto", "devices: 2 or more"]),
    (["--devices=2", "--precision=16-mixed"], ["strategy fsdp does not take precision 16-mixed", "bf16-mixed"]),
    (["--devices=2", "--quantize=nf4"], ["layers.0.self_attn.q_proj.weight (rows 64, NF4 scale groups 1)",
                                         "over 2 processes", "strategy ddp"]),
], ids=["one-process", "16-mixed", "nf4-groups"])
def test_fsdp_settings_it_cannot_shard_are_one_line(monkeypatch, capsys, tiny_checkpoint, prepared, tmp_path,
                                                    overrides, words):
    code, _, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, prepared, tmp_path / "run"),
                           "--strategy=fsdp", *overrides)
    assert_error(code, err, *words)
    assert_not_written(tmp_path / "run")
