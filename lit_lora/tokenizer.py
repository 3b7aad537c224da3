"""One tokenizer class over a SentencePiece `tokenizer.model` or a Hugging Face `tokenizer.json`.

Special ids come from the checkpoint's own files: `tokenizer_config.json` (bos/eos strings, add_bos_token,
chat template) and `generation_config.json` (eos ids, possibly several). We never let the backend add
special tokens on its own; `encode(bos=..., eos=...)` decides, so prompts and labels are built explicitly.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lit_lora.errors import UserError


def token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


class Tokenizer:
    def __init__(self, checkpoint_dir: Path | str) -> None:
        directory = Path(checkpoint_dir)
        self.config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")
        model_config = _read_json(directory / "config.json")  # present in HF directories, absent in ours
        if (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self.backend = "huggingface"
            self.path = directory / "tokenizer.json"
            try:
                self.processor = HFTokenizer.from_file(str(self.path))
            except Exception as e:  # the tokenizers library raises plain Exceptions for bad files
                raise UserError(f"cannot read {self.path}: {e}") from None
            self.vocab_size = self.processor.get_vocab_size(with_added_tokens=True)
            default_bos = default_eos = None
            default_add_bos = self._post_processor_adds(self.config.get("bos_token"))
        elif (directory / "tokenizer.model").is_file():
            import sentencepiece as spm

            self.backend = "sentencepiece"
            self.path = directory / "tokenizer.model"
            try:
                self.processor = spm.SentencePieceProcessor(model_file=str(self.path))
            except (RuntimeError, OSError) as e:
                raise UserError(f"cannot read {self.path}: {e}") from None
            self.vocab_size = self.processor.vocab_size()
            default_bos, default_eos = self.processor.bos_id(), self.processor.eos_id()
            default_add_bos = True
        else:
            raise UserError(f"no tokenizer in {directory}: expected tokenizer.json or tokenizer.model")

        self.bos_id = self._special_id("bos_token", generation, model_config, default_bos)
        eos_ids = generation.get("eos_token_id", model_config.get("eos_token_id"))
        eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
        own_eos = self._special_id("eos_token", {}, {}, default_eos)
        self.eos_id = own_eos if own_eos is not None else (eos_ids[0] if eos_ids else None)
        # Generation stops at any of these (Llama 3 has several end-of-turn tokens).
        self.stop_ids = sorted({i for i in [self.eos_id, *eos_ids] if i is not None and i >= 0})
        pad = self._special_id("pad_token", {}, {}, None)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.add_bos = bool(self.config.get("add_bos_token", default_add_bos)) and self.bos_id is not None
        self.chat_template: str | None = self.config.get("chat_template")

    def _special_id(self, key: str, generation: dict, model_config: dict, default: int | None) -> int | None:
        text = token_content(self.config.get(key))
        if text is not None:
            token_id = self.token_to_id(text)
            if token_id is not None:
                return token_id
        value = generation.get(f"{key}_id", model_config.get(f"{key}_id"))
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
        return default if default is None or default >= 0 else None

    def _post_processor_adds(self, bos: Any) -> bool:
        """Does tokenizer.json's post-processor prepend BOS (as Llama 3's does)?"""
        text = token_content(bos)
        processor = json.loads(self.processor.to_str()).get("post_processor") or {}
        return bool(text) and text in json.dumps(processor.get("single", []))

    def token_to_id(self, token: str) -> int | None:
        if self.backend == "huggingface":
            return self.processor.token_to_id(token)
        token_id = self.processor.piece_to_id(token)
        return None if token_id == self.processor.unk_id() and token != self.processor.id_to_piece(token_id) else token_id

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Token ids of `text`; BOS per the checkpoint's setting unless `bos` says otherwise."""
        if self.backend == "huggingface":
            ids = self.processor.encode(text, add_special_tokens=False).ids
        else:
            ids = self.processor.encode(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Plain token ids (no BOS/EOS) for many texts at once; the Rust backend does these in parallel."""
        if self.backend == "huggingface":
            return [e.ids for e in self.processor.encode_batch(texts, add_special_tokens=False)]
        return self.processor.encode(texts)

    def decode(self, ids: Any, skip_special: bool = True) -> str:
        """Text of `ids`: a list of ints, or a tensor (taken through .tolist(), so this module needs no torch)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if self.backend == "huggingface":
            return self.processor.decode(ids, skip_special_tokens=skip_special)
        if skip_special:
            ids = [i for i in ids if not self.processor.is_control(i)]
        return self.processor.decode(ids)

    def identity(self) -> dict[str, Any]:
        """What makes two tokenizers the same: prepared data records this and training checks it."""
        return {"backend": self.backend, "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id}
