"""Nothing lost, nothing silently wrong: damaged files and wrong values are one-line errors through the CLI.

Each case asserts the exit code, the one `error:` line, and that the files that existed before are still there,
unchanged (and that no output was created).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from adapter_helpers import make_adapter
from conftest import run_cli, snapshot

from lit_lora import fileio
from lit_lora.checkpoint import load_model
from lit_lora.data.prepare import prepare, split_indices
from lit_lora.errors import UserError
from lit_lora.fileio import iter_safetensors, sha256_file

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- helpers
def assert_error(code: int, err: str, *words: str, after_fabric: bool = False) -> None:
    """Exit code 2 and stderr exactly one `error:` line (after Lightning's "Seed set" line once Fabric started)."""
    assert code == 2, err
    lines = err.splitlines()
    if after_fabric:
        lines = [line for line in lines if not line.startswith("INFO: Seed set to")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and err.endswith("\n"), err
    for word in words:
        assert word in err, err


def assert_not_written(out: Path) -> None:
    assert not out.exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def flip_byte(path: Path, offset_from_end: int = 100) -> None:
    """Flip one bit of a weights byte (the data region, well past the header)."""
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory) -> Path:
    return make_adapter(tiny_checkpoint, tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture
def damaged_checkpoint(tiny_checkpoint, tmp_path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    flip_byte(ckpt / "model.safetensors")
    return ckpt


def generate_args(ckpt: Path, *extra) -> list:
    return ["generate", "--checkpoint_dir", ckpt, "--prompt", "hello", "--max_new_tokens", "2",
            "--temperature", "0", "--precision", "32-true", "--no-stream", *extra]


# ---------------------------------------------------------------------------------------------- checkpoint hashes
def test_damaged_checkpoint_is_refused_by_every_reader(monkeypatch, capsys, tmp_path, damaged_checkpoint, adapter):
    before = snapshot(damaged_checkpoint, adapter)
    commands = {
        "generate": generate_args(damaged_checkpoint),
        "merge-lora": ["merge-lora", "--checkpoint_dir", damaged_checkpoint, "--lora_path", adapter,
                       "--out", tmp_path / "merged"],
        "export-hf": ["export-hf", "--checkpoint_dir", damaged_checkpoint, "--out", tmp_path / "hf"],
    }
    for name, args in commands.items():
        code, out, err = run_cli(monkeypatch, capsys, *args)
        assert_error(code, err, str(damaged_checkpoint / "model.safetensors"), "damaged", "sha256", "--no-verify")
        assert out == "", name
    assert_not_written(tmp_path / "merged")
    assert_not_written(tmp_path / "hf")
    assert snapshot(damaged_checkpoint, adapter) == before


def test_no_verify_skips_the_checkpoint_check(monkeypatch, capsys, tmp_path, damaged_checkpoint):
    code, out, err = run_cli(monkeypatch, capsys, "export-hf", "--checkpoint_dir", damaged_checkpoint,
                             "--out", tmp_path / "hf", "--no-verify")
    assert code == 0 and "wrote" in out, err
    code, out, err = run_cli(monkeypatch, capsys, *generate_args(damaged_checkpoint, "--no-verify"))
    assert code == 0, err
    load_model(damaged_checkpoint, verify=False)
    with pytest.raises(UserError, match="model.safetensors is damaged"):
        load_model(damaged_checkpoint)


def test_intact_checkpoint_passes_and_a_damaged_checkpoint_json_is_one_line(monkeypatch, capsys, tmp_path,
                                                                           tiny_checkpoint):
    load_model(tiny_checkpoint)  # verified: no error
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "checkpoint.json").write_text('{"weights_sha256": ')
    before = snapshot(ckpt)
    code, _, err = run_cli(monkeypatch, capsys, "export-hf", "--checkpoint_dir", ckpt, "--out", tmp_path / "hf")
    assert_error(code, err, "checkpoint.json", "damaged", "convert or download the checkpoint again")
    assert_not_written(tmp_path / "hf")
    assert snapshot(ckpt) == before


@pytest.mark.parametrize("key,value", [("vocab_size", 100), ("hidden_dim", 96)])
def test_a_config_that_does_not_fit_the_weights_is_one_line(monkeypatch, capsys, tmp_path, tiny_checkpoint, key,
                                                            value):
    """A model_config.yaml whose sizes are not the weights' (edited, or converted before convert-hf compared them):
    loading crashed in torch, and export-hf wrote a directory transformers cannot load."""
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    config = yaml.safe_load((ckpt / "model_config.yaml").read_text())
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump({**config, key: value}))
    before = snapshot(ckpt)
    for args in (generate_args(ckpt), ["export-hf", "--checkpoint_dir", ckpt, "--out", tmp_path / "hf"]):
        code, out, err = run_cli(monkeypatch, capsys, *args)
        assert_error(code, err, "model_config.yaml makes it", "convert the checkpoint again")
        assert out == ""
    assert_not_written(tmp_path / "hf")
    assert snapshot(ckpt) == before


def test_finetune_refuses_a_damaged_base(monkeypatch, capsys, tmp_path, damaged_checkpoint, prepared):
    before = snapshot(damaged_checkpoint, prepared)
    out_dir = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, *finetune_args(damaged_checkpoint, prepared, out_dir))
    assert_error(code, err, "model.safetensors", "damaged", "verify: false", after_fabric=True)
    assert_not_written(out_dir)
    assert snapshot(damaged_checkpoint, prepared) == before
    # The config key skips the check: the model loads (training itself is covered elsewhere).
    from lit_lora.finetune import build_model
    from lit_lora.train_config import load_config

    config = load_config(TINY, [f"--checkpoint_dir={damaged_checkpoint}", "--verify=false"])
    assert build_model(config)[0] is not None


# ---------------------------------------------------------------------------------------------- adapter hashes
def test_adapter_records_its_sha256(adapter):
    meta = yaml.safe_load((adapter / "adapter_config.yaml").read_text())
    assert meta["weights_sha256"] == sha256_file(adapter / "lora.safetensors")


def test_damaged_adapter_is_refused(monkeypatch, capsys, tmp_path, tiny_checkpoint, adapter):
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    flip_byte(broken / "lora.safetensors", offset_from_end=10)
    before = snapshot(broken, tiny_checkpoint)
    commands = {
        "generate": generate_args(tiny_checkpoint, "--lora_path", broken),
        "merge-lora": ["merge-lora", "--checkpoint_dir", tiny_checkpoint, "--lora_path", broken,
                       "--out", tmp_path / "merged"],
        "export-peft": ["export-peft", "--lora_path", broken, "--out", tmp_path / "peft"],
    }
    for name, args in commands.items():
        code, out, err = run_cli(monkeypatch, capsys, *args)
        assert_error(code, err, str(broken / "lora.safetensors"), "damaged", "--no-verify")
        assert out == "", name
    for out in ("merged", "peft"):
        assert_not_written(tmp_path / out)
    assert snapshot(broken, tiny_checkpoint) == before
    code, out, err = run_cli(monkeypatch, capsys, "export-peft", "--lora_path", broken, "--out", tmp_path / "peft",
                             "--no-verify")
    assert code == 0 and "wrote" in out, err


def test_adapter_without_recorded_hash_still_loads(monkeypatch, capsys, tmp_path, tiny_checkpoint, adapter):
    old = tmp_path / "old"
    shutil.copytree(adapter, old)
    meta = yaml.safe_load((old / "adapter_config.yaml").read_text())
    del meta["weights_sha256"]
    (old / "adapter_config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    code, out, err = run_cli(monkeypatch, capsys, "merge-lora", "--checkpoint_dir", tiny_checkpoint,
                             "--lora_path", old, "--out", tmp_path / "merged")
    assert code == 0 and "wrote" in out, err


# ---------------------------------------------------------------------------------------------- safetensors headers
def rewrite_header(path: Path, change) -> None:
    """Replace the JSON header of a safetensors file by change(header), keeping the data bytes."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def _first(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


HEADER_DAMAGE = {  # name: (change, words of the error)
    "absurd_shape": (lambda h: _first(h).update(shape=[2**40, 2**20]), ["needs", "bytes"]),
    "negative_shape": (lambda h: _first(h).update(shape=[-1, 64]), ["invalid shape"]),
    "float_shape": (lambda h: _first(h).update(shape=[1.5]), ["invalid shape"]),
    "unknown_dtype": (lambda h: _first(h).update(dtype="F128"), ["unknown dtype"]),
    "reversed_offsets": (lambda h: _first(h).update(data_offsets=_first(h)["data_offsets"][::-1]),
                         ["invalid data_offsets"]),
    "past_the_end": (lambda h: _first(h).update(data_offsets=[10**12, 10**12 + _first(h)["data_offsets"][1]
                                                              - _first(h)["data_offsets"][0]]), ["past the end"]),
    "overlapping": (lambda h: [v.update(data_offsets=[0, v["data_offsets"][1] - v["data_offsets"][0]])
                               for k, v in h.items() if k != "__metadata__"], ["overlap"]),
}


@pytest.mark.parametrize("damage", list(HEADER_DAMAGE))
def test_bad_safetensors_header_is_refused_before_allocating(monkeypatch, capsys, tmp_path, tiny_checkpoint, damage):
    change, words = HEADER_DAMAGE[damage]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    rewrite_header(ckpt / "model.safetensors", change)
    before = snapshot(ckpt)
    real_empty = torch.empty

    def guarded_empty(*shape, **kwargs):  # a header that slipped through would ask for far more than this
        size = shape[0] if len(shape) == 1 and isinstance(shape[0], (list, tuple, torch.Size)) else shape
        assert int(np.prod(size)) < 10**8, f"torch.empty{size} reached"
        return real_empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", guarded_empty)
    code, _, err = run_cli(monkeypatch, capsys, "export-hf", "--checkpoint_dir", ckpt, "--out", tmp_path / "hf",
                           "--no-verify")
    assert_error(code, err, str(ckpt / "model.safetensors"), *words)
    assert_not_written(tmp_path / "hf")
    assert snapshot(ckpt) == before


def test_streamed_hash_equals_the_file_hash(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint / "model.safetensors"
    names = [name for name, _ in iter_safetensors(path, sha256=sha256_file(path))]
    assert len(names) > 5
    with pytest.raises(UserError, match="is damaged"):
        list(iter_safetensors(path, sha256="0" * 64))


# ---------------------------------------------------------------------------------------------- prepared data
@pytest.fixture(scope="module")
def prepared(tiny_checkpoint, tmp_path_factory) -> Path:
    """24 records prepared with the tiny checkpoint's tokenizer (16 train, 8 val)."""
    root = tmp_path_factory.mktemp("data")
    records = [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."}
               for i in range(24)]
    (root / "records.json").write_text(json.dumps(records))
    prepare(tiny_checkpoint, root / "prepared", data_file=root / "records.json", format="alpaca", template="chatml",
            val_size=8, max_seq_length=64)
    return root / "prepared"


def finetune_args(ckpt: Path, data: Path, out: Path, *overrides: str) -> list:
    return ["finetune-lora", "--config", TINY, f"--checkpoint_dir={ckpt}", f"--data_dir={data}", f"--out_dir={out}",
            "--eval.max_new_tokens=2", *overrides]


def _save_split(path: Path, **tensors) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))


def _split(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


DATA_DAMAGE = {  # name: (change the prepared directory, words of the error)
    "truncated": (lambda d: (d / "train.safetensors").write_bytes((d / "train.safetensors").read_bytes()[:-50]),
                  ["train.safetensors", "past the end"]),
    "meta_not_json": (lambda d: (d / "meta.json").write_text('{"template": "chatml", '),
                      ["meta.json", "not valid JSON"]),
    "meta_not_object": (lambda d: (d / "meta.json").write_text("[1, 2]"), ["meta.json", "not a JSON object"]),
    "meta_lacks_keys": (lambda d: (d / "meta.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "meta.json").read_text()).items() if k != "tokenizer"})),
        ["meta.json lacks tokenizer"]),
    "tensor_missing": (lambda d: _save_split(d / "train.safetensors", **{
        k: v for k, v in _split(d / "train.safetensors").items() if k != "prompt_lengths"}),
        ["lacks the tensors prompt_lengths"]),
    "offsets_beyond_tokens": (lambda d: _save_split(d / "train.safetensors", **{
        **_split(d / "train.safetensors"), "offsets": _split(d / "train.safetensors")["offsets"] + 5}),
        ["offsets do not divide"]),
    "counts_disagree": (lambda d: _cut_last_example(d / "train.safetensors"), ["meta.json records"]),
    "mask_too_short": (lambda d: _save_split(d / "train.safetensors", **{
        **_split(d / "train.safetensors"), "targets": _split(d / "train.safetensors")["targets"][:-1]}),
        ["wrong shape"]),
}


def _cut_last_example(path: Path) -> None:
    """A consistent file with one example fewer: only meta.json's counts disagree with it."""
    arrays = _split(path)
    last = int(arrays["offsets"][-2])
    _save_split(path, tokens=arrays["tokens"][:last], targets=arrays["targets"][:last], offsets=arrays["offsets"][:-1],
                prompt_lengths=arrays["prompt_lengths"][:-1])


@pytest.mark.parametrize("damage", list(DATA_DAMAGE))
def test_damaged_prepared_data_says_prepare_again(monkeypatch, capsys, tmp_path, tiny_checkpoint, prepared, damage):
    change, words = DATA_DAMAGE[damage]
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    change(data)
    before = snapshot(data, tiny_checkpoint)
    code, _, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, data, tmp_path / "run"))
    assert_error(code, err, str(data), "damaged", "prepare it again", *words)
    assert_not_written(tmp_path / "run")
    assert snapshot(data, tiny_checkpoint) == before


def test_data_from_an_older_version_says_prepare_again(monkeypatch, capsys, tmp_path, tiny_checkpoint, prepared):
    """Format 1 had no per-token mask: reading it as if it had one would train on the wrong tokens."""
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    for split in ("train", "val"):
        _save_split(data / f"{split}.safetensors", **{k: v for k, v in _split(data / f"{split}.safetensors").items()
                                                        if k != "targets"})
    before = snapshot(data, tiny_checkpoint)
    code, _, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, data, tmp_path / "run"))
    assert_error(code, err, str(data), "older lit-lora", "format 1", "prepare it again", "--overwrite")
    assert_not_written(tmp_path / "run")
    assert snapshot(data, tiny_checkpoint) == before


# ---------------------------------------------------------------------------------------------- config values
CONFIG_MISTAKES = [  # (override, words of the error)
    ("--train.grad_clip=-1", ["train.grad_clip must be > 0", "null to disable"]),
    ("--train.grad_clip=0", ["train.grad_clip must be > 0"]),
    ("--train.max_steps=0", ["train.max_steps must be >= 1", "untrained adapter"]),
    ("--train.epochs=0", ["train.epochs must be >= 1"]),
    ("--train.learning_rate=-0.001", ["train.learning_rate must be > 0"]),
    ("--train.learning_rate=.nan", ["train.learning_rate must be > 0"]),
    ("--train.min_lr=-1", ["train.min_lr must be >= 0"]),
    ("--train.warmup_steps=-1", ["train.warmup_steps must be >= 0"]),
    ("--train.weight_decay=-0.1", ["train.weight_decay must be >= 0"]),
    ("--train.betas=[0.9, 1.0]", ["train.betas must be two numbers in [0, 1)"]),
    ("--train.betas=[-0.1, 0.9]", ["train.betas must be two numbers in [0, 1)"]),
    ("--devices=0", ["devices must be >= 1"]),
    ("--num_nodes=0", ["num_nodes must be >= 1"]),
    ("--eval.interval=0", ["eval.interval must be >= 1"]),
    ("--eval.max_new_tokens=0", ["eval.max_new_tokens must be >= 1"]),
    ("--eval.max_batches=0", ["eval.max_batches must be >= 1"]),
    ("--accelerator=tpux", ["accelerator 'tpux' is not one of"]),
]


@pytest.mark.parametrize("override,words", CONFIG_MISTAKES, ids=[c[0] for c in CONFIG_MISTAKES])
def test_wrong_config_values_are_refused_when_loaded(monkeypatch, capsys, tmp_path, tiny_checkpoint, prepared,
                                                     override, words):
    before = snapshot(prepared)
    code, out, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, prepared, tmp_path / "run"),
                             override)
    assert_error(code, err, *words)
    assert out == ""
    assert_not_written(tmp_path / "run")
    assert snapshot(prepared) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("override,words", [
    ("--accelerator=cuda", ["accelerator cuda needs a CUDA GPU", "accelerator: cpu"]),
    ("--accelerator=gpu", ["accelerator gpu needs a CUDA GPU", "accelerator: cpu"]),
])
def test_hardware_the_machine_lacks_is_one_line(monkeypatch, capsys, tmp_path, tiny_checkpoint, prepared, override,
                                               words):
    monkeypatch.delenv("LIT_LORA_AUTO_PRECISION")  # precision auto would probe and say so: not before this error
    code, out, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, prepared, tmp_path / "run"),
                             override, "--precision=auto")
    assert_error(code, err, *words)
    assert_not_written(tmp_path / "run")
    # --dry-run still prints such a config: it may be meant for another machine.
    code, out, _ = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, prepared, tmp_path / "run"),
                           override, "--dry-run")
    assert code == 0 and override.split("=")[1] in out


def test_empty_validation_split_trains_without_a_fake_val_loss(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(8)]
    (tmp_path / "records.json").write_text(json.dumps(records))
    data = tmp_path / "data"
    code, _, err = run_cli(monkeypatch, capsys, "prepare-json", "--checkpoint_dir", tiny_checkpoint, "--data_file",
                           tmp_path / "records.json", "--destination", data, "--val_size", "0", "--template", "chatml")
    assert code == 0, err
    out_dir = tmp_path / "run"
    code, out, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, data, out_dir,
                                                                 "--train.max_steps=2", "--eval.interval=1"))
    assert code == 0, err
    assert (out + err).count("no validation examples") == 1, out + err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["val_loss_first"] is None and summary["val_loss_last"] is None
    assert ",val," not in (out_dir / "metrics.csv").read_text()
    assert (out_dir / "final" / "lora.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- duplicates
def _examples(directory: Path, split: str) -> list[tuple]:
    arrays = _split(directory / f"{split}.safetensors")
    o = arrays["offsets"]
    return [tuple(arrays["tokens"][o[i]:o[i + 1]]) for i in range(len(o) - 1)]


def test_duplicates_are_counted_and_kept_on_one_side(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(30)]
    records += [dict(records[3]), dict(records[3]), dict(records[7]), dict(records[12]),
                {**records[20], "input": "<noinput>"}]  # a placeholder input is no input: the same record
    (tmp_path / "records.json").write_text(json.dumps(records))
    outs = []
    for name in ("a", "b"):
        code, out, err = run_cli(monkeypatch, capsys, "prepare-json", "--checkpoint_dir", tiny_checkpoint,
                                 "--data_file", tmp_path / "records.json", "--destination", tmp_path / name,
                                 "--val_size", "10", "--template", "chatml")
        assert code == 0, err
        assert "warning: 5 of 35 records repeat an earlier record" in err, err
        outs.append(snapshot(tmp_path / name))
    assert [v and v[0] for v in outs[0].values()] == [v and v[0] for v in outs[1].values()]  # byte-identical
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["counts"]["duplicates"] == 5 and meta["counts"]["examples"] == 35
    train, val = _examples(tmp_path / "a", "train"), _examples(tmp_path / "a", "val")
    assert not set(train) & set(val)
    assert len(train) + len(val) == 35 and len(val) <= 10


def test_split_without_duplicates_is_unchanged():
    for n, val_size, seed in ((10, 2, 42), (1000, 200, 7), (57, 0, 1)):
        order = np.random.default_rng(seed).permutation(n)  # the split before duplicates were grouped
        splits = split_indices(n, val_size, None, seed)
        assert np.array_equal(splits["val"], np.sort(order[:val_size]))
        assert np.array_equal(splits["train"], np.sort(order[val_size:]))
        grouped = split_indices(n, val_size, None, seed, groups=list(range(n)))
        assert all(np.array_equal(grouped[k], splits[k]) for k in splits)


# ---------------------------------------------------------------------------------------------- convert-hf
LLAMA_FIELDS = {"vocab_size": 384, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


@pytest.mark.parametrize("architectures,model_type", [
    (["GPT2LMHeadModel"], "llama"),
    (["LlamaForCausalLM"], "gpt2"),
    (["LlamaForCausalLM", "GPT2LMHeadModel"], "llama"),
])
def test_convert_hf_refuses_a_contradictory_config(monkeypatch, capsys, tmp_path, architectures, model_type):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**LLAMA_FIELDS, "architectures": architectures,
                                                 "model_type": model_type}))
    before = snapshot(src)
    code, _, err = run_cli(monkeypatch, capsys, "convert-hf", src, "--out", tmp_path / "ckpt")
    assert_error(code, err, "contradicts", repr(model_type), architectures[-1])
    assert_not_written(tmp_path / "ckpt")
    assert snapshot(src) == before


# ---------------------------------------------------------------------------------------------- bad-input sweep
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_outputs_get_the_modes_the_umask_gives(monkeypatch, capsys, tmp_path, tiny_checkpoint, umask):
    """safetensors writes its files 0o600: weights others (a server, a colleague) cannot read."""
    (tmp_path / "records.json").write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}."}
                                                       for i in range(6)]))
    before = os.umask(umask)
    try:
        code, _, err = run_cli(monkeypatch, capsys, "prepare-json", "--checkpoint_dir", tiny_checkpoint,
                               "--data_file", tmp_path / "records.json", "--destination", tmp_path / "data",
                               "--val_size", "2", "--template", "chatml")
        make_adapter(tiny_checkpoint, tmp_path / "adapter")
        fileio.write_json(tmp_path / "result.json", {"loss": 1.0})
    finally:
        os.umask(before)
    assert code == 0, err
    outputs = [tmp_path / "data", tmp_path / "adapter", tmp_path / "result.json"]
    modes = {str(p): oct(p.stat().st_mode & 0o777) for root in outputs for p in [root, *root.rglob("*")]}
    assert {p for p in modes if p.endswith(".safetensors")} and {p for p in modes if p.endswith("meta.json")}
    assert modes == {p: oct((0o777 if Path(p).is_dir() else 0o666) & ~umask) for p in modes}


@pytest.fixture
def unreadable(monkeypatch):
    """unreadable(path): opening `path` fails as it does for a file without read permission (even as root)."""
    import builtins

    real, denied = builtins.open, set()

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and str(file) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    return lambda path: denied.add(str(path))


def test_unreadable_weights_are_a_permission_error_not_damage(monkeypatch, capsys, tmp_path, tiny_checkpoint,
                                                              adapter, prepared, unreadable):
    before = snapshot(adapter, prepared)
    unreadable(adapter / "lora.safetensors")
    code, out, err = run_cli(monkeypatch, capsys, *generate_args(tiny_checkpoint, "--lora_path", adapter))
    assert_error(code, err, f"permission denied: {adapter / 'lora.safetensors'}; fix its permissions")
    assert "damaged" not in err and "trusted" not in err and out == ""
    unreadable(prepared / "train.safetensors")  # memory-mapped, not read
    code, _, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, prepared, tmp_path / "run"))
    assert_error(code, err, f"permission denied: {prepared / 'train.safetensors'}; fix its permissions",
                 after_fabric=True)
    assert "damaged" not in err
    assert_not_written(tmp_path / "run")
    assert snapshot(adapter, prepared) == before


@pytest.fixture(scope="module")
def finished_run(tiny_checkpoint, prepared, tmp_path_factory) -> Path:
    """Read-only: a complete 6-step run on `prepared` (step-000003, final/); copy it first."""
    from lit_lora.finetune import finetune
    from lit_lora.train_config import load_config

    out = tmp_path_factory.mktemp("run") / "out"
    finetune(load_config(TINY, finetune_args(tiny_checkpoint, prepared, out)[3:]))
    return out


def test_unreadable_training_state_stops_resume_instead_of_skipping_it(monkeypatch, capsys, tmp_path,
                                                                       tiny_checkpoint, prepared, finished_run,
                                                                       unreadable):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "final")  # interrupted after step-000003
    before = snapshot(out)
    unreadable(out / "step-000003" / "training_state.pt")
    code, stdout, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, prepared, out),
                                "--resume", "auto")
    assert_error(code, err, f"permission denied: {out / 'step-000003' / 'training_state.pt'}")
    assert "damaged" not in stdout + err
    assert snapshot(out) == before


def test_destination_names_near_the_length_limit(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    """A 250-byte name is allowed; its temporary sibling would be 261 bytes, over the 255 limit, uncut."""
    (tmp_path / "records.json").write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}."}
                                                       for i in range(6)]))
    out = tmp_path / ("d" * 250)
    args = ["prepare-json", "--checkpoint_dir", tiny_checkpoint, "--data_file", tmp_path / "records.json",
            "--destination", out, "--val_size", "2", "--template", "chatml"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and (out / "meta.json").is_file(), err
    fileio.write_json(tmp_path / ("r" * 250), {"loss": 1.0})
    assert json.loads((tmp_path / ("r" * 250)).read_text()) == {"loss": 1.0}
    # A killed write's temporary directory is recognised by its cut name, and cleaned up; another's is not.
    dead = subprocess.Popen(["true"])
    dead.wait()
    left, other = fileio.sibling(out, "tmp", dead.pid), fileio.sibling(out.with_name("d" * 249 + "e"), "tmp", dead.pid)
    for path in (left, other):
        path.mkdir()
        (path / "meta.json").write_text("half")
    assert left != other and len(left.name.encode()) <= 255 and len(other.name.encode()) <= 255
    code, _, err = run_cli(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0 and f"removed {left}, left by an interrupted write (process {dead.pid})" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, other.name, "r" * 250, "records.json"])
    for name in ("é" * 125, "d" * 255):  # 250 bytes in two-byte characters; the longest name there is
        assert len(fileio.sibling(tmp_path / name, "old", 4194304).name.encode()) <= 255


def _config_file(path: Path, text: str, tmp_path: Path) -> Path:
    path.write_text(f"out_dir: {tmp_path / 'run'}\n{text}")
    return path


@pytest.mark.parametrize("text,words", [
    ("train:\n  max_steps: 3\n  micro_batch_size: 2\n  max_steps: 5\n",
     ["line 5, column 3: the key 'max_steps' appears twice in one mapping (first on line 3)"]),
    ("seed: 1\nseed: 2\n", ["line 3, column 1: the key 'seed' appears twice"]),
    ("train:\n  max_steps: 3\n   x: [1, 2\n", ["line 4, column 5: mapping values are not allowed here"]),
    ("eval:\n  prompt: \"unclosed\n", ["line 4, column 1: found unexpected end of stream"]),
])
def test_config_file_mistakes_are_one_line_with_the_line(monkeypatch, capsys, tmp_path, text, words):
    config = _config_file(tmp_path / "config.yaml", text, tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "finetune-lora", "--config", config, "--dry-run")
    assert_error(code, err, f"{config} is not valid YAML: ", *words)
    assert out == "" and snapshot(tmp_path) == before
    assert_not_written(tmp_path / "run")


def test_a_string_override_is_the_text_as_written(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "finetune-lora", "--config", TINY, "--out_dir", "0123",
                             "--eval.prompt=yes", "--data_dir", "1e3", "--lora.r", "16", "--train.learning_rate",
                             "3e-4", "--train.epochs=null", "--dry-run")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert (resolved["out_dir"], resolved["eval"]["prompt"], resolved["data_dir"]) == ("0123", "yes", "1e3")
    assert (resolved["lora"]["r"], resolved["train"]["learning_rate"], resolved["train"]["epochs"]) == (16, 3e-4, None)
    code, out, err = run_cli(monkeypatch, capsys, "finetune-lora", "--config", TINY, "--out_dir=", "--dry-run")
    assert_error(code, err, "out_dir is empty")
    assert list(tmp_path.iterdir()) == []


def _prepare_records(root: Path, checkpoint: Path, records: list[dict]) -> Path:
    root.mkdir()
    (root / "records.json").write_text(json.dumps(records))
    prepare(checkpoint, root / "prepared", data_file=root / "records.json", format="alpaca", template="chatml",
            val_size=8, max_seq_length=64)
    return root / "prepared"


def test_resume_on_other_data_is_refused_before_anything_is_written(monkeypatch, capsys, tmp_path, tiny_checkpoint,
                                                                    prepared, finished_run):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "final")
    records = [{"instruction": f"Name the number {i}.", "input": "", "output": f"It is {i}."} for i in range(24)]
    other = _prepare_records(tmp_path / "other", tiny_checkpoint, records)
    before = snapshot(out, other)
    code, _, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, other, out), "--resume", "auto")
    assert_error(code, err, f"cannot resume from {out}/step-000003: it was trained with other settings (data_dir "
                            f"{other} holds other data than the run was trained on (its meta.json differs in "
                            f"source, ", "choose another out_dir")
    assert snapshot(out, other) == before  # config.yaml too
    # The same records prepared the same way elsewhere are the same data: the run continues on them.
    shutil.copy(prepared.parent / "records.json", tmp_path / "records.json")
    copy = _prepare_records(tmp_path / "copy", tiny_checkpoint, json.loads((tmp_path / "records.json").read_text()))
    code, stdout, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, copy, out), "--resume", "auto")
    assert code in (0, None) and f"resuming from {out}/step-000003 at step 3" in stdout, err


def _hold(directory: Path) -> subprocess.Popen:
    """Another process holding the lock on `directory`, as a running finetune-lora does."""
    code = ("import sys, time; from lit_lora.fileio import hold_lock\n"
            "with hold_lock(sys.argv[1], 'out_dir'):\n    print('held', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_run_on_one_out_dir_is_refused_and_a_killed_ones_lock_is_not(monkeypatch, capsys, tmp_path,
                                                                              tiny_checkpoint, prepared):
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        before = snapshot(out)
        code, stdout, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, prepared, out))
        assert_error(code, err, f"out_dir {out} is in use by process {holder.pid} on {socket.gethostname()}, "
                                f"which holds {out / fileio.LOCK_FILE}; wait for it to finish or choose another out_dir")
        assert stdout == "" and snapshot(out) == before and [p.name for p in out.iterdir()] == [fileio.LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    # Killed: its lock file is still there, its lock went with it.
    assert (out / fileio.LOCK_FILE).read_text() == f"{holder.pid} {socket.gethostname()}\n"
    code, _, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_checkpoint, prepared, out, "--train.max_steps=2"))
    assert code in (0, None), err
    assert (out / "final" / "lora.safetensors").is_file() and not (out / fileio.LOCK_FILE).exists()


@pytest.mark.parametrize("bf16,fp32,choice", [
    (1.0, 75.0, "32-true"),  # no bf16 instructions
    (40.0, 40.0, "32-true"),  # a tie: a busy machine measured both alike
    (48.0, 40.0, "32-true"),  # faster, but within what load makes of a tie
    (52.0, 40.0, "bf16-mixed"),  # 1.3x
    (390.0, 120.0, "bf16-mixed"),  # avx512_bf16
])
def test_precision_auto_keeps_fp32_unless_bf16_is_clearly_faster(monkeypatch, bf16, fp32, choice):
    from lit_lora import device

    assert device.cpu_precision(bf16, fp32) == choice
    monkeypatch.setattr(device, "probe_gflops", lambda: (bf16, fp32))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    picked, why = device.auto_precision("cpu")
    assert picked == choice and f"multiplies at {bf16:.1f} GFLOP/s in bf16 and {fp32:.1f} in fp32" in why


PEFT = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("config,words", [
    ([1, 2], ["is not a PEFT adapter config: it holds an array, not a JSON object"]),
    ("x", ["is not a PEFT adapter config: it holds a string"]),
    ({**PEFT, "r": "x"}, ["is not a PEFT adapter config: r must be a whole number >= 1, got 'x'"]),
    ({**PEFT, "r": 4.5}, ["r must be a whole number >= 1, got 4.5"]),
    ({k: v for k, v in PEFT.items() if k != "lora_alpha"}, ["lora_alpha must be a number, got nothing"]),
    ({**PEFT, "lora_dropout": "0.1"}, ["lora_dropout must be a number in [0, 1), got '0.1'"]),
    ({**PEFT, "target_modules": "q_proj"}, ["unsupported target_modules 'q_proj'; expected a list of"]),
    ({**PEFT, "target_modules": [["q_proj"]]}, ["unsupported target_modules [['q_proj']]"]),
])
def test_malformed_peft_adapter_config_is_one_line(monkeypatch, capsys, tmp_path, tiny_checkpoint, config, words):
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps(config))
    before = snapshot(peft)
    code, out, err = run_cli(monkeypatch, capsys, *generate_args(tiny_checkpoint, "--lora_path", peft))
    assert_error(code, err, str(peft / "adapter_config.json"), *words)
    assert out == "" and snapshot(peft) == before


def test_the_same_adapter_is_the_same_bytes_in_every_process(tiny_checkpoint, tmp_path):
    """The recorded sha256 of an adapter depends only on its tensors: no map written in a per-process random order."""
    script = ("import sys; sys.path.insert(0, sys.argv[3]); from pathlib import Path; "
              "from adapter_helpers import make_adapter; make_adapter(Path(sys.argv[1]), Path(sys.argv[2]))")
    files = []
    for name in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", script, str(tiny_checkpoint), str(tmp_path / name),
                        str(Path(__file__).parent)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        files.append((tmp_path / name / "lora.safetensors").read_bytes())
    assert files[0] == files[1] == files[2]
