"""The memory plan (`finetune-lora --dry-run`): its arithmetic against what the model really holds."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import run_cli
from lit_lora.checkpoint import load_config, load_model
from lit_lora.lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable
from lit_lora.memory_plan import block_saved_bytes, plan, training_plan
from lit_lora.model import LLaMA, Config
from lit_lora.quantize import is_nf4
from lit_lora.train_config import TrainConfig, load_config as load_train_config
from test_integrity import TINY


def measured_block_bytes(config: Config, lora: LoRAConfig, batch: int, seq_len: int) -> int:
    """Distinct storages one real block saves for backward on the CPU (what the plan counts on meta)."""
    model = apply_lora(LLaMA(Config(**{**config.to_dict(), "n_layers": 1})), lora)
    mark_only_lora_as_trainable(model)
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(batch, seq_len, config.dim, requires_grad=True)
    pos = torch.arange(seq_len)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x, *model.rope(pos, torch.float32, local=False), None, pos)
    return sum(saved.values())


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, NF4's codes, scales and table included."""
    if is_nf4(t):
        parts = (t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean, t.nf4)
        return sum(p.numel() * p.element_size() for p in parts)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's weights by kind (nf4, and each dtype name): what the plan's rows must add up to."""
    sizes: dict[str, int] = {}
    for p in model.parameters():
        kind = "nf4" if is_nf4(p) else str(p.dtype).removeprefix("torch.")
        sizes[kind] = sizes.get(kind, 0) + stored_bytes(p)
    return sizes


@pytest.mark.parametrize("preset,targets", [("smollm2-135m", ["query", "value"]),
                                            ("qwen2.5-0.5b", ["attention", "mlp"]), ("gemma-3-1b", ["query", "value"])])
def test_the_counted_activations_are_what_a_real_block_saves_or_a_little_more(preset, targets):
    config = Config.from_name(preset, vocab_size=256)  # the vocabulary is not in a block: a small one builds faster
    lora = LoRAConfig(r=8, targets=targets, dropout=0.05)
    planned = block_saved_bytes(config, lora, 2, 64, torch.float32, torch.float32)
    real = measured_block_bytes(config, lora, 2, 64)
    assert real <= planned <= 1.4 * real


def test_weights_in_the_plan_are_the_bytes_the_loaded_model_holds(tiny_checkpoint):
    pytest.importorskip("torchao")
    config, lora = load_config(tiny_checkpoint), LoRAConfig(r=4)
    for quantize in ("none", "nf4"):
        planned = plan(config, lora, "32-true", quantize, 1, 64, False)
        weights = sum(b for what, b in planned.fixed if "base" in what or "embeddings" in what)
        assert weights == sum(weight_bytes(load_model(tiny_checkpoint, quantize=quantize)).values())


def test_checkpointing_and_nf4_shrink_the_plan_of_a_7b_to_what_fits_here():
    config, lora = Config.from_name("llama-2-7b"), LoRAConfig(r=8)
    full = plan(config, lora, "bf16-true", "none", 1, 256, False)
    qlora = plan(config, lora, "bf16-true", "nf4", 1, 256, True)
    assert qlora.total(True) < qlora.total(False) < full.total(False)
    base = dict(full.fixed)["base linear weights (bf16)"]
    assert dict(qlora.fixed)["base linear weights (nf4)"] <= 0.3 * base


def test_dry_run_prints_the_plan_of_a_preset_and_says_when_there_is_none(monkeypatch, capsys, tmp_path):
    code, out, _ = run_cli(monkeypatch, capsys, "finetune-lora", "--config", TINY, "--checkpoint_dir", "tinyllama-1.1b",
                           f"--data_dir={tmp_path}", "--quantize", "nf4", "--dry-run")
    assert code == 0 and "memory plan: TinyLlama" in out.replace("tinyllama", "TinyLlama")
    assert "base linear weights (nf4)" in out and "with gradient_checkpointing: true" in out
    assert "planned for the preset" in out
    code, out, err = run_cli(monkeypatch, capsys, "finetune-lora", "--config", TINY, "--checkpoint_dir",
                             tmp_path / "nothing", "--dry-run")
    assert code == 0 and "checkpoint_dir:" in out and "no memory plan" in out and "neither a checkpoint" in out


def test_a_preference_plan_holds_two_rows_per_pair(tmp_path):
    args = ["--checkpoint_dir=tinyllama-1.1b", f"--data_dir={tmp_path}", "--train.micro_batch_size=2",
            "--train.global_batch_size=4"]
    sft, doubled = (training_plan(load_train_config(TINY, args + extra))[0]
                    for extra in ([], ["--train.micro_batch_size=4"]))
    dpo, notes = training_plan(load_train_config(TINY, args + ["--method=dpo"]))
    assert dpo.total(False) == doubled.total(False) > sft.total(False)
    assert any("4 rows, a chosen and a rejected answer per pair" in note for note in notes)


FRAGMENTING = """
import sys, torch
from lit_lora.device import unmap_freed_memory
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
on = unmap_freed_memory() if sys.argv[1] == "on" else False
for _ in range(3):  # 2 MiB tensors freed between 256 KiB ones kept, as a forward and backward pass leave them
    kept, freed = [], []
    for _ in range(50):
        freed.append(torch.ones(512 * 1024))
        kept.append(torch.ones(64 * 1024))
    before = rss()
    del freed
    returned = (before - rss()) / (50 * 2**21)
print(on, returned)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_low_memory_returns_freed_tensors_to_the_system_where_glibc_keeps_them():
    def returned(setting: str) -> tuple[str, float]:
        done = subprocess.run([sys.executable, "-c", FRAGMENTING, setting], capture_output=True, text=True, check=True)
        on, share = done.stdout.split()
        return on, float(share)

    on, share = returned("on")
    assert on == "True" and share > 0.9  # glibc 2.36's default here returns none of it after the first round


def test_low_memory_is_on_by_default_where_the_run_chose_to_save_memory():
    def wants(quantize="none", checkpointing=False, low_memory=None) -> bool:
        config = TrainConfig(quantize=quantize)
        config.train.gradient_checkpointing, config.train.low_memory = checkpointing, low_memory
        return config.wants_low_memory()

    assert not wants() and wants(quantize="nf4") and wants(checkpointing=True) and wants(low_memory=True)
    assert not wants(quantize="nf4", low_memory=False)
