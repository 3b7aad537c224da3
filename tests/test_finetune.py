"""finetune-lora on a tiny random model: outputs, accumulation and DDP equivalence, exact resume, signals, errors."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_lora.data.prepare import prepare
from lit_lora.errors import UserError
from lit_lora.finetune import finetune
from lit_lora.train_config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "tiny.yaml"
# Tiny matrices run far faster on one thread than on two contended ones (OpenMP spin-waits).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tiny_checkpoint, tmp_path_factory) -> Path:
    """40 short, repetitive records (32 train, 8 val) prepared with the tiny checkpoint's tokenizer."""
    root = tmp_path_factory.mktemp("data")
    records = [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}. " * (1 + i % 3)}
               for i in range(40)]
    (root / "records.json").write_text(json.dumps(records))
    prepare(tiny_checkpoint, root / "prepared", data_file=root / "records.json", format="alpaca", template="chatml",
            val_size=8, max_seq_length=64)
    return root / "prepared"


def tiny_args(checkpoint: Path, data: Path, out: Path, *overrides: str) -> list[str]:
    return [f"--checkpoint_dir={checkpoint}", f"--data_dir={data}", f"--out_dir={out}",
            "--eval.max_new_tokens=2", *overrides]


def run(checkpoint: Path, data: Path, out: Path, *overrides: str, resume: str | None = None) -> dict:
    return finetune(load_config(TINY, tiny_args(checkpoint, data, out, *overrides)), resume)


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "lora.safetensors"))


def assert_same_adapter(a: Path, b: Path, **tol) -> None:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys()
    for name in x:
        torch.testing.assert_close(x[name], y[name], **tol)


def test_end_to_end_writes_outputs_and_lowers_the_loss(tiny_checkpoint, prepared, tmp_path):
    summary = run(tiny_checkpoint, prepared, tmp_path / "out")
    out = tmp_path / "out"
    for name in ("config.yaml", "metrics.csv", "summary.json", "loss.png", "final/lora.safetensors",
                 "final/adapter_config.yaml", "step-000003/training_state.pt"):
        assert (out / name).is_file(), name
    assert (out / "final/training_state.pt").is_file()  # so raising max_steps can continue the run
    assert summary["last_train_loss"] < summary["first_train_loss"] - 0.1
    assert summary["val_loss_last"] < summary["val_loss_first"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    tensors = adapter(out / "final")
    assert len(tensors) == 2 * 2 * 2 and all("lora_" in name for name in tensors)  # 2 layers x (q, v) x (A, B)
    assert summary["trainable_params"] == sum(t.numel() for t in tensors.values())
    assert summary["tokens_seen_with_padding"] >= summary["tokens_seen"] > 0


def test_gradient_accumulation_equals_one_big_batch(tiny_checkpoint, prepared, tmp_path):
    common = ("--train.max_steps=2", "--eval.interval=100", "--train.grad_clip=null")
    run(tiny_checkpoint, prepared, tmp_path / "accumulated", "--train.micro_batch_size=2", *common)
    run(tiny_checkpoint, prepared, tmp_path / "big", "--train.micro_batch_size=8", *common)
    assert_same_adapter(tmp_path / "accumulated/final", tmp_path / "big/final", rtol=1e-5, atol=1e-6)


def test_ddp_two_processes_equal_one_process(tiny_checkpoint, prepared, tmp_path):
    common = ("--train.max_steps=2", "--eval.interval=100", "--train.micro_batch_size=4")
    cmd = [sys.executable, "-m", "lit_lora.cli", "finetune-lora", "--config", str(TINY),
           *tiny_args(tiny_checkpoint, prepared, tmp_path / "ddp", *common, "--devices=2", "--strategy=ddp")]
    done = subprocess.run(cmd, env=ONE_THREAD, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    run(tiny_checkpoint, prepared, tmp_path / "single", *common)
    assert_same_adapter(tmp_path / "ddp/final", tmp_path / "single/final", rtol=1e-5, atol=1e-6)


def test_resume_continues_exactly(tiny_checkpoint, prepared, tmp_path):
    # Dropout on, and 6 steps of 8 over 32 examples cross an epoch: RNG and data order must both be restored.
    common = ("--lora.dropout=0.1", "--eval.interval=100")
    run(tiny_checkpoint, prepared, tmp_path / "straight", *common)
    summary = run(tiny_checkpoint, prepared, tmp_path / "resumed", *common,
                  resume=str(tmp_path / "straight/step-000003"))
    assert summary["steps_this_run"] == 3
    assert_same_adapter(tmp_path / "straight/final", tmp_path / "resumed/final", rtol=0, atol=0)


def test_sigint_saves_a_resumable_checkpoint(tiny_checkpoint, prepared, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lit_lora.cli", "finetune-lora", "--config", str(TINY),
           *tiny_args(tiny_checkpoint, prepared, out, "--train.max_steps=100000", "--train.save_interval=100000",
                      "--eval.interval=100000")]
    proc = subprocess.Popen(cmd, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.csv"
        if metrics.is_file() and metrics.read_text().count("\n") >= 4:  # header, val at step 0, two train steps
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    saved = sorted(out.glob("step-*/training_state.pt"))
    assert len(saved) == 1 and not (out / "final").exists()
    step = int(saved[0].parent.name.split("-")[1])
    summary = run(tiny_checkpoint, prepared, out, f"--train.max_steps={step + 2}", resume="auto")
    assert summary["steps"] == step + 2 and summary["steps_this_run"] == 2


@pytest.mark.parametrize("head", [{}, {"logits_scaling": 2.0, "final_softcap": 5.0}], ids=["plain", "granite-gemma2"])
def test_chunked_head_loss_matches_plain_cross_entropy(head):
    from lit_lora.loss import target_loss_sum
    from conftest import tiny_config
    from lit_lora.model import LLaMA

    torch.manual_seed(0)
    model = LLaMA(tiny_config(50, dim=16, n_heads=2, **head)).requires_grad_(False)
    targets = torch.randint(0, 50, (3, 7))
    targets[0, :3] = -100
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    ours = target_loss_sum(hidden, model, targets, chunk_size=4)  # 18 targets: 5 chunks
    (grad,) = torch.autograd.grad(ours, hidden)
    plain = torch.nn.functional.cross_entropy(model.logits(hidden).flatten(0, 1), targets.flatten(), reduction="sum")
    (expected,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(grad, expected)


def test_every_shipped_config_loads():
    configs = sorted(CONFIGS.glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        config = load_config(path)
        assert config.train.global_batch_size % config.train.micro_batch_size == 0, path


def test_config_mistakes_are_clear_errors():
    with pytest.raises(UserError, match="did you mean train.micro_batch_size"):
        load_config(TINY, ["--train.micro_bach_size", "2"])
    with pytest.raises(UserError, match="train.micro_batch_size must be int, got 'two'"):
        load_config(TINY, ["--train.micro_batch_size", "two"])
    with pytest.raises(UserError, match="lora.targets must be a list"):
        load_config(TINY, ["--lora.targets=query"])
    assert load_config(TINY, ["--train.learning_rate=1", "--lora.targets=[query]"]).train.learning_rate == 1.0


def test_bad_inputs_fail_before_training(tiny_checkpoint, prepared, tmp_path):
    with pytest.raises(UserError, match="holds no prepared train data"):
        run(tiny_checkpoint, tmp_path / "nowhere", tmp_path / "a")
    with pytest.raises(UserError, match=r"divisible by train.micro_batch_size \(3\)"):
        run(tiny_checkpoint, prepared, tmp_path / "b", "--train.micro_batch_size=3")
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(other / "tokenizer.json"))
    tok.add_tokens(["<extra>"])
    tok.save(str(other / "tokenizer.json"))
    with pytest.raises(UserError, match="prepared with another tokenizer"):
        run(other, prepared, tmp_path / "c")
    for out in ("a", "b", "c"):
        assert not (tmp_path / out).exists()  # nothing written before the checks pass


def test_non_finite_loss_stops_with_a_clear_message(tiny_checkpoint, prepared, tmp_path, monkeypatch):
    import lit_lora.finetune as ft

    real, calls = ft.segment_losses, []

    def nan_from_the_second_step(model, batch, rows, chunk_size):
        losses = real(model, batch, rows, chunk_size)
        calls.append(1)
        return [loss * float("nan") for loss in losses] if len(calls) >= 2 else losses

    monkeypatch.setattr(ft, "segment_losses", nan_from_the_second_step)
    with pytest.raises(UserError, match="training loss became nan at step 2.*the last good checkpoint is .*step-000001"):
        run(tiny_checkpoint, prepared, tmp_path / "out", "--train.micro_batch_size=8", "--train.save_interval=1",
            "--eval.interval=100")
    assert not (tmp_path / "out/final").exists()
