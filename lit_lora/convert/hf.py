"""Hugging Face checkpoints of the LLaMA-style families, both ways: their config.json and their tensor names.

Our module names are HF's without the leading "model.", so the conversion is a rename (Phi 3's fused qkv_proj
and gate_up_proj are split on import and fused again on export), an optional cast and a re-shard. Source
shards are read one at a time (safetensors lazily, legacy .bin files memory-mapped), so peak memory stays
near one source shard plus one output shard, never the whole model.

Each family's config.json differs from Llama's in a few keys; `config_from_hf` reads them into our `Config`
fields and refuses, naming the key, what the model cannot compute; `config_to_hf` writes them back.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from lit_lora.checkpoint import DEFAULT_SHARD_BYTES, ShardWriter, check_shape, finish_checkpoint, stored_shapes
from lit_lora.device import parse_dtype
from lit_lora.errors import UserError
from lit_lora.fileio import atomic_dir, iter_safetensors
from lit_lora.model import Config
from lit_lora.presets import every_but
from lit_lora.tokenizer import Tokenizer

# model_type -> the transformers class that loads it (what export-hf writes as "architectures").
FAMILIES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "granite": "GraniteForCausalLM",
}
# Phi 3 stores these projections side by side in one matrix (rows in this order); we keep them apart.
FUSED = {"phi3": {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}}
HF_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # HF's name -> ours (model.ACTIVATIONS)
# What transformers assumes where a family's config.json leaves a key out (its config class's defaults), where that
# is not what the Llama reading below would assume.
MISSING_KEYS = {
    "gemma2": {"query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "sliding_window": 4096},
    "gemma3_text": {"query_pre_attn_scalar": 256, "sliding_window": 4096, "rope_local_base_freq": 10000.0},
    "qwen2": {"max_window_layers": 28}, "qwen3": {"max_window_layers": 28},
}
# Keys that mean a model this decoder cannot compute, with what they are.
UNSUPPORTED_KEYS = {"vision_config": "a vision tower", "audio_config": "an audio tower",
                    "num_experts": "a mixture of experts", "num_local_experts": "a mixture of experts",
                    "n_routed_experts": "a mixture of experts"}
# What to do when the weights' shapes are not the ones config.json's sizes make.
SIZES_FIX = ("correct config.json's sizes to the weights' (hidden_size, intermediate_size, num_attention_heads, "
             "num_key_value_heads, head_dim, vocab_size)")
LAYER_TYPES = ("full_attention", "sliding_attention")  # layer_types' values, as transformers names them


def is_number(value: Any) -> bool:
    """A finite JSON number (true and false are not numbers, though Python's bool is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: type(v) is int and v >= low), f"a whole number >= {low}"


_POSITIVE = (lambda v: is_number(v) and v > 0, "a number > 0")
_TEXT = (lambda v: isinstance(v, str), "a string")
_FLAG = (lambda v: type(v) is bool, "true or false")
_OBJECT = (lambda v: isinstance(v, dict), "an object")
_NUMBERS = (lambda v: isinstance(v, list) and all(map(is_number, v)), "a list of numbers")
# What each config.json key lit-lora reads must hold (at the top level or in the RoPE settings; null: not set), so
# that a wrong value is refused by name instead of crashing the import or becoming a silently wrong model.
CONFIG_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
                     "sliding_window_pattern", "original_max_position_embeddings"), _whole(1)),
    "max_window_layers": _whole(0),
    **dict.fromkeys(("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
                     "attn_logit_softcapping", "final_logit_softcapping", "embedding_multiplier",
                     "residual_multiplier", "attention_multiplier", "logits_scaling", "factor", "low_freq_factor",
                     "high_freq_factor", "attention_factor"), _POSITIVE),
    "partial_rotary_factor": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"), _FLAG),
    **dict.fromkeys(("model_type", "hidden_act", "hidden_activation"), _TEXT),
    "architectures": (lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v), "a list of class names"),
    **dict.fromkeys(("rope_scaling", "rope_parameters", "full_attention", "sliding_attention"), _OBJECT),
    **dict.fromkeys(("short_factor", "long_factor"), _NUMBERS),
}


def to_hf_name(name: str) -> str:
    """Our names are LlamaForCausalLM's minus the decoder's `model.` prefix; the head sits outside it."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_name(hf_name: str) -> str:
    """The inverse of `to_hf_name`."""
    return hf_name.removeprefix("model.")


def split_sizes(config: Config, fused: str) -> list[int]:
    """Rows of each part of a fused projection."""
    kv = config.n_kv_heads * config.head_dim
    return [config.n_heads * config.head_dim, kv, kv] if fused.endswith("qkv_proj") else [config.hidden_dim] * 2


def _layer_module(name: str) -> tuple[str, str, str]:
    """`layers.3.self_attn.q_proj.weight` -> ("layers.3", "self_attn.q_proj", "weight") (or "bias", "lora_A",
    "lora_B", "lora_magnitude"); ("", "", "") elsewhere."""
    m = re.fullmatch(r"(layers\.\d+)\.(.+)\.(weight|bias|lora_A|lora_B|lora_magnitude)", name)
    return m.groups() if m else ("", "", "")


def split_fused(config: Config, name: str, tensor: torch.Tensor, where: str, fix: str
                ) -> list[tuple[str, torch.Tensor]]:
    """[(name, tensor)] as ours: a fused projection's tensor (ours-style `name`) split into its parts (views),
    anything else as it is. A LoRA A serves every part; every other tensor (a LoRA B too) splits by rows."""
    layer, module, kind = _layer_module(name)
    parts = FUSED.get(config.family, {}).get(module)
    if parts is None:
        return [(name, tensor)]
    if kind == "lora_A":
        return [(f"{layer}.{part}.{kind}", tensor) for part in parts]
    sizes = split_sizes(config, module)
    if tensor.shape[0] != sum(sizes):
        raise UserError(f"tensor {name} has {tensor.shape[0]} rows, but {where} makes {' + '.join(map(str, sizes))} "
                        f"({', '.join(parts)}); {fix}")
    return [(f"{layer}.{part}.{kind}", piece) for part, piece in zip(parts, tensor.split(sizes))]


def from_hf_tensors(config: Config, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs as ours: renamed, fused projections split (views, no copies)."""
    for hf_name, tensor in tensors:
        yield from split_fused(config, from_hf_name(hf_name), tensor, "config.json", SIZES_FIX)


def to_hf_tensors(config: Config, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (name, tensor) pairs as HF's: renamed, and fused where the family fuses (the parts of one matrix are
    held until all of them have come)."""
    part_of = {part: (module, i, len(parts)) for module, parts in FUSED.get(config.family, {}).items()
               for i, part in enumerate(parts)}
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors:
        layer, part, kind = _layer_module(name)
        if part not in part_of:
            yield to_hf_name(name), tensor
            continue
        module, i, n = part_of[part]
        fused = f"{layer}.{module}.{kind}"
        pending.setdefault(fused, {})[i] = tensor
        if len(pending[fused]) == n:
            parts = pending.pop(fused)
            yield to_hf_name(fused), torch.cat([parts[j] for j in range(n)])
    if pending:
        raise ValueError(f"fused tensors lack parts: {sorted(pending)}")


def convert_hf(
    src: Path, out: Path, dtype: str | None = None, overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Convert HF directory `src` into a checkpoint at `out`; dtype None keeps the source tensors' dtype."""
    src = Path(src)
    config = read_hf_config(src)
    sources = weight_sources(src)
    if not ((src / "tokenizer.json").is_file() or (src / "tokenizer.model").is_file()):
        raise UserError(f"no tokenizer in {src}: expected tokenizer.json or tokenizer.model next to config.json")
    tokens = Tokenizer(src).vocab_size
    if tokens > config.vocab_size:  # its higher ids would index past the embedding the first time a prompt used one
        raise UserError(f"the tokenizer in {src} has {tokens} tokens, the model {config.vocab_size} embedding rows "
                        f"(vocab_size): it is not this model's tokenizer; put the model's own beside config.json")
    target = parse_dtype(dtype)
    expected = stored_shapes(config)
    written: set[str] = set()
    saved_dtype = target
    with atomic_dir(out, overwrite, inputs=[src]) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for path in sources:
            for name, tensor in from_hf_tensors(config, iter_weights(path, target)):
                hf_name = to_hf_name(name)
                if (name == "lm_head.weight" and config.tie_embeddings) or name.endswith("rotary_emb.inv_freq"):
                    continue  # a tied head is the embedding; inv_freq buffers are recomputed from the config
                if name not in expected:
                    raise UserError(f"unexpected tensor {hf_name!r} in {path.name}: it does not belong to the "
                                    f"{config.family} model that {src / 'config.json'} describes")
                check_shape(hf_name, tensor.shape, expected[name], str(src / "config.json"), SIZES_FIX)
                if name == "embed_tokens.weight":
                    saved_dtype = saved_dtype or tensor.dtype
                writer.add(name, tensor.contiguous())
                written.add(name)
        missing = sorted(expected.keys() - written)
        if missing:
            raise UserError(f"{src} lacks {len(missing)} tensors the config needs (e.g. {missing[:3]}); "
                            f"is a weights shard missing?")
        finish_checkpoint(tmp, writer, config, saved_dtype, source=f"hf: {src.resolve().name}", tokenizer_src=src)
    return Path(out)


def read_hf_config(src: Path) -> Config:
    if not src.is_dir():
        raise UserError(f"source directory {src} does not exist")
    path = src / "config.json"
    if not path.is_file():
        raise UserError(f"{src} has no config.json; point convert-hf at a Hugging Face model directory")
    try:
        hf = json.loads(path.read_text())
        if not isinstance(hf, dict):
            raise UserError(f"{path} is not a model config: it is not a JSON object; download the model's own")
        return config_from_hf(hf, name=src.resolve().name)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    except KeyError as e:
        raise UserError(f"{path} lacks {e}, which a {hf.get('model_type', 'LLaMA')} config needs") from None


def weight_sources(src: Path) -> list[Path]:
    """The weights files of an HF directory: safetensors preferred, legacy pytorch_model*.bin otherwise."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = src / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            absent = [f for f in files if not (src / f).is_file()]
            if absent:
                raise UserError(f"{index} lists shards that are not there: {absent[:3]}; download them first")
            return [src / f for f in files]
        files = sorted(src.glob(pattern))
        if files:
            return files
    raise UserError(f"no weights in {src}: expected *.safetensors or pytorch_model*.bin files")


def iter_weights(path: Path, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        yield from iter_safetensors(path, dtype)
        return
    # Legacy pickles: weights_only refuses arbitrary objects; mmap keeps the shard on disk, not in memory.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except OSError:  # the file system's (permissions, I/O), not a damaged file
        raise
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError/... for bad files
        raise UserError(f"cannot read {path}: {e} (the file is truncated or not a PyTorch state dict)") from None
    for name in list(state):
        tensor = state.pop(name)
        yield name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


# ---------------------------------------------------------------------------------------------- config.json
def _set(values: dict[str, Any]) -> dict[str, Any]:
    """The keys of config.json (or of its RoPE settings) that are set: null means not set, as in transformers."""
    return {k: v for k, v in values.items() if v is not None}


def _check_values(values: dict[str, Any], where: str = "config.json") -> None:
    """Refuse, naming the key, a value in `values` (config.json or its RoPE settings) that CONFIG_VALUES rules out."""
    for key, (ok, must) in CONFIG_VALUES.items():
        if values.get(key) is not None and not ok(values[key]):
            raise UserError(f"{key} in {where} must be {must}, not {values[key]!r}; correct it")


def _check_family(hf: dict[str, Any]) -> str:
    """The model_type of a config.json this decoder computes, or a UserError naming what it is not."""
    archs, model_type = hf.get("architectures") or [], hf.get("model_type")
    for key, what in UNSUPPORTED_KEYS.items():
        if hf.get(key):
            raise UserError(f"config.json has {key!r}: the model holds {what}, which lit-lora does not compute "
                            f"(it reads the text decoders of {', '.join(FAMILIES)})")
    if not archs and not model_type:
        raise UserError(f"config.json names neither model_type nor architectures, so its family is unknown; add "
                        f"the model_type it has on the Hub (lit-lora reads {', '.join(FAMILIES)})")
    if model_type not in FAMILIES and not any(a in FAMILIES.values() for a in archs):
        raise UserError(f"unsupported architecture {archs or model_type!r}: lit-lora reads "
                        f"{', '.join(FAMILIES.values())}")
    by_arch = {a: t for t, a in FAMILIES.items()}
    types = ({model_type} if model_type else set()) | {by_arch.get(a, a) for a in archs}  # unknown: its own name
    if len(types) != 1:
        raise UserError(f"config.json contradicts itself: model_type {model_type!r} but architectures {archs}; "
                        f"lit-lora reads {', '.join(FAMILIES.values())}, so check which model this is")
    return types.pop()


def _rope(hf: dict[str, Any], family: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global, local) RoPE parameters: transformers 5's rope_parameters (per layer type for Gemma 3), or the
    older rope_theta / rope_scaling / rope_local_base_freq keys."""
    params = _set(hf.get("rope_parameters") or {})
    _check_values(params, "config.json's rope_parameters")
    if "full_attention" in params:
        rope, local = _set(params["full_attention"]), _set(params.get("sliding_attention") or {})
        _check_values(rope, "config.json's rope_parameters.full_attention")
        _check_values(local, "config.json's rope_parameters.sliding_attention")
        return rope, local
    rope = {**params, **_set(hf.get("rope_scaling") or {})}
    _check_values(rope, "config.json's rope settings")
    rope.setdefault("rope_theta", hf.get("rope_theta", 1e6 if family == "gemma3_text" else 10000.0))
    return rope, {"rope_theta": hf["rope_local_base_freq"]} if "rope_local_base_freq" in hf else {}


def _rope_scaling(rope: dict[str, Any], hf: dict[str, Any]) -> dict[str, Any] | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    kind = "longrope" if kind in ("su", "yarn") and hf.get("model_type") == "phi3" else kind  # Phi 3's old names
    if kind == "default":
        return None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return {k: float(rope[k]) for k in keys}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(rope["factor"])}
    if kind == "longrope":
        # transformers takes the top-level key over the rope settings' own (standardize_rope_params)
        original = hf.get("original_max_position_embeddings") or rope["original_max_position_embeddings"]
        factor = rope.get("factor") or hf["max_position_embeddings"] / original
        attention = rope.get("attention_factor") or (
            math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0)
        return {"rope_type": "longrope", "short_factor": [float(x) for x in rope["short_factor"]],
                "long_factor": [float(x) for x in rope["long_factor"]],
                "original_max_position_embeddings": int(original), "attention_factor": float(attention)}
    raise UserError(f"unsupported rope_type {kind!r} in config.json's rope settings: lit-lora computes default, "
                    f"llama3, linear and (Phi 3) longrope RoPE")


def _local_layers(hf: dict[str, Any], family: str, n_layers: int) -> tuple[int | None, list[int] | None]:
    """(sliding window, its layers; None: all) as transformers derives them for each family."""
    window = hf.get("sliding_window")
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        window = None
    if window is None or family in ("llama", "granite", "gemma"):
        return None, None
    if hf.get("layer_types"):
        local = [i for i, t in enumerate(_layer_types(hf["layer_types"], n_layers)) if t == "sliding_attention"]
    elif family == "gemma2":
        local = every_but(n_layers, 2)
    elif family == "gemma3_text":
        local = every_but(n_layers, hf.get("sliding_window_pattern", 6))
    elif family in ("qwen2", "qwen3"):
        local = [i for i in range(n_layers) if i >= hf.get("max_window_layers", n_layers)]
    else:  # Mistral, Phi 3: every layer
        local = list(range(n_layers))
    return (int(window), None if len(local) == n_layers else local) if local else (None, None)


def _layer_types(types: Any, n_layers: int) -> list[str]:
    """config.json's layer_types, or a UserError: one of LAYER_TYPES per layer."""
    if not isinstance(types, list) or len(types) != n_layers:
        got = f"a list of {len(types)}" if isinstance(types, list) else repr(types)
        raise UserError(f"config.json's layer_types must list one type per layer ({n_layers}, num_hidden_layers), "
                        f"not {got}; correct it")
    unknown = [t for t in types if t not in LAYER_TYPES]
    if unknown:
        raise UserError(f"config.json's layer_types holds {unknown[0]!r}; each entry must be one of "
                        f"{', '.join(LAYER_TYPES)}")
    return types


def config_from_hf(hf: dict[str, Any], name: str = "") -> Config:
    """Our Config from a Hugging Face `config.json` of one of FAMILIES."""
    hf = _set({**MISSING_KEYS.get(hf.get("model_type"), {}), **hf})  # an explicit null stays null (unset)
    _check_values(hf)
    family = _check_family(hf)
    gemma, granite = family.startswith("gemma"), family == "granite"
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu") if gemma else hf.get("hidden_act", "silu")
    if act not in HF_ACTIVATIONS:
        raise UserError(f"unsupported hidden_act {act!r} in config.json: lit-lora's MLP gates with "
                        f"{', '.join(HF_ACTIVATIONS)}")
    rope, local_rope = _rope(hf, family)
    n_heads, dim, n_layers = hf["num_attention_heads"], hf["hidden_size"], hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or dim // n_heads
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    window, local = _local_layers(hf, family, n_layers)
    local_base = local_rope.get("rope_theta") or hf.get("rope_local_base_freq") if family == "gemma3_text" else None
    return Config(
        vocab_size=hf["vocab_size"], dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim,
        hidden_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_base=float(rope["rope_theta"]), rope_scaling=_rope_scaling(rope, hf),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
        name=name, family=family,
        qkv_bias=True if family == "qwen2" else None,
        qk_norm=family in ("qwen3", "gemma3_text"),
        rope_dim=int(head_dim * partial) if partial != 1.0 else None,
        norm_unit_offset=gemma, mlp_activation=HF_ACTIVATIONS[act],
        embedding_multiplier=float(dim**0.5 if gemma else hf.get("embedding_multiplier", 1.0)),
        sandwich_norms=family in ("gemma2", "gemma3_text"),
        attention_scale=(float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5 if gemma
                         else float(hf["attention_multiplier"]) if granite else None),
        attn_softcap=hf.get("attn_logit_softcapping") if gemma else None,
        final_softcap=hf.get("final_logit_softcapping") if gemma else None,
        sliding_window=window, local_layers=local, rope_local_base=float(local_base) if local_base else None,
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        logits_scaling=float(hf.get("logits_scaling", 1.0)),
    )


def config_to_hf(c: Config) -> dict[str, Any]:
    """The `config.json` transformers needs to load this model as its family's class."""
    rope: dict[str, Any] = {"rope_type": "llama3", **c.rope_scaling} if c.rope_scaling else {}
    if rope.get("original_max_position_embeddings"):
        rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    hf: dict[str, Any] = {
        "architectures": [FAMILIES[c.family]], "model_type": c.family, "vocab_size": c.vocab_size,
        "hidden_size": c.dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.hidden_dim,
        "hidden_act": next(theirs for theirs, ours in HF_ACTIVATIONS.items() if ours == c.mlp_activation),
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_base, "rope_scaling": rope or None,
        "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias,
    }
    if c.family.startswith("gemma"):
        scalar = c.attention_scale ** -2  # transformers wants the whole number configs carry (256)
        hf.update(hidden_activation=hf["hidden_act"], query_pre_attn_scalar=round(scalar) if
                  abs(scalar - round(scalar)) < 1e-6 else scalar,
                  attn_logit_softcapping=c.attn_softcap, final_logit_softcapping=c.final_softcap)
    if c.family == "gemma3_text":
        hf["rope_local_base_freq"] = c.rope_local_base or c.rope_base
    if c.family == "granite":
        hf.update(embedding_multiplier=c.embedding_multiplier, residual_multiplier=c.residual_multiplier,
                  attention_multiplier=c.attention_scale, logits_scaling=c.logits_scaling)
    if c.family == "phi3" and c.rope_dim != c.head_dim:
        hf["partial_rotary_factor"] = c.rope_dim / c.head_dim
    if rope.get("rope_type") == "longrope":
        hf["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    hf["sliding_window"] = c.sliding_window
    if c.sliding_window is not None and c.family in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = True
    if c.sliding_window is not None and (c.local_layers is not None or c.family in ("qwen2", "qwen3")):
        hf["layer_types"] = ["sliding_attention" if c.is_local(i) else "full_attention" for i in range(c.n_layers)]
    return hf
