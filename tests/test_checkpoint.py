"""Checkpoint I/O: atomic directories, sharding, hashes, damaged checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, write_tiny_tokenizer

from lit_lora import checkpoint
from lit_lora.checkpoint import load_model, save_checkpoint, weight_files
from lit_lora.fileio import atomic_dir, sha256_file
from lit_lora.errors import UserError
from lit_lora.model import LLaMA


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")]


def test_exception_inside_atomic_dir_leaves_nothing(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert not out.exists() and not leftovers(tmp_path, "ckpt")


def test_atomic_dir_refuses_then_replaces(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "meta.json").write_text("1")  # one of ours: --overwrite may replace it
    with pytest.raises(UserError, match="--overwrite"):
        with atomic_dir(out):
            pass
    with pytest.raises(KeyboardInterrupt):  # a failed overwrite keeps the old directory intact
        with atomic_dir(out, overwrite=True) as tmp:
            raise KeyboardInterrupt
    assert (out / "meta.json").read_text() == "1"
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and not leftovers(tmp_path, "ckpt")


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_round_trip(tmp_path, tied):
    write_tiny_tokenizer(tmp_path / "tok")
    model = LLaMA(tiny_config(128, tie_embeddings=tied))
    model.init_weights(seed=3)
    out = save_checkpoint(tmp_path / "ckpt", model, tmp_path / "tok", source="test", max_shard_bytes=40_000)
    files = weight_files(out)
    assert len(files) > 2 and (out / checkpoint.WEIGHTS_INDEX).is_file()
    info = json.loads((out / checkpoint.CHECKPOINT_INFO).read_text())
    assert info["weights_sha256"] == {f.name: sha256_file(f) for f in files}
    assert (out / "tokenizer.json").is_file()
    loaded = load_model(out)
    assert loaded.config == model.config
    original = model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded.state_dict().items())
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied


def test_single_file_and_dtype(tmp_path, tiny_checkpoint):
    assert [f.name for f in weight_files(tiny_checkpoint)] == [checkpoint.WEIGHTS]
    model = load_model(tiny_checkpoint)
    out = save_checkpoint(tmp_path / "bf16", model, tiny_checkpoint, source="test", dtype=torch.bfloat16)
    assert json.loads((out / checkpoint.CHECKPOINT_INFO).read_text())["dtype"] == "bf16"
    assert load_model(out).embed_tokens.weight.dtype == torch.bfloat16


def test_damaged_checkpoints_are_user_errors(tmp_path, tiny_checkpoint):
    import shutil

    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nothing")
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    weights = broken / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        load_model(broken)
    weights.unlink()
    with pytest.raises(UserError, match="incomplete"):
        load_model(broken)
    (broken / checkpoint.MODEL_CONFIG).unlink()
    with pytest.raises(UserError, match="not a lit-lora checkpoint"):
        load_model(broken)
