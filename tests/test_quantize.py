"""QLoRA (NF4 base) and int8 decoding: what quantize.py promises, checked on the CPU (torchao's own tests mostly
skip without an accelerator)."""
from __future__ import annotations

import sys

import pytest
import torch
import yaml

from lit_lora.checkpoint import load_model
from lit_lora.errors import UserError
from lit_lora.quantize import (Int8Linear, is_nf4, nf4_bytes, quantization, scaler_block, to_int8,
                               to_nf4)
from test_finetune import TINY, prepared, run  # noqa: F401  (prepared is a fixture)
from test_memory_plan import stored_bytes

pytest.importorskip("torchao", reason="QLoRA needs torchao (the qlora extra)")



@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (64, 64)])
def test_nf4_holds_a_quarter_of_bf16_and_its_bytes_are_planned_exactly(shape):
    w = torch.randn(*shape)
    q = to_nf4("w", w)
    assert stored_bytes(q) == nf4_bytes(w.numel())
    assert stored_bytes(q) <= 0.3 * w.numel() * 2
    # 4-bit NormalFloat of a unit Gaussian: the mean error is a few percent of the weights' scale
    assert (q.get_original_weight() - w).abs().mean() < 0.1


def values_near_the_midpoints(dtype: torch.dtype, table: torch.Tensor) -> torch.Tensor:
    """Every bf16 or fp16 value in [-1, 1]; for fp32, 64 values on each side of each midpoint between codes."""
    if dtype != torch.float32:
        every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        return every[every.abs() <= 1]
    mids = ((table[:-1].double() + table[1:].double()) / 2).float()
    up, down, near = mids, mids, [mids]
    for _ in range(64):
        up, down = torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)
        near += [up, down]
    return torch.cat(near)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_our_nf4_quantiser_gives_torchaos_tensor_bit_for_bit(dtype):
    from lit_lora.quantize import torchao_nf4

    table = torchao_nf4()(torch.ones(64, dtype=dtype), 64, 1).nf4
    near = values_near_the_midpoints(dtype, table)
    near = torch.cat([near, near.new_zeros(-len(near) % 63)]).view(-1, 63)
    # each block: 63 of them and a 1, so that its absmax scaling leaves them as they are
    w = torch.cat([near, near.new_ones(len(near), 1)], dim=1).flatten()
    w = torch.cat([w, torch.zeros(64, dtype=dtype), torch.randn(-len(w) % 4096 + 4096).to(dtype)]).view(-1, 64)
    ours, theirs = to_nf4("w", w), torchao_nf4()(w, 64, scaler_block(len(w)))  # a zero block among them
    assert type(ours) is type(theirs) and ours.shape == w.shape and ours.dtype == dtype
    for inner in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4"):
        assert torch.equal(getattr(ours, inner), getattr(theirs, inner)), inner
    assert (ours.block_size, ours.n_blocks, ours.scaler_block_size) == (64, len(w), scaler_block(len(w)))


def test_scaler_block_divides_the_block_count():
    assert scaler_block(5184) == 216 and scaler_block(4096) == 256 and scaler_block(7) == 7


def test_nf4_refuses_what_it_cannot_hold():
    with pytest.raises(UserError, match="not a multiple of the NF4 block"):
        to_nf4("layers.0.mlp.up_proj.weight", torch.randn(10, 10))
    with pytest.raises(UserError, match="dequantises only into bf16, fp16 or fp32"):
        to_nf4("layers.0.mlp.up_proj.weight", torch.randn(64, 64).double())


def test_loading_nf4_quantises_only_the_blocks_linear_weights(tiny_checkpoint):
    model = load_model(tiny_checkpoint, quantize="nf4")
    kinds = {name: is_nf4(p) for name, p in model.named_parameters()}
    assert kinds["layers.0.self_attn.q_proj.weight"] and kinds["layers.1.mlp.down_proj.weight"]
    assert not kinds["embed_tokens.weight"] and not kinds["norm.weight"]
    assert not kinds["layers.0.input_layernorm.weight"]
    assert quantization(model) == "nf4" and quantization(load_model(tiny_checkpoint)) == "none"
    full = load_model(tiny_checkpoint)
    x = torch.randint(0, full.config.vocab_size, (1, 16))
    assert (model(x) - full(x)).abs().max() < 0.5 * full(x).abs().max()


def test_qlora_trains_records_nf4_and_resumes_exactly(tiny_checkpoint, prepared, tmp_path):  # noqa: F811
    common = ("--quantize=nf4", "--train.max_steps=4", "--train.save_interval=2")
    summary = run(tiny_checkpoint, prepared, tmp_path / "straight", *common)
    assert summary["last_train_loss"] < summary["first_train_loss"]
    meta = yaml.safe_load((tmp_path / "straight/final/adapter_config.yaml").read_text())
    assert meta["base_quantize"] == "nf4"
    run(tiny_checkpoint, prepared, tmp_path / "resumed", *common, "--train.max_steps=2")
    run(tiny_checkpoint, prepared, tmp_path / "resumed", *common, resume="auto")
    from test_finetune import assert_same_adapter

    assert_same_adapter(tmp_path / "straight/final", tmp_path / "resumed/final", rtol=0, atol=0)
    with pytest.raises(UserError, match="quantize nf4 -> none"):
        run(tiny_checkpoint, prepared, tmp_path / "resumed", "--train.max_steps=6", resume="auto")


def test_qlora_differs_from_lora_but_not_by_much(tiny_checkpoint, prepared, tmp_path):  # noqa: F811
    lora = run(tiny_checkpoint, prepared, tmp_path / "lora", "--train.max_steps=4")
    qlora = run(tiny_checkpoint, prepared, tmp_path / "qlora", "--train.max_steps=4", "--quantize=nf4")
    assert qlora["val_loss_last"] != lora["val_loss_last"]
    assert abs(qlora["val_loss_last"] - lora["val_loss_last"]) < 0.1 * lora["val_loss_last"]


def test_int8_linear_is_close_to_the_float_layer_and_follows_its_weight():
    lin = torch.nn.Linear(128, 96)
    q = Int8Linear(lin)
    x = torch.randn(3, 5, 128)
    assert (q(x) - lin(x)).abs().max() < 0.02 * lin(x).abs().max()
    with torch.no_grad():
        lin.weight.mul_(2)
    q.repack()
    assert (q(x) - lin(x)).abs().max() < 0.02 * lin(x).abs().max()
    assert q.int8.dtype == torch.int8 and "int8" not in dict(q.named_buffers())


def test_to_int8_swaps_every_block_linear(tiny_checkpoint):
    from lit_lora.fast_decode import prepare_for_generation

    model = to_int8(prepare_for_generation(load_model(tiny_checkpoint).eval(), pack=False))
    kinds = {type(m).__name__ for b in model.layers for m in (b.self_attn.qkv_proj, b.mlp.down_proj)}
    assert kinds == {"Int8Linear"}


@pytest.fixture(scope="module")
def qlora_adapter(tiny_checkpoint, prepared, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("qlora")
    run(tiny_checkpoint, prepared, out, "--quantize=nf4", "--train.max_steps=3", "--lora.targets=[query,value,down]")
    return out / "final"


def greedy(checkpoint, adapter, capsys, *options):
    from lit_lora.generate import Sampling, run_generate

    out = run_generate(checkpoint, prompt="Say the number 3.", lora_paths=[adapter] if adapter else [],
                       sampling=Sampling(max_new_tokens=8, temperature=0), stream=False, precision="32-true",
                       engine="torch", **dict(options))
    return out[0], capsys.readouterr().err


def test_a_qlora_adapter_answers_over_nf4_by_default_and_merges_into_the_dequantised_base(
        tiny_checkpoint, qlora_adapter, tmp_path, capsys):
    from lit_lora.merge import merge_checkpoint

    default, log = greedy(tiny_checkpoint, qlora_adapter, capsys)
    assert "quantize nf4: the base the adapter was trained over" in log
    assert greedy(tiny_checkpoint, qlora_adapter, capsys, ("quantize", "nf4"))[0] == default
    merged = merge_checkpoint(tiny_checkpoint, qlora_adapter, tmp_path / "merged")
    assert "merged into that base dequantised" in capsys.readouterr().err
    assert greedy(merged, None, capsys, ("quantize", "none"))[0] == default
    # the merged weights are the dequantised NF4 base plus the update, not the original base plus it
    base, out = load_model(tiny_checkpoint), load_model(merged)
    name = "layers.0.mlp.up_proj.weight"  # not adapted: only dequantised
    expected = to_nf4(name, base.get_parameter(name).detach()).get_original_weight()
    torch.testing.assert_close(out.get_parameter(name), expected)


def test_int8_and_nf4_decoding_answer_with_and_without_an_adapter(tiny_checkpoint, qlora_adapter, capsys):
    full = greedy(tiny_checkpoint, None, capsys)[0]
    assert greedy(tiny_checkpoint, None, capsys, ("quantize", "int8"))[0] == full  # the per-channel rounding is small
    assert isinstance(greedy(tiny_checkpoint, qlora_adapter, capsys, ("quantize", "int8"))[0], str)
    with pytest.raises(UserError, match="unknown --quantize 'int4'"):
        greedy(tiny_checkpoint, None, capsys, ("quantize", "int4"))
    with pytest.raises(UserError, match="is the torch engine's"):
        from lit_lora.llamacpp import choose_engine

        choose_engine("llama.cpp", tiny_checkpoint, [], None, None, "int8")


@pytest.mark.parametrize("override,words", [
    ("--quantize=int4", ["unknown quantize 'int4'", "none, nf4"]),
    ("--quantize=int8", ["int8 is for decoding", "train over nf4"]),
])
def test_a_quantisation_training_cannot_use_is_one_line(monkeypatch, capsys, tmp_path, tiny_checkpoint, prepared,
                                                        override, words):  # noqa: F811
    from conftest import run_cli
    from test_integrity import assert_error, assert_not_written, finetune_args

    code, out, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, prepared, tmp_path / "run"), override)
    assert_error(code, err, *words)
    assert_not_written(tmp_path / "run")


def test_nf4_without_torchao_is_one_line_naming_the_install(monkeypatch, capsys, tmp_path, tiny_checkpoint,
                                                            prepared):  # noqa: F811
    from conftest import run_cli
    from test_integrity import assert_error, assert_not_written, finetune_args

    for name in [m for m in list(sys.modules) if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    code, _, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, prepared, tmp_path / "run"),
                           "--quantize=nf4")
    assert_error(code, err, "needs torchao", "lit-lora[qlora]")
    assert_not_written(tmp_path / "run")
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--checkpoint_dir", tiny_checkpoint, "--prompt", "Hi",
                           "--quantize", "nf4", "--engine", "torch")
    assert_error(code, err, "needs torchao")


def test_compile_with_a_quantised_base_is_refused(tiny_checkpoint, capsys):
    with pytest.raises(UserError, match="--compile is not supported with --quantize int8"):
        greedy(tiny_checkpoint, None, capsys, ("quantize", "int8"), ("compile", True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_our_nf4_product_is_torchaos_bit_for_bit_forward_and_backward(dtype):
    from lit_lora.quantize import dequantized, linear

    weight = to_nf4("w", torch.randn(192, 576).to(dtype))
    assert torch.equal(dequantized(weight), weight.get_original_weight())
    x = torch.randn(2, 5, 576, dtype=dtype, requires_grad=True)
    ours = linear(x, weight)
    ours.sum().backward()
    ours_grad, x.grad = x.grad, None
    theirs = torch.nn.functional.linear(x, weight)  # torchao's own NF4 path
    theirs.sum().backward()
    assert torch.equal(ours, theirs) and torch.equal(ours_grad, x.grad)


def test_a_loaded_nf4_model_multiplies_through_our_product(tiny_checkpoint):
    from lit_lora.quantize import NF4Linear

    model = load_model(tiny_checkpoint, quantize="nf4")
    assert isinstance(model.layers[0].self_attn.q_proj, NF4Linear) and type(model.lm_head) is torch.nn.Linear
