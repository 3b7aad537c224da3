"""LoRA: a no-op at init, exact merge and restore, only LoRA trains, the adapter is exactly the LoRA tensors."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from lit_lora.adapter import merge_adapter, restore_weights
from lit_lora.errors import UserError
from lit_lora.lora import LoRAConfig, LoRALinear, apply_lora, lora_layers, lora_state_dict, mark_only_lora_as_trainable
from lit_lora.model import LLaMA

IDX = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))


def base_model(**overrides) -> LLaMA:
    model = LLaMA(tiny_config(96, **overrides)).eval()
    model.init_weights(seed=0)
    return model


def randomise_lora(model: LLaMA) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


def logits(model: LLaMA) -> torch.Tensor:
    with torch.no_grad():
        return model(IDX)


def test_unchanged_at_init():
    model = base_model()
    before = logits(model)
    apply_lora(model, LoRAConfig(targets=["attention", "mlp"], dropout=0.0))
    assert torch.equal(logits(model), before)


def test_merge_agrees_with_unmerged_and_restore_is_exact():
    config = LoRAConfig(targets=["query", "value", "down"], dropout=0.0)
    lora_model = apply_lora(base_model(), config)
    randomise_lora(lora_model)
    unmerged = logits(lora_model)
    assert (unmerged - logits(base_model())).abs().max() > 1e-3  # the update really changes the output
    plain = base_model()
    original = plain.layers[0].self_attn.q_proj.weight.detach().clone()
    originals = merge_adapter(plain, config, {k: v.detach() for k, v in lora_state_dict(lora_model).items()})
    assert (logits(plain) - unmerged).abs().max() < 1e-5
    restore_weights(plain, originals)
    assert torch.equal(plain.layers[0].self_attn.q_proj.weight, original)
    assert torch.equal(logits(plain), logits(base_model()))


def test_only_lora_trains():
    model = base_model()
    apply_lora(model, LoRAConfig(targets=["query", "value"]))
    mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    model.train()
    model(IDX).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert all(model.get_parameter(n).grad is not None for n in trainable)


@pytest.mark.parametrize("targets", [["query", "value"], ["attention", "mlp"], ["key", "output", "head"]])
def test_state_dict_holds_exactly_the_lora_tensors(targets):
    model = base_model(tie_embeddings=False)
    config = LoRAConfig(r=4, targets=targets)
    apply_lora(model, config)
    state = lora_state_dict(model)
    assert set(state) == {n for n in dict(model.named_parameters()) if "lora_A" in n or "lora_B" in n}
    expected = 0
    for layer in lora_layers(model):
        expected += config.r * (layer.in_features + layer.out_features)
    n_targets = sum(1 if t == "head" else model.config.n_layers for t in config.targets)
    assert len(state) == 2 * n_targets == 2 * len(lora_layers(model))
    assert sum(t.numel() for t in state.values()) == expected


def test_apply_lora_shares_base_weights():
    model = base_model()
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    apply_lora(model, LoRAConfig(targets=["attention", "mlp"]))
    after = {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    assert after == ptrs  # same names, same storage: nothing copied
    assert isinstance(model.layers[0].self_attn.q_proj, LoRALinear)


def test_scaling_and_config_errors():
    assert LoRAConfig(r=16, alpha=16).scaling == 1.0
    assert LoRAConfig(r=16, alpha=16, use_rslora=True).scaling == pytest.approx(16 / math.sqrt(16))
    assert LoRAConfig(targets=["attention"]).targets == ["query", "key", "value", "output"]
    with pytest.raises(UserError, match="unknown LoRA target"):
        LoRAConfig(targets=["qkv"])
    with pytest.raises(UserError, match="tied"):
        apply_lora(base_model(tie_embeddings=True), LoRAConfig(targets=["head"]))


def test_lora_dropout_drops_at_rate_p_keeps_the_mean_and_routes_gradient_through_kept_inputs():
    from lit_lora.lora import LoRADropout

    torch.manual_seed(0)
    dropout = LoRADropout(0.1).train()
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - 0.1) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01
    y.sum().backward()
    assert torch.equal(x.grad == 0, dropped) and torch.allclose(x.grad[~dropped], y[~dropped])
    assert torch.equal(dropout.eval()(x), x)  # identity when evaluating
