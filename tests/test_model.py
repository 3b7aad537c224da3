"""The model: presets, HF config round trip, KV-cache decoding, building on the meta device."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from lit_lora import checkpoint
from lit_lora.checkpoint import load_model
from lit_lora.fileio import iter_safetensors
from lit_lora.errors import UserError
from lit_lora.convert.hf import config_from_hf, config_to_hf
from lit_lora.model import ACTIVATIONS, LLaMA, Config, gated
from lit_lora.presets import PRESETS


def random_model(seed: int = 0, **overrides) -> LLaMA:
    model = LLaMA(tiny_config(96, **overrides)).eval()
    model.init_weights(seed)
    return model


def test_smollm2_preset_has_the_published_size():
    with torch.device("meta"):
        model = LLaMA(Config.from_name("smollm2-135m"))
    n = sum(p.numel() for p in model.parameters())  # tied head counted once by parameters()
    assert 134e6 < n < 135e6
    assert all(p.is_meta for p in model.parameters())


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="known presets"):
        Config.from_name("gpt-5")


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_config_round_trip(name):
    config = Config.from_name(name)
    assert config_from_hf(config_to_hf(config), name=name) == config


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_kv_cache_decode_matches_full_forward(n_kv_heads):
    model = random_model(n_kv_heads=n_kv_heads, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16.0})
    idx = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(0))  # batch > 1
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=3, max_len=32)
        prefill = 5
        steps = [model(idx[:, :prefill], torch.arange(prefill))]
        for t in range(prefill, idx.shape[1]):
            steps.append(model(idx[:, t:t + 1], torch.tensor([t])))
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
    with pytest.raises(ValueError, match="input_pos"):
        model(idx)
    model.set_kv_cache(0)
    assert model.cache_len == 0 and model.layers[0].self_attn.kv_cache is None


def saved_bytes(fn, *inputs) -> int:
    """Bytes autograd keeps for the backward pass of fn(*inputs) (each storage once, the inputs' own counted)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs).sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_gated_product_keeps_two_tensors_and_the_same_gradients(activation):
    act = ACTIVATIONS[activation]
    g = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(3, 5, 32, generator=g) for _ in range(3))
    ours = [t.clone().requires_grad_() for t in (gate, up)]
    plain = [t.clone().requires_grad_() for t in (gate, up)]
    y = gated(act, *ours)
    y.backward(grad)
    expected = act(plain[0]) * plain[1]
    expected.backward(grad)
    assert torch.equal(y, expected)
    for a, b in zip(ours, plain):  # the same kernels in the same order: bit for bit
        assert torch.equal(a.grad, b.grad)
    one = gate.numel() * gate.element_size()
    assert saved_bytes(lambda a, b: gated(act, a, b), *ours) == 2 * one  # gate and up; autograd keeps act(gate) too
    assert saved_bytes(lambda a, b: act(a) * b, *plain) == 3 * one


def test_batch_rows_are_independent():
    model = random_model()
    idx = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both, first = model(idx), model(idx[:1])
    assert (both[:1] - first).abs().max() < 1e-5


def test_load_builds_on_meta_and_never_initialises(tiny_checkpoint, monkeypatch):
    initialised_on = []  # devices of the tensors the layers' default init touches
    for name in ("kaiming_uniform_", "normal_", "uniform_"):
        original = getattr(torch.nn.init, name)

        def spy(tensor, *args, _original=original, **kwargs):
            initialised_on.append(tensor.device.type)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, spy)
    model = load_model(tiny_checkpoint)
    assert initialised_on and set(initialised_on) == {"meta"}  # no random weights were ever allocated
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    assert model.lm_head.weight is model.embed_tokens.weight  # tied after loading
    saved = dict(iter_safetensors(tiny_checkpoint / checkpoint.WEIGHTS))
    assert all(torch.equal(params[k], v) for k, v in saved.items())


def test_load_in_another_dtype(tiny_checkpoint):
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert model(idx).dtype == torch.bfloat16
