"""Shared fixtures: a tiny tokenizer and model the tests build themselves, and the real model when reachable."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from lit_lora.checkpoint import save_checkpoint
from lit_lora.model import LLaMA, Config

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nGive three tips for staying healthy.\n\n### Input:\n\n### Response:",
    "Eat a balanced diet, exercise regularly and sleep well. The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}",
    "user assistant system hello world translate summarise classify the following sentence",
]


def write_tiny_tokenizer(directory: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE tokenizer.json trained on a few sentences, with ChatML specials, in HF's file layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "add_bos_token": False, "chat_template": CHATML,
    }))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def tiny_config(vocab_size: int, **overrides) -> Config:
    base = dict(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                max_seq_len=256, rope_base=10000.0, tie_embeddings=True, name="tiny")
    return Config(**{**base, **overrides})


def make_tiny_checkpoint(directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A random tiny LLaMA saved in our checkpoint format with the tiny tokenizer."""
    from lit_lora.tokenizer import Tokenizer

    tok_dir = directory.parent / f".{directory.name}-tokenizer"
    write_tiny_tokenizer(tok_dir)
    model = LLaMA(tiny_config(Tokenizer(tok_dir).vocab_size, **overrides))
    model.init_weights(seed)
    return save_checkpoint(directory, model.to(dtype), tok_dir, source="tests: random tiny model")


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lit-lora ARGS`, run in this process (a subprocess would import torch again)."""
    from lit_lora import cli

    monkeypatch.setattr(sys, "argv", ["lit-lora", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    captured = capsys.readouterr()
    return exit_.value.code or 0, captured.out, captured.err


def snapshot(*roots: Path) -> dict[tuple[int, str], tuple[str, int] | None]:
    """What a refused command must leave unchanged: under each root, every directory and every file's sha256 and
    modification time (a rewrite with the same bytes shows). Keys are relative, so two roots can be compared."""
    return {(i, str(p.relative_to(root))): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            if p.is_file() else None for i, root in enumerate(map(Path, roots)) for p in sorted(root.rglob("*"))}


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models run faster on one thread; and no `precision: auto` probe (nor its line on stderr)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("LIT_LORA_AUTO_PRECISION", "32-true")
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def torch_engine_by_default(request, monkeypatch):
    """`--engine auto` (generate's and chat's default) decodes with llama.cpp where it is installed. The torch engine
    is the reference the other tests pin down, so outside test_export_gguf (which tests llama.cpp, and auto's choice
    of it) auto finds no llama.cpp in this process."""
    if request.module.__name__ != "test_export_gguf":
        monkeypatch.setattr("lit_lora.llamacpp.available", lambda: False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Read-only: tests must not write into it (copy it first)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """Read-only: the real SmolLM2-135M-Instruct, imported once by our `download` into the cache and reused
    across runs ($LIT_LORA_CACHE/checkpoints/smollm2-135m-instruct). Skips when it cannot be downloaded."""
    from lit_lora.checkpoint import MODEL_CONFIG
    from lit_lora.download import cache_dir, download
    from lit_lora.errors import UserError

    out = cache_dir() / "checkpoints" / "smollm2-135m-instruct"
    if not (out / MODEL_CONFIG).is_file():
        try:
            download("smollm2-135m-instruct", out)
        except UserError as e:
            if not (out / MODEL_CONFIG).is_file():  # another test session may have just finished it
                pytest.skip(f"real model unavailable: {e}")
    return out
