"""The tokenizer over both backends: HF tokenizer.json and a SentencePiece model trained right here."""
from __future__ import annotations

import io
import json

import pytest
from conftest import SPECIAL_TOKENS, write_tiny_tokenizer

from lit_lora.errors import UserError
from lit_lora.tokenizer import Tokenizer

TEXT = "The capital of France is Paris. Give three tips for staying healthy!"


def test_huggingface_tokenizer(tmp_path):
    write_tiny_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    assert tok.backend == "huggingface"
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
    assert tok.encode(TEXT, bos=True, eos=True) == [1, *ids, 2]
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.encode(special) == [i]  # one id each, never split into pieces
    chat = tok.encode("<|im_start|>user\nhello<|im_end|>")
    assert chat[0] == 1 and chat[-1] == 2 and 1 not in chat[1:-1]
    assert tok.decode(chat) == "user\nhello"
    assert tok.decode(chat, skip_special=False) == "<|im_start|>user\nhello<|im_end|>"
    assert tok.encode_batch([TEXT, "hello"]) == [ids, tok.encode("hello")]


def train_sentencepiece(directory, vocab_size=400) -> None:
    import sentencepiece as spm

    corpus = [TEXT, "Below is an instruction that describes a task.", "Write a response that completes it.",
              "The quick brown fox jumps over the lazy dog.", "hello world, translate the following sentence"] * 30
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], byte_fallback=True, minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())


def test_sentencepiece_tokenizer(tmp_path):
    train_sentencepiece(tmp_path)
    tok = Tokenizer(tmp_path)
    assert tok.backend == "sentencepiece"
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)  # SentencePiece's defaults: <s> 1, </s> 2
    ids = tok.encode(TEXT)
    assert ids[0] == 1 and tok.decode(ids) == TEXT
    assert tok.encode(TEXT, bos=False, eos=True) == [*ids[1:], 2]
    assert tok.decode(tok.encode("Zürich ✓", bos=False)) == "Zürich ✓"  # byte fallback: nothing lost
    start = tok.token_to_id("<|im_start|>")
    ids = tok.encode("user<|im_start|>assistant", bos=False)
    assert start is not None and ids.count(start) == 1  # one id, not split into "<", "|", ...
    assert tok.decode(ids) == "user<|im_start|>assistant"
    assert tok.token_to_id("<not-a-piece>") is None


def test_sentencepiece_special_ids_from_config(tmp_path):
    train_sentencepiece(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}))
    tok = Tokenizer(tmp_path)
    assert tok.bos_id == tok.token_to_id("<|im_start|>") and tok.eos_id == tok.token_to_id("<|im_end|>")
    assert tok.encode(TEXT)[0] != tok.bos_id


def test_no_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        Tokenizer(tmp_path)
