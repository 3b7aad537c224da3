"""--device: a device the machine lacks is one line and exit code 2 before anything loads; cpu is today's path."""
from __future__ import annotations

import pytest
import torch
from adapter_helpers import make_adapter
from conftest import run_cli, snapshot
from test_integrity import assert_error

from lit_lora.device import resolve_device
from lit_lora.errors import UserError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def commands(checkpoint, adapter, tmp_path) -> dict[str, list]:
    """Every command that takes --device, with arguments that would otherwise run."""
    return {
        "generate": ["generate", "--checkpoint_dir", checkpoint, "--prompt", "hi", "--max_new_tokens", 2],
        "chat": ["chat", "--checkpoint_dir", checkpoint],
        "evaluate": ["evaluate", "--checkpoint_dir", checkpoint, "--data", tmp_path / "data.json"],
        "merge-lora": ["merge-lora", "--checkpoint_dir", checkpoint, "--lora_path", adapter, "--out", tmp_path / "m"],
        "export-gguf": ["export-gguf", "--checkpoint_dir", checkpoint, "--out", tmp_path / "m.gguf"],
    }


@no_cuda
@pytest.mark.parametrize("command", ["generate", "chat", "evaluate", "merge-lora", "export-gguf"])
@pytest.mark.parametrize("device,words", [("cuda", ["--device cuda", "no CUDA device"]),
                                          ("cuda:1", ["--device cuda:1", "no CUDA device"]),
                                          ("tpu", ["unknown --device 'tpu'", "cuda:N"])])
def test_a_missing_device_is_one_line(monkeypatch, capsys, tmp_path, tiny_checkpoint, command, device, words):
    adapter = make_adapter(tiny_checkpoint, tmp_path / "adapter")
    (tmp_path / "data.json").write_text('[{"instruction": "a", "input": "", "output": "b"}]')
    before = snapshot(tmp_path, tiny_checkpoint)
    code, out, err = run_cli(monkeypatch, capsys, *commands(tiny_checkpoint, adapter, tmp_path)[command],
                             "--device", device)
    assert_error(code, err, *words)
    assert out == "" and snapshot(tmp_path, tiny_checkpoint) == before  # nothing written, nothing touched


@no_cuda
def test_auto_is_the_cpu_without_a_gpu():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="MPS"):
        resolve_device("mps")


def test_device_cpu_decodes_as_the_default(monkeypatch, capsys, tiny_checkpoint):
    args = ["generate", "--checkpoint_dir", tiny_checkpoint, "--prompt", "hello", "--max_new_tokens", 12,
            "--temperature", 0.9, "--seed", 4, "--precision", "32-true", "--engine", "torch"]
    runs = [run_cli(monkeypatch, capsys, *args, *extra)[:2] for extra in ([], ["--device", "cpu"])]
    assert runs[0] == runs[1] and runs[0][0] == 0 and runs[0][1].strip()
