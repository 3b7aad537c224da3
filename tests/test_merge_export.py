"""merge-lora, export-hf, export-peft and PEFT adapter import, checked against transformers and peft."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from adapter_helpers import make_adapter
from conftest import make_tiny_checkpoint, run_cli, snapshot

from lit_lora.adapter import ADAPTER_CONFIG, load_adapter
from lit_lora.checkpoint import iter_weights, load_info, load_model
from lit_lora.errors import UserError
from lit_lora.export import export_hf, export_peft
from lit_lora.generate import Sampling, run_generate
from lit_lora.lora import apply_lora, load_lora_state_dict
from lit_lora.merge import merge_checkpoint

IDX = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61, 77, 12]])


def model_with_adapter(checkpoint_dir, lora_path, dtype=None):
    """The base with the adapter applied the training way: unmerged LoRALinear layers."""
    lora_config, state, _ = load_adapter(lora_path)
    model = apply_lora(load_model(checkpoint_dir, dtype), lora_config, dtype=dtype or torch.float32).eval()
    load_lora_state_dict(model, state)
    return model


def hf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def untied_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("untied") / "tiny", seed=1, tie_embeddings=False)


@pytest.mark.parametrize("tied", [True, False])
def test_export_hf_logits_parity(tmp_path, tiny_checkpoint, untied_checkpoint, tied):
    checkpoint = tiny_checkpoint if tied else untied_checkpoint
    export_hf(checkpoint, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == 2 and config["torch_dtype"] == "float32"
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    with torch.no_grad():
        ours = load_model(checkpoint).eval()(IDX)
        theirs = hf_model(tmp_path / "hf")(IDX).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_export_peft_logits_parity_through_peft_model(tmp_path, untied_checkpoint):
    from peft import PeftModel

    adapter = make_adapter(untied_checkpoint, tmp_path / "adapter", targets=("query", "value", "down", "head"))
    export_peft(adapter, tmp_path / "peft", base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj", "v_proj", "down_proj", "lm_head"]
    export_hf(untied_checkpoint, tmp_path / "hf")
    with torch.no_grad():
        ours = model_with_adapter(untied_checkpoint, adapter)(IDX)
        base = hf_model(tmp_path / "hf")
        plain = base(IDX).logits
        theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()(IDX).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapter changes something
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_peft_adapter_import_parity(tmp_path, tiny_checkpoint):
    """An adapter made by peft itself (random tensors, no training) gives peft's logits in our model."""
    from peft import LoraConfig, PeftModel, get_peft_model

    export_hf(tiny_checkpoint, tmp_path / "hf")
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj"], use_rslora=True,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf_model(tmp_path / "hf"), config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = peft_model.eval()(IDX).logits
        ours_unmerged = model_with_adapter(tiny_checkpoint, tmp_path / "peft")(IDX)
    torch.testing.assert_close(ours_unmerged, theirs, atol=1e-5, rtol=1e-5)
    # merge-lora reads it too, and round-trips through export-peft unchanged
    with pytest.warns(UserWarning, match="no base content hash"):  # PEFT records no hash of our base
        merge_checkpoint(tiny_checkpoint, tmp_path / "peft", tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "merged").eval()(IDX), theirs, atol=1e-4, rtol=1e-4)
    export_peft(tmp_path / "peft", tmp_path / "peft2")
    _, a, _ = load_adapter(tmp_path / "peft")
    _, b, _ = load_adapter(tmp_path / "peft2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equivalence_and_dtype(tmp_path, dtype):
    base = make_tiny_checkpoint(tmp_path / "base", dtype=dtype)
    adapter = make_adapter(base, tmp_path / "adapter", targets=("attention", "gate"))
    merged = merge_checkpoint(base, adapter, tmp_path / "merged")
    assert load_info(merged)["dtype"] == load_info(base)["dtype"]
    merged_model = load_model(merged).eval()
    assert all(p.dtype == dtype for p in merged_model.parameters())  # no silent upcast
    with torch.no_grad():
        expected = model_with_adapter(base, adapter).eval()(IDX).float()
        got = merged_model(IDX).float()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2 * expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)
    if dtype == torch.float32:  # same greedy text: merged checkpoint alone vs base + adapter
        sampling = Sampling(max_new_tokens=16, temperature=0)
        a = run_generate(merged, "hello world", sampling=sampling, precision="32-true", stream=False)
        b = run_generate(base, "hello world", lora_paths=[adapter], sampling=sampling, precision="32-true", stream=False)
        assert a == b


def test_merge_dtype_option_converts(tmp_path, tiny_checkpoint):
    adapter = make_adapter(tiny_checkpoint, tmp_path / "adapter")
    merged = merge_checkpoint(tiny_checkpoint, adapter, tmp_path / "merged", dtype="bf16")
    assert load_info(merged)["dtype"] == "bf16"
    assert all(p.dtype == torch.bfloat16 for p in load_model(merged).parameters())


def test_adapter_for_another_base_is_refused(tmp_path, tiny_checkpoint):
    other = make_tiny_checkpoint(tmp_path / "other", seed=5)  # same shapes, other weights
    adapter = make_adapter(other, tmp_path / "adapter")
    with pytest.raises(UserError, match="another checkpoint"):
        merge_checkpoint(tiny_checkpoint, adapter, tmp_path / "merged")
    wider = make_tiny_checkpoint(tmp_path / "wider", hidden_dim=96)
    with pytest.raises(UserError, match="hidden_dim"):
        merge_checkpoint(tiny_checkpoint, make_adapter(wider, tmp_path / "adapter2"), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_cli_merge_and_exports(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    adapter = make_adapter(tiny_checkpoint, tmp_path / "adapter")
    code, out, _ = run_cli(monkeypatch, capsys, "merge-lora", "--checkpoint_dir", tiny_checkpoint,
                           "--lora_path", adapter, "--out", tmp_path / "merged")
    assert code == 0 and "wrote" in out
    code, _, _ = run_cli(monkeypatch, capsys, "export-hf", "--checkpoint_dir", tmp_path / "merged", "--out", tmp_path / "hf")
    assert code == 0 and (tmp_path / "hf" / "model.safetensors").is_file()
    code, _, _ = run_cli(monkeypatch, capsys, "export-peft", "--lora_path", adapter, "--out", tmp_path / "peft")
    assert code == 0 and (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    # corrupt adapter file: clean one-line error, nothing written
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    data = (broken / "lora.safetensors").read_bytes()
    (broken / "lora.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(monkeypatch, capsys, "merge-lora", "--checkpoint_dir", tiny_checkpoint,
                           "--lora_path", broken, "--out", tmp_path / "merged2")
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and "lora.safetensors" in err
    assert not (tmp_path / "merged2").exists()


def test_adapters_merge_in_order_as_one_merge_after_another(tmp_path, tiny_checkpoint):
    """W + s1 B1 A1 + s2 B2 A2 summed in fp32 is, on an fp32 base, bit for bit merging A and then B into that (each
    rounding is an fp32 one either way); the adapters overlap on query."""
    a = make_adapter(tiny_checkpoint, tmp_path / "a", seed=1, targets=("attention", "gate"))
    b = make_adapter(tiny_checkpoint, tmp_path / "b", seed=2, targets=("query", "up"), r=2)
    both = merge_checkpoint(tiny_checkpoint, [a, b], tmp_path / "both")
    first = merge_checkpoint(tiny_checkpoint, a, tmp_path / "first")
    on_first = tmp_path / "b-on-first"  # B's tensors, recorded for the checkpoint A was merged into
    shutil.copytree(b, on_first)
    config = yaml.safe_load((on_first / ADAPTER_CONFIG).read_text())
    config["base_content_hash"] = load_info(first)["content_hash"]
    (on_first / ADAPTER_CONFIG).write_text(yaml.safe_dump(config))
    chained = dict(iter_weights(merge_checkpoint(first, on_first, tmp_path / "chained")))
    merged = dict(iter_weights(both))
    assert merged.keys() == chained.keys() and all(torch.equal(merged[k], chained[k]) for k in merged)
    assert not all(torch.equal(merged[k], t) for k, t in iter_weights(first))  # B changed something
    info = load_info(both)
    assert info["source"] == f"merge-lora: {tiny_checkpoint} + {a} + {b}" and info["template"] == "chatml"


# ---------------------------------------------------------------------------------------------- bad input
def test_adapters_that_cannot_be_merged_together_are_one_line(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    chatml = make_adapter(tiny_checkpoint, tmp_path / "chatml", seed=1)
    alpaca = make_adapter(tiny_checkpoint, tmp_path / "alpaca", seed=2, template="alpaca")
    foreign = make_adapter(make_tiny_checkpoint(tmp_path / "other", seed=5), tmp_path / "foreign")
    cases = [
        ([chatml, alpaca], f"the adapters were trained in different prompt formats ({chatml}: template chatml; "
                           f"{alpaca}: template alpaca); merge only adapters trained in the same format"),
        ([chatml, foreign], "the adapter was trained on another checkpoint than"),
    ]
    for adapters, message in cases:
        before = snapshot(tmp_path, tiny_checkpoint)
        code, out, err = run_cli(monkeypatch, capsys, "merge-lora", "--checkpoint_dir", tiny_checkpoint,
                                 *[x for path in adapters for x in ("--lora_path", path)], "--out", tmp_path / "merged")
        assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert snapshot(tmp_path, tiny_checkpoint) == before and not (tmp_path / "merged").exists()
