"""GGUF (llama.cpp's format), both ways, for the architectures llama.cpp and lit-lora share: llama (Llama,
Mistral, SmolLM), qwen2, qwen3 and granite.

Three things differ from a Hugging Face directory:
- weights may be quantised: `gguf.quants.dequantize` turns every block format back into float32;
- for llama and granite, llama.cpp permutes the rows of the q and k projections per head (it rotates interleaved
  pairs, HF rotates halves), so we undo that permutation to use the rotate-half RoPE of model.py (Qwen's GGUFs
  keep HF's order: llama.cpp rotates halves for them);
- the tokenizer is embedded as metadata (tokens, merges, token types), so we rebuild `tokenizer.json`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from lit_lora.checkpoint import ShardWriter, check_shape, finish_checkpoint, stored_shapes
from lit_lora.device import parse_dtype
from lit_lora.errors import UserError
from lit_lora.fileio import atomic_dir, write_json
from lit_lora.model import Config, rope_inv_freq
from lit_lora.presets import LLAMA3_ROPE, every_but

# Our family -> llama.cpp's general.architecture, for the families both read.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "granite": "granite",
                      "gemma2": "gemma2", "gemma3_text": "gemma3"}
IMPORT_ARCHITECTURES = ("llama", "qwen2", "qwen3", "granite")  # convert-gguf reads these (Gemma's are export-only)
# What llama.cpp's Gemma graphs fix rather than read: the query scale 1/sqrt(head size) (the 27B models aside), the
# local:global layer pattern, and Gemma 3's local RoPE base. export-gguf writes a Gemma model only where they hold.
GEMMA_PATTERN = {"gemma2": 2, "gemma3_text": 6}
GEMMA3_LOCAL_BASE = 10000.0
ROW_PERMUTED = ("llama", "granite")  # architectures whose q/k rows llama.cpp reorders (see the docstring)
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
    "attn_q.bias": "self_attn.q_proj.bias",  # Qwen 2
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # Qwen 3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
# general.file_type of unquantised files -> the dtype we keep by default; quantised files become fp32.
# Granite's multipliers: our Config field -> its GGUF key (under granite.).
GRANITE_SCALES = {"embedding_multiplier": "embedding_scale", "residual_multiplier": "residual_scale",
                  "attention_scale": "attention.scale", "logits_scaling": "logit_scale"}
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
    if arch not in IMPORT_ARCHITECTURES:
        raise UserError(f"unsupported GGUF architecture {arch!r}: lit-lora imports general.architecture "
                        f"{', '.join(IMPORT_ARCHITECTURES)}")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"GGUF metadata lacks {arch}.{key}; the file is not a complete llama.cpp model")
        return value

    names = {t.name for t in reader.tensors}
    granite = {f: _f32(get(key)) for f, key in GRANITE_SCALES.items()} if arch == "granite" else {}
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
        family=arch,
        qkv_bias=True if "blk.0.attn_q.bias" in names else None,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        **granite,
    )
    config.rope_scaling = rope_scaling_from_gguf(meta, reader, config)
    return config


def rope_scaling_from_gguf(meta: dict[str, Any], reader, config: Config) -> dict[str, float] | None:
    """llama.cpp stores Llama 3 scaling as a `rope_freqs.weight` tensor of per-frequency divisors, not as
    parameters; we recover the parameters by matching that tensor against the standard Llama 3 recipe."""
    kind = meta.get(f"{meta['general.architecture']}.rope.scaling.type", "none")
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


def rope_heads(name: str, config: Config) -> int | None:
    """The heads whose rows llama.cpp orders its own way in tensor `name` (ours): q's and k's weights, and a LoRA B
    of them (its rows are the weight's; a LoRA A's are the rank's). None for every other tensor."""
    if name.endswith("lora_A") or GGUF_ARCHITECTURES.get(config.family) not in ROW_PERMUTED:
        return None
    return config.n_heads if ".q_proj." in name else config.n_kv_heads if ".k_proj." in name else None


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
    raise UserError(f"unexpected tensor {gguf_name!r} in GGUF: not part of a model lit-lora computes")


def iter_gguf_tensors(reader, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, float32 tensor in PyTorch's (out, in) layout), one tensor at a time."""
    from gguf.quants import dequantize

    expected, seen = stored_shapes(config), set()
    for t in reader.tensors:
        name = our_name(t.name)
        if name is None:
            continue
        if name not in expected:
            raise UserError(f"GGUF tensor {t.name!r} does not belong to the model its metadata describes")
        # GGUF lists dimensions innermost first: (in, out) for a weight matrix.
        array = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        tensor = torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: F32 data is a read-only mmap
        check_shape(t.name, tensor.shape, expected[name], "its GGUF metadata",
                    "the file is not a consistent llama.cpp model")
        if heads := rope_heads(name, config):
            tensor = unpermute_rope_rows(tensor, heads)
        seen.add(name)
        yield name, tensor
    missing = sorted(expected.keys() - seen)
    if missing:
        raise UserError(f"GGUF tensors do not match its metadata: missing {missing[:3]}")


# ---------------------------------------------------------------------------------------------- tokenizer
# llama.cpp's pre-tokenizer names -> the pre-tokenizer steps HF's tokenizer.json used for them.
DIGIT_SPLITTING_PRE = ("smollm", "starcoder", "refact", "codeshell")
# Qwen 2's: Llama 3's with single digits.
QWEN2_PRE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PRE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2", "gpt-2"):
        return byte_level
    if pre in DIGIT_SPLITTING_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "qwen2"):
        regex = QWEN2_PRE_REGEX if pre == "qwen2" else LLAMA3_PRE_REGEX
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise UserError(f"GGUF pre-tokenizer {pre!r} is not supported yet (supported: default, gpt2, gpt-2, llama-bpe, "
                    f"llama3, qwen2, {', '.join(DIGIT_SPLITTING_PRE)})")


def build_tokenizer(meta: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """tokenizer.json (as a `tokenizers.Tokenizer`), tokenizer_config.json and generation_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"GGUF tokenizer kind {kind!r} is not supported yet: lit-lora rebuilds byte-level BPE "
                        f"('gpt2') tokenizers only; convert the original Hugging Face directory with convert-hf")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    try:
        tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    except Exception as e:  # the tokenizers library raises plain Exceptions, e.g. for a merge of unlisted tokens
        raise UserError(f"the GGUF's tokenizer cannot be rebuilt ({e}): its merges do not fit its tokens") from None
    pre = meta.get("tokenizer.ggml.pre", "default")
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    if pre == NFC_PRE[0]:
        tokenizer.normalizer = normalizers.NFC()
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


# ---------------------------------------------------------------------------------------------- export
# --type -> (the GGML type of 2-D weights, general.file_type); norms and other 1-D tensors stay F32, as llama.cpp
# keeps them, and a weight whose rows do not split into Q8_0's 32-value blocks falls back to F16.
EXPORT_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
                "q8_0": ("Q8_0", "MOSTLY_Q8_0")}  # (gguf.GGMLQuantizationType, gguf.LlamaFileType) names
GGUF_NAMES = {ours: theirs for theirs, ours in GLOBAL_NAMES.items()}
GGUF_LAYER_NAMES = {ours: theirs for theirs, ours in LAYER_NAMES.items()}
# Gemma 2/3's four norms: HF's post_attention_layernorm norms the attention output there, not the MLP input.
SANDWICH_NAMES = {"post_attention_layernorm.weight": "post_attention_norm.weight",
                  "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                  "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
# Pre-tokenizer names llama.cpp knows, in the order an export looks for the checkpoint's own (see _pre_tokenizer).
EXPORT_PRE_TOKENIZERS = ("gpt-2", "smollm", "llama-bpe", "qwen2")
# Qwen's tokenizers normalise to NFC first; llama.cpp's qwen2 pre-tokenizer stands for them (its own tokenizer skips
# the NFC step, which changes only text not already in NFC; lit-lora's engine passes ids it tokenised itself).
NFC_PRE = ("qwen2", {"type": "NFC"})


def gguf_name(name: str, config: Config) -> str:
    """The GGUF tensor name of one of our parameter names (layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight)."""
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    layer, rest = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
    names = {**GGUF_LAYER_NAMES, **SANDWICH_NAMES} if config.sandwich_norms else GGUF_LAYER_NAMES
    return f"blk.{layer}.{names[rest]}"


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Our (rotate-half) q/k row order into llama.cpp's interleaved one: the inverse of unpermute_rope_rows."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_gguf_layout(name: str, tensor: torch.Tensor, config: Config) -> np.ndarray:
    """float32 numpy, in llama.cpp's row order where it has its own (rope_heads)."""
    tensor = tensor.detach().float()
    if (heads := rope_heads(name, config)) and tensor.dim() == 2:
        tensor = permute_rope_rows(tensor, heads)
    if config.norm_unit_offset and name.endswith("norm.weight"):  # llama.cpp scales by the weight itself
        tensor = tensor + 1
    return tensor.contiguous().numpy()


def ggml_type(shape: tuple[int, ...], requested: str):
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2:
        return T.F32
    if requested == "Q8_0" and shape[-1] % 32:
        return T.F16
    return T[requested]


def encode_tensor(array: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if qtype == T.F32:
        return array
    if qtype == T.F16:
        return array.astype(np.float16)
    return quantize(array, qtype)  # BF16 and Q8_0, as llama.cpp's own converter does them


def encoded_nbytes(shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], Any, int]:
    """(shape as the writer wants it, numpy dtype, bytes) of a tensor of `shape` encoded as `qtype`."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quant_shape_to_byte_shape

    if qtype == T.F32:
        return shape, np.dtype(np.float32), int(np.prod(shape)) * 4
    if qtype in (T.F16, T.BF16):
        return shape, np.dtype(np.float16 if qtype == T.F16 else np.uint16), int(np.prod(shape)) * 2
    byte_shape = quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def write_gguf(path: Path, config: Config, arch_metadata: Callable[[Any], None],
               tensors: list[tuple[str, tuple[int, ...]]], arrays: Iterator[np.ndarray], requested: str) -> None:
    """Stream a GGUF file of `config`'s architecture: `arch_metadata(writer)` adds the key-values, `tensors` lists
    (GGUF name, numpy shape) in order, and `arrays` yields their float32 data in that order, one at a time (peak
    memory ~ one tensor)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), GGUF_ARCHITECTURES[config.family])
    try:
        arch_metadata(writer)
        types = [ggml_type(shape, requested) for _, shape in tensors]
        for (name, shape), qtype in zip(tensors, types):
            writer.add_tensor_info(name, *encoded_nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (name, shape), qtype, array in zip(tensors, types, arrays):
            if array.shape != shape:
                raise ValueError(f"{name}: shape {array.shape}, announced {shape}")
            writer.write_tensor_data(encode_tensor(array, qtype))
    finally:
        writer.close()


def add_model_metadata(writer, config: Config, name: str, file_type: str) -> None:
    from gguf import LlamaFileType

    writer.add_name(name)
    writer.add_file_type(LlamaFileType[file_type])
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(config.norm_eps)  # Llama 3 RoPE scaling is the rope_freqs tensor, no key
    if config.family == "granite":
        for field, key in GRANITE_SCALES.items():
            writer.add_float32(f"granite.{key}", getattr(config, field))
    if config.sliding_window is not None and config.family in GEMMA_PATTERN:
        writer.add_sliding_window(config.sliding_window)
    for add, cap in ((writer.add_attn_logit_softcapping, config.attn_softcap),
                     (writer.add_final_logit_softcapping, config.final_softcap)):
        if cap is not None:
            add(cap)
    if (config.rope_scaling or {}).get("rope_type") == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling["factor"])


def rope_freqs(config: Config) -> np.ndarray | None:
    """Llama 3 scaling as llama.cpp takes it: per-frequency divisors (plain / scaled inverse frequencies)."""
    if not config.rope_scaling or config.rope_scaling.get("rope_type", "llama3") != "llama3":  # linear: two keys
        return None
    plain = rope_inv_freq(Config(**{**config.to_dict(), "rope_scaling": None}))
    return (plain / rope_inv_freq(config)).float().numpy()


def check_exportable(config: Config) -> None:
    """Refuse what lit-lora cannot write as a GGUF that llama.cpp computes the same way, naming it."""
    fix = "export it with export-hf and convert that with llama.cpp's convert_hf_to_gguf.py"
    if config.family not in GGUF_ARCHITECTURES:
        raise UserError(f"export-gguf writes {', '.join(GGUF_ARCHITECTURES)} models, not {config.family} yet; {fix}")
    if config.attention_bias or config.mlp_bias:
        raise UserError(f"a model with attention or MLP biases cannot be exported to GGUF yet; {fix}")
    if config.qkv_bias and config.family != "qwen2":
        raise UserError(f"q/k/v biases on a {config.family} model cannot be exported to GGUF; {fix}")
    if config.family in GEMMA_PATTERN:
        _check_gemma(config)
    elif config.sliding_window is not None and config.family != "mistral":  # llama.cpp runs Mistral v0.1 unwindowed
        raise UserError(f"llama.cpp's {config.family} attends the whole context, this model a sliding window of "
                        f"{config.sliding_window}; it cannot be exported to GGUF")
    kind = (config.rope_scaling or {}).get("rope_type", "llama3")
    scalings = ("llama3", "linear") if config.family == "gemma3_text" else ("llama3",)
    if config.rope_dim != config.head_dim or kind not in scalings:
        what = "partial rotary" if config.rope_dim != config.head_dim else f"{kind} RoPE"
        raise UserError(f"this model's {what} cannot be exported to GGUF yet; {fix}")


def _check_gemma(config: Config) -> None:
    """Refuse a Gemma model that differs from what llama.cpp's Gemma graph fixes (GEMMA_PATTERN's comment)."""
    pattern = GEMMA_PATTERN[config.family]
    differs = {"the query scale (query_pre_attn_scalar)": abs(config.attention_scale - config.head_dim ** -0.5) > 1e-9,
               f"the local layers (every layer but each {pattern}th)": config.local_layers != every_but(
                   config.n_layers, pattern) or config.sliding_window is None,
               f"the local RoPE base ({GEMMA3_LOCAL_BASE:g})": config.family == "gemma3_text"
               and config.rope_local_base != GEMMA3_LOCAL_BASE}
    for what, different in differs.items():
        if different:
            raise UserError(f"this {config.family} model differs from llama.cpp's in {what}, which llama.cpp does "
                            f"not read from a GGUF; it cannot be exported to GGUF")


def _pre_tokenizer_name(tokenizer: Any, spec: dict[str, Any]) -> str:
    """The llama.cpp name of the pre-tokenizer of `spec` (its tokenizer.json): the one whose rebuild
    (_pre_tokenizer, the import's table) has the same steps. Offsets trimming does not change the pieces, so it is
    not compared."""
    from tokenizers import Tokenizer, models

    def steps(pre: Any) -> Any:
        probe = Tokenizer(models.BPE())
        probe.pre_tokenizer = pre
        return _without_key(json.loads(probe.to_str())["pre_tokenizer"], "trim_offsets")

    normalizer = spec.get("normalizer")
    ours = _without_key(spec.get("pre_tokenizer"), "trim_offsets")
    for name in EXPORT_PRE_TOKENIZERS:
        if steps(_pre_tokenizer(name)) == ours and (not normalizer or (name, normalizer) == NFC_PRE):
            return name
    if normalizer:
        raise UserError(f"the tokenizer in {Path(tokenizer.path).parent} normalises text ({normalizer.get('type')}), "
                        f"which llama.cpp's BPE tokenizers do not; it cannot be expressed in GGUF")
    raise UserError(f"the pre-tokenizer of {tokenizer.path} matches none llama.cpp knows that lit-lora can name "
                    f"({', '.join(EXPORT_PRE_TOKENIZERS)}), so it cannot be expressed in GGUF; use llama.cpp's "
                    f"convert_hf_to_gguf.py on an export-hf directory")


def _without_key(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return {k: _without_key(v, key) for k, v in value.items() if k != key}
    if isinstance(value, list):
        return [_without_key(v, key) for v in value]
    return value


def check_tokenizer(tokenizer: Any, vocab_size: int) -> tuple[str, list[Any]] | None:
    """Refuse (UserError) a tokenizer llama.cpp could not read as it is; for BPE, (the pre-tokenizer's llama.cpp
    name, the merges)."""
    if tokenizer.backend == "huggingface":
        spec = json.loads(tokenizer.processor.to_str())
        model = spec["model"]
        if model.get("type") != "BPE" or not model.get("merges"):
            raise UserError(f"the tokenizer in {Path(tokenizer.path).parent} is {model.get('type')}, not byte-level "
                            f"BPE with merges; it cannot be expressed in GGUF by lit-lora")
        if len(model["vocab"]) > vocab_size:  # GGUF lists one token per row: merges would make unlisted ones
            raise UserError(f"{tokenizer.path} has {len(model['vocab'])} tokens for {vocab_size} embedding rows: it is "
                            f"not this model's tokenizer; put the model's own tokenizer in the checkpoint")
        return _pre_tokenizer_name(tokenizer, spec), model["merges"]
    if tokenizer.processor.vocab_size() != vocab_size:
        raise UserError(f"{tokenizer.path} has {tokenizer.processor.vocab_size()} pieces for {vocab_size} embedding "
                        f"rows; it cannot be expressed in GGUF")
    return None


def add_tokenizer_metadata(writer, tokenizer: Any, vocab_size: int, chat_template: str | None) -> None:
    """The tokenizer as llama.cpp reads it: byte-level BPE (tokens, merges, types, pre-tokenizer name) or
    SentencePiece (pieces, scores, types); special ids, whether BOS is added, the chat template."""
    from gguf import TokenType

    bpe = check_tokenizer(tokenizer, vocab_size)
    if bpe is not None:
        pre, merges = bpe
        added = {t.content: t.special for t in tokenizer.processor.get_added_tokens_decoder().values()}
        tokens = [tokenizer.processor.id_to_token(i) for i in range(vocab_size)]
        types = [TokenType.NORMAL if t not in added else TokenType.CONTROL if added[t] else TokenType.USER_DEFINED
                 for t in tokens]
        for i, t in enumerate(tokens):  # rows of the embedding the vocabulary does not name (padding)
            if t is None:
                tokens[i], types[i] = f"[PAD{i}]", TokenType.UNUSED
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    else:
        sp = tokenizer.processor
        kinds = ((sp.is_unknown, TokenType.UNKNOWN), (sp.is_control, TokenType.CONTROL), (sp.is_byte, TokenType.BYTE),
                 (sp.is_unused, TokenType.UNUSED))
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([sp.id_to_piece(i) for i in range(vocab_size)])
        writer.add_token_scores([sp.get_score(i) for i in range(vocab_size)])
        writer.add_token_types([next((kind for test, kind in kinds if test(i)), TokenType.NORMAL)
                                for i in range(vocab_size)])
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                          (writer.add_pad_token_id, tokenizer.pad_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
