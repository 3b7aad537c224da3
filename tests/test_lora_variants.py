"""LoRA variants: DoRA (against its definition and against PEFT), LoRA+ learning rates, rsLoRA through PEFT."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from adapter_helpers import make_adapter
from conftest import run_cli
from test_finetune import prepared, run  # noqa: F401  (fixtures)
from test_merge_export import IDX, hf_model, model_with_adapter

from lit_lora.adapter import load_adapter
from lit_lora.checkpoint import load_model
from lit_lora.errors import UserError
from lit_lora.export import export_hf, export_peft
from lit_lora.lora import LoRAConfig, LoRALinear, apply_lora, merged_weight
from lit_lora.merge import merge_checkpoint
from lit_lora.train_config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def dora_layer(bias: bool = True, dropout: float = 0.0) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 16, bias=bias), r=4, scaling=2.0, dropout=dropout, dora=True)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
        layer.lora_magnitude.mul_(1 + 0.1 * torch.randn(16))
    return layer


def test_dora_starts_as_the_base_and_follows_its_definition():
    torch.manual_seed(0)
    base, x = nn.Linear(24, 16), torch.randn(3, 5, 24)
    fresh = LoRALinear(base, r=4, scaling=2.0, dropout=0.1, dora=True).train()
    assert torch.equal(fresh(x), base(x))  # B = 0 and m = ||W||: exactly the base, dropout or not
    layer = dora_layer().eval()
    W = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    expected = F.linear(x, layer.lora_magnitude[:, None] * W / W.norm(dim=1, keepdim=True), layer.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
    merged = merged_weight(layer.weight, layer.lora_A, layer.lora_B, layer.scaling, magnitude=layer.lora_magnitude)
    torch.testing.assert_close(F.linear(x, merged, layer.bias), layer(x), atol=1e-6, rtol=1e-5)


def test_dora_treats_the_norm_as_a_constant_in_the_backward_pass():
    layer, x = dora_layer(), torch.randn(2, 24)
    layer(x).square().sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude)]
    A, B, m = (p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude))
    W = layer.weight.detach() + layer.scaling * B @ A
    y = F.linear(x, (m / W.norm(dim=1).detach())[:, None] * W, layer.bias.detach())
    y.square().sum().backward()
    for ours, theirs in zip(grads, (A.grad, B.grad, m.grad)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_dora_merged_equals_unmerged_and_peft_gives_our_logits(tiny_checkpoint, tmp_path):
    from peft import PeftModel

    adapter = make_adapter(tiny_checkpoint, tmp_path / "dora", targets=("attention", "down"), variant="dora")
    with torch.no_grad():
        ours = model_with_adapter(tiny_checkpoint, adapter)(IDX)
        merged = load_model(merge_checkpoint(tiny_checkpoint, adapter, tmp_path / "merged")).eval()(IDX)
        assert (ours - load_model(tiny_checkpoint).eval()(IDX)).abs().max() > 1e-2  # the adapter does something
        torch.testing.assert_close(merged, ours, atol=1e-5, rtol=1e-5)
        export_peft(adapter, tmp_path / "peft", base_model_name_or_path="tiny")
        export_hf(tiny_checkpoint, tmp_path / "hf")
        theirs = PeftModel.from_pretrained(hf_model(tmp_path / "hf"), tmp_path / "peft").eval()(IDX).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
        # and back: the PEFT DoRA adapter read as ours
        torch.testing.assert_close(model_with_adapter(tiny_checkpoint, tmp_path / "peft")(IDX), ours,
                                   atol=1e-5, rtol=1e-5)


def test_dora_trains_and_is_refused_where_it_cannot_go(tiny_checkpoint, prepared, tmp_path, monkeypatch, capsys):
    run(tiny_checkpoint, prepared, tmp_path / "run", "--lora.variant=dora", "--train.max_steps=3",
        "--train.learning_rate=0.01", "--lora.dropout=0.1")
    adapter = tmp_path / "run" / "final"
    base = apply_lora(load_model(tiny_checkpoint), LoRAConfig(r=8, variant="dora"))
    _, state, meta = load_adapter(adapter)
    start = dict(base.named_parameters())
    assert meta["variant"] == "dora"
    assert any(not torch.equal(t, start[n]) for n, t in state.items() if n.endswith("lora_magnitude"))
    capsys.readouterr()  # the training run's output
    code, out, err = run_cli(monkeypatch, capsys, "export-gguf", "--lora_path", str(adapter),
                             "--out", str(tmp_path / "a.gguf"))
    assert code == 2 and "DoRA" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "a.gguf").exists()
    other = make_adapter(tiny_checkpoint, tmp_path / "other")
    with pytest.raises(UserError, match="merge it alone"):
        merge_checkpoint(tiny_checkpoint, [adapter, other], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(UserError, match="head"):
        LoRAConfig(variant="dora", targets=["query", "head"])
    with pytest.raises(UserError, match="variant"):
        LoRAConfig(variant="lora-fa")


def test_lora_plus_gives_b_its_ratio_of_the_learning_rate(tiny_checkpoint, prepared, tmp_path):
    """AdamW's first step moves every parameter with a gradient by about its learning rate; at B = 0 only B has
    one, so B's largest move is the ratio times larger with LoRA+."""
    moves = {}
    for ratio in (None, 16):
        out = tmp_path / f"r{ratio}"
        run(tiny_checkpoint, prepared, out, "--train.max_steps=1", "--train.warmup_steps=0", "--lora.dropout=0",
            "--train.learning_rate=0.001", f"--train.lora_plus_ratio={'null' if ratio is None else ratio}")
        _, state, _ = load_adapter(out / "final")
        moves[ratio] = max(t.abs().max().item() for n, t in state.items() if n.endswith("lora_B"))
    assert moves[16] / moves[None] == pytest.approx(16, rel=0.02)
    with pytest.raises(UserError, match="did you mean train.lora_plus_ratio"):
        load_config(None, ["--optimizer.lora_plus_ratio", "16"])  # where the issue named it
    with pytest.raises(UserError, match="lora_plus_ratio"):
        run(tiny_checkpoint, prepared, tmp_path / "rNone", "--train.max_steps=2", "--train.lora_plus_ratio=4",
            resume="auto")
    state_file = tmp_path / "rNone" / "final" / "training_state.pt"  # as saved before LoRA+ existed: no ratio
    state = torch.load(state_file, weights_only=False)
    del state["lora_plus_ratio"]
    torch.save(state, state_file)
    with pytest.raises(UserError, match="lora_plus_ratio None -> 4"):
        run(tiny_checkpoint, prepared, tmp_path / "rNone", "--train.max_steps=2", "--train.lora_plus_ratio=4",
            resume="auto")


def test_rslora_through_peft_gives_the_trained_models_logits(tiny_checkpoint, prepared, tmp_path):
    from peft import PeftModel

    run(tiny_checkpoint, prepared, tmp_path / "run", "--lora.use_rslora=true", "--train.max_steps=3",
        "--train.learning_rate=0.05", "--lora.r=16", "--lora.dropout=0")
    adapter = tmp_path / "run" / "final"
    export_peft(adapter, tmp_path / "peft")
    export_hf(tiny_checkpoint, tmp_path / "hf")
    with torch.no_grad():
        ours = model_with_adapter(tiny_checkpoint, adapter)(IDX)
        theirs = PeftModel.from_pretrained(hf_model(tmp_path / "hf"), tmp_path / "peft").eval()(IDX).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_dora_over_an_nf4_base_starts_as_it_and_follows_the_dequantised_weight():
    pytest.importorskip("torchao")
    from lit_lora.quantize import dequantized, to_nf4

    torch.manual_seed(0)
    base = nn.Linear(128, 64, bias=False)
    base.weight = nn.Parameter(to_nf4("w", base.weight.detach().bfloat16()), requires_grad=False)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4, scaling=2.0, dropout=0.0, dora=True).eval()
    start = layer(x)
    with torch.no_grad():
        assert torch.equal(start, F.linear(x, dequantized(base.weight)))  # exactly the NF4 base
        layer.lora_B.normal_(std=0.1)
        W = dequantized(base.weight, torch.float32) + layer.scaling * layer.lora_B @ layer.lora_A
        expected = F.linear(x.float(), layer.lora_magnitude[:, None] * W / W.norm(dim=1, keepdim=True))
        assert (layer(x).float() - start.float()).abs().max() > 0.1  # B moved the output
        torch.testing.assert_close(layer(x).float(), expected, atol=2e-2, rtol=2e-2)  # bf16 activations
