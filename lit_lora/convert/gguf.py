"""Import a LLaMA-architecture GGUF file (llama.cpp's format) into our checkpoint format.

Three things differ from a Hugging Face directory:
- weights may be quantised: `gguf.quants.dequantize` turns every block format back into float32;
- llama.cpp permutes the rows of the q and k projections per head (it rotates interleaved pairs, HF rotates
  halves), so we undo that permutation to use the rotate-half RoPE of model.py;
- the tokenizer is embedded as metadata (tokens, merges, token types), so we rebuild `tokenizer.json`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lit_lora.checkpoint import ShardWriter, finish_checkpoint, stored_names
from lit_lora.device import parse_dtype
from lit_lora.errors import UserError
from lit_lora.fileio import atomic_dir, write_json
from lit_lora.model import LLAMA3_ROPE, Config, rope_inv_freq

# GGUF tensor name -> our name; per-layer names sit under blk.N. / layers.N.
GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# general.file_type of unquantised files -> the dtype we keep by default; quantised files become fp32.
UNQUANTISED_FILE_TYPES = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}


def convert_gguf(path: Path, out: Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Dequantise `path` into a lit-lora checkpoint at `out` (fp32 by default for quantised files)."""
    reader = open_gguf(path)
    meta = read_metadata(reader)
    config = config_from_metadata(meta, reader, name=Path(path).stem)
    # Before writing anything, so an unsupported tokenizer is a clean error.
    tokenizer, tokenizer_config, generation_config = build_tokenizer(meta)
    target = parse_dtype(dtype) or UNQUANTISED_FILE_TYPES.get(meta.get("general.file_type"), torch.float32)
    with atomic_dir(out, overwrite, inputs=[path]) as tmp:
        writer = ShardWriter(tmp)
        for name, tensor in iter_gguf_tensors(reader, config):
            writer.add(name, tensor.to(target))
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tokenizer_config)
        write_json(tmp / "generation_config.json", generation_config)
        finish_checkpoint(tmp, writer, config, target, source=f"gguf: {Path(path).name}")
    return Path(out)


def open_gguf(path: Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except OSError:  # the file system's (permissions, I/O), not a damaged file
        raise
    except Exception as e:  # GGUFReader raises ValueError/struct errors/etc. for anything malformed
        raise UserError(f"cannot read {path} as GGUF: {e} (the file is truncated or not GGUF)") from None


def read_metadata(reader) -> dict[str, Any]:
    return {key: field.contents() for key, field in reader.fields.items()}


def _f32(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 comes back as 9.99999974e-06; keep the number that was meant."""
    return float(str(np.float32(value)))


def config_from_metadata(meta: dict[str, Any], reader, name: str = "") -> Config:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"unsupported GGUF architecture {arch!r}: lit-lora imports general.architecture = 'llama' only")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise UserError(f"GGUF metadata lacks llama.{key}; the file is not a complete llama.cpp model")
        return value

    names = {t.name for t in reader.tensors}
    n_heads, dim = int(get("attention.head_count")), int(get("embedding_length"))
    config = Config(
        vocab_size=int(get("vocab_size", len(meta.get("tokenizer.ggml.tokens") or []) or None)),
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(get("attention.key_length", dim // n_heads)),
        hidden_dim=int(get("feed_forward_length")),
        norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        rope_base=_f32(get("rope.freq_base", 10000.0)),
        max_seq_len=int(get("context_length")),
        tie_embeddings="output.weight" not in names,
        name=name,
    )
    config.rope_scaling = rope_scaling_from_gguf(meta, reader, config)
    return config


def rope_scaling_from_gguf(meta: dict[str, Any], reader, config: Config) -> dict[str, float] | None:
    """llama.cpp stores Llama 3 scaling as a `rope_freqs.weight` tensor of per-frequency divisors, not as
    parameters; we recover the parameters by matching that tensor against the standard Llama 3 recipe."""
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind not in ("none", "llama3"):
        raise UserError(f"unsupported RoPE scaling {kind!r} in GGUF: lit-lora supports plain and Llama 3 RoPE")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    divisors = torch.from_numpy(np.array(freqs.data, dtype=np.float32).reshape(-1))
    scaling = {"factor": float(divisors.max()), **LLAMA3_ROPE}
    plain = rope_inv_freq(Config(**{**config.to_dict(), "rope_scaling": None}))
    scaled = rope_inv_freq(Config(**{**config.to_dict(), "rope_scaling": scaling}))
    if not torch.allclose(plain / scaled, divisors, rtol=1e-3):
        raise UserError("the GGUF's rope_freqs.weight does not follow the Llama 3 scaling recipe; "
                        "convert the original Hugging Face directory with convert-hf instead")
    return scaling


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head it interleaves the two halves that rotate-half RoPE pairs up.

    llama.cpp row 2i (2i+1) of a head is HF row i (i + D/2) of that head.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def our_name(gguf_name: str) -> str | None:
    """Our parameter name for a GGUF tensor name; None for tensors we do not load (rope_freqs)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if match and match.group(2) in LAYER_NAMES:
        return f"layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}"
    if gguf_name == "rope_freqs.weight":
        return None
    raise UserError(f"unexpected tensor {gguf_name!r} in GGUF: not part of a plain LLaMA model")


def iter_gguf_tensors(reader, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, float32 tensor in PyTorch's (out, in) layout), one tensor at a time."""
    from gguf.quants import dequantize

    seen = set()
    for t in reader.tensors:
        name = our_name(t.name)
        if name is None:
            continue
        # GGUF lists dimensions innermost first: (in, out) for a weight matrix.
        array = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        tensor = torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: F32 data is a read-only mmap
        if name.endswith("q_proj.weight"):
            tensor = unpermute_rope_rows(tensor, config.n_heads)
        elif name.endswith("k_proj.weight"):
            tensor = unpermute_rope_rows(tensor, config.n_kv_heads)
        seen.add(name)
        yield name, tensor
    expected = stored_names(config)
    missing = sorted(expected - seen)
    if missing or seen - expected:
        raise UserError(f"GGUF tensors do not match its metadata: missing {missing[:3]}, "
                        f"unexpected {sorted(seen - expected)[:3]}")


# ---------------------------------------------------------------------------------------------- tokenizer
# llama.cpp's pre-tokenizer names -> the pre-tokenizer steps HF's tokenizer.json used for them.
DIGIT_SPLITTING_PRE = ("smollm", "starcoder", "refact", "codeshell")
LLAMA3_PRE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2"):
        return byte_level
    if pre in DIGIT_SPLITTING_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PRE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise UserError(f"GGUF pre-tokenizer {pre!r} is not supported yet (supported: default, gpt2, llama-bpe, "
                    f"{', '.join(DIGIT_SPLITTING_PRE)})")


def build_tokenizer(meta: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """tokenizer.json (as a `tokenizers.Tokenizer`), tokenizer_config.json and generation_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"GGUF tokenizer kind {kind!r} is not supported yet: lit-lora rebuilds byte-level BPE "
                        f"('gpt2') tokenizers only; convert the original Hugging Face directory with convert-hf")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (type 3) must be added tokens, or "<|im_start|>" would be split into byte pieces.
    types = meta.get("tokenizer.ggml.token_type") or []
    specials = [tokens[i] for i, kind in enumerate(types) if int(kind) == 3]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"), "eos_token": token("eos"), "unk_token": token("unknown"),
        "pad_token": token("padding") or token("eos"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(meta.get("llama.context_length", 2048)),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    generation_config = {key: int(meta[f"tokenizer.ggml.{gguf_key}_token_id"])
                         for key, gguf_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding"))
                         if meta.get(f"tokenizer.ggml.{gguf_key}_token_id") is not None}
    return tokenizer, tokenizer_config, generation_config
