"""Model import: HF directories (parity with transformers), GGUF files written here, and bad inputs via the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SPECIAL_TOKENS, run_cli, tiny_config, write_tiny_tokenizer

from lit_lora.checkpoint import load_model, weight_files
from lit_lora.convert.gguf import convert_gguf
from lit_lora.convert.hf import convert_hf
from lit_lora.errors import UserError
from lit_lora.model import LLaMA, rope_inv_freq
from lit_lora.tokenizer import Tokenizer

VOCAB = 512
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def save_hf_model(directory: Path, seed: int = 0, n_kv_heads: int = 2, tied: bool = False, rope_scaling=None,
                  **save_kwargs):
    """A random tiny LlamaForCausalLM saved with save_pretrained, plus tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=5000.0, rope_scaling=rope_scaling, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the default init leaves norms at 1: make them random too, so a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory, **save_kwargs)
    write_tiny_tokenizer(directory)
    return model


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def our_logits(checkpoint_dir: Path, idx: torch.Tensor) -> torch.Tensor:
    model = load_model(checkpoint_dir).eval()
    with torch.no_grad():
        return model(idx)


IDX = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n_kv_heads,tied,rope_scaling", [
    (4, False, None),  # multi-head, untied
    (2, True, None),  # grouped-query, tied
    (2, False, LLAMA3_ROPE),  # grouped-query, Llama 3 frequency scaling
    (1, True, LLAMA3_ROPE),  # multi-query, tied, scaled
])
def test_convert_hf_matches_transformers(tmp_path, n_kv_heads, tied, rope_scaling):
    hf = save_hf_model(tmp_path / "hf", n_kv_heads=n_kv_heads, tied=tied, rope_scaling=rope_scaling)
    out = convert_hf(tmp_path / "hf", tmp_path / "ckpt")
    config = load_model(out).config
    assert (config.n_kv_heads, config.tie_embeddings, config.rope_scaling is not None) == (n_kv_heads, tied, bool(rope_scaling))
    assert (our_logits(out, IDX) - hf_logits(hf, IDX)).abs().max() < 1e-4
    assert Tokenizer(out).encode("<|im_start|>user") == Tokenizer(tmp_path / "hf").encode("<|im_start|>user")


def test_convert_hf_sharded_safetensors_and_dtype(tmp_path):
    hf = save_hf_model(tmp_path / "hf", max_shard_size="100KB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1  # really sharded
    out = convert_hf(tmp_path / "hf", tmp_path / "ckpt", max_shard_bytes=200_000)
    assert len(weight_files(out)) > 1  # and re-sharded on our side
    assert (our_logits(out, IDX) - hf_logits(hf, IDX)).abs().max() < 1e-4
    bf16 = convert_hf(tmp_path / "hf", tmp_path / "bf16", dtype="bf16")
    assert load_model(bf16).embed_tokens.weight.dtype == torch.bfloat16


def test_convert_hf_pytorch_bin(tmp_path):
    from safetensors.torch import load_file

    hf = save_hf_model(tmp_path / "hf")
    # save_pretrained writes safetensors only now; make the legacy layout from it: two .bin shards + index.
    state = load_file(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / "hf" / file)
    (tmp_path / "hf" / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: file for file, keys in shards.items() for k in keys}}))
    out = convert_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert (our_logits(out, IDX) - hf_logits(hf, IDX)).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------- GGUF
def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (written out here independently of our inverse)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_tiny_gguf(path: Path, model: LLaMA, tokenizer_dir: Path, qtype: str = "F32", arch: str = "llama",
                    tokenizer_kind: str = "gpt2") -> dict[str, torch.Tensor]:
    """Write `model` as llama.cpp would; returns the weights as the file holds them (after quantisation)."""
    import gguf
    from gguf.quants import dequantize, quantize

    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.n_layers)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_feed_forward_length(c.hidden_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_freq_base(c.rope_base)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    writer.add_tokenizer_model(tokenizer_kind)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{{ messages }}")
    if c.rope_scaling:  # llama.cpp stores Llama 3 scaling as per-frequency divisors
        plain = rope_inv_freq(type(c)(**{**c.to_dict(), "rope_scaling": None}))
        writer.add_tensor("rope_freqs.weight", (plain / rope_inv_freq(c)).numpy())

    held = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue
        w = tensor.numpy()
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, c.n_heads)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, c.n_kv_heads)
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            module, _ = rest.rsplit(".", 1)
            gguf_name = f"blk.{i}.{GGUF_NAMES[module]}.weight"
        else:
            gguf_name = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
        if qtype == "Q8_0" and w.ndim == 2:  # norms stay F32, as llama.cpp keeps them
            data = quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            w = dequantize(data, gguf.GGMLQuantizationType.Q8_0).reshape(w.shape)
        elif qtype == "F16" and w.ndim == 2:
            w = w.astype(np.float16)
            writer.add_tensor(gguf_name, w)
            w = w.astype(np.float32)
        else:
            writer.add_tensor(gguf_name, w)
        held[name] = torch.from_numpy(np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # The weights in the file, back in HF row order: what a correct import must reproduce.
    for name in held:
        if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
            n = c.n_heads if "q_proj" in name else c.n_kv_heads
            rows, cols = held[name].shape
            held[name] = held[name].reshape(n, rows // n // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return held


def tiny_source_model(tokenizer_dir: Path, **overrides) -> LLaMA:
    write_tiny_tokenizer(tokenizer_dir)
    model = LLaMA(tiny_config(Tokenizer(tokenizer_dir).vocab_size, **overrides))
    model.init_weights(seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("qtype,overrides", [
    ("F32", dict(tie_embeddings=True)),
    ("F32", dict(tie_embeddings=False, n_kv_heads=4, rope_scaling={"factor": 8.0, **{
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0}})),
    ("F16", dict(tie_embeddings=False)),
    ("Q8_0", dict(tie_embeddings=True)),
])
def test_convert_gguf_matches_source(tmp_path, qtype, overrides):
    model = tiny_source_model(tmp_path / "tok", **overrides)
    held = write_tiny_gguf(tmp_path / "tiny.gguf", model, tmp_path / "tok", qtype)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "ckpt")

    reference = LLaMA(model.config).eval()
    reference.load_state_dict(held, strict=False)
    reference.tie_weights()
    if qtype == "F16":  # the checkpoint is all fp16, F32 norms included
        reference.half().float()
    # Quantised files become fp32 by default; unquantised ones keep their own type.
    assert load_model(out).embed_tokens.weight.dtype == (torch.float16 if qtype == "F16" else torch.float32)
    converted = load_model(out, dtype=torch.float32).eval()
    assert converted.config.tie_embeddings == model.config.tie_embeddings
    assert converted.config.rope_scaling == model.config.rope_scaling
    assert converted.config.norm_eps == model.config.norm_eps
    idx = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (converted(idx) - reference(idx)).abs().max() < 1e-4
    if qtype == "Q8_0":  # the file really was quantised: the weights moved, a little
        assert 0 < (held["layers.0.mlp.up_proj.weight"] - model.layers[0].mlp.up_proj.weight).abs().max() < 0.01

    ours, original = Tokenizer(out), Tokenizer(tmp_path / "tok")
    text = "<|im_start|>user\nThe capital of France is Paris.<|im_end|>"
    assert ours.encode(text) == original.encode(text)
    assert ours.token_to_id("<|im_start|>") == 1 and ours.encode("<|im_end|>") == [2]
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, False)
    assert ours.chat_template == "{{ messages }}"


# ---------------------------------------------------------------------------------------------- bad input
def run_cli_err(monkeypatch, capsys, *args) -> tuple[int, str]:
    code, _, err = run_cli(monkeypatch, capsys, *args)
    return code, err


def assert_clean_failure(code: int, err: str, out: Path, expected: str) -> None:
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert expected in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp leftovers


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "tiny"
    save_hf_model(directory)
    return directory


def copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_cli_convert_hf_works(monkeypatch, capsys, tmp_path, hf_dir):
    code, _, _ = run_cli(monkeypatch, capsys, "convert-hf", hf_dir, "--out", tmp_path / "ckpt")
    assert code == 0 and (tmp_path / "ckpt" / "model_config.yaml").is_file()
    code, _, err = run_cli(monkeypatch, capsys, "convert-hf", hf_dir, "--out", tmp_path / "ckpt")
    assert code == 2 and "--overwrite" in err
    code, _, _ = run_cli(monkeypatch, capsys, "convert-hf", hf_dir, "--out", tmp_path / "ckpt", "--overwrite")
    assert code == 0


def _no_config(src: Path) -> None:
    (src / "config.json").unlink()


def _gpt2_config(src: Path) -> None:
    (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))


def _truncated(src: Path) -> None:
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _no_tokenizer(src: Path) -> None:
    (src / "tokenizer.json").unlink()


def _missing_tensor(src: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(src / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, src / "model.safetensors")


def _extra_tensor(src: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(src / "model.safetensors")
    state["model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, src / "model.safetensors")


@pytest.mark.parametrize("damage,expected", [
    (_no_config, "no config.json"),
    (_gpt2_config, "unsupported architecture"),
    (_truncated, "truncated"),
    (_no_tokenizer, "no tokenizer"),
    (_missing_tensor, "layers.1.mlp.up_proj.weight"),
    (_extra_tensor, "unexpected tensor"),
])
def test_cli_convert_hf_bad_input(monkeypatch, capsys, tmp_path, hf_dir, damage, expected):
    src = copy_dir(hf_dir, tmp_path / "src")
    damage(src)
    out = tmp_path / "out" / "ckpt"
    out.parent.mkdir()
    assert_clean_failure(*run_cli_err(monkeypatch, capsys, "convert-hf", src, "--out", out), out, expected)


def test_cli_convert_hf_missing_dir_and_bad_dtype(monkeypatch, capsys, tmp_path, hf_dir):
    out = tmp_path / "ckpt"
    assert_clean_failure(*run_cli_err(monkeypatch, capsys, "convert-hf", tmp_path / "nope", "--out", out), out, "does not exist")
    assert_clean_failure(*run_cli_err(monkeypatch, capsys, "convert-hf", hf_dir, "--out", out, "--dtype", "int3"), out, "dtype")


@pytest.mark.parametrize("arch,kind,expected", [("gpt2", "gpt2", "architecture"), ("llama", "llama", "tokenizer kind")])
def test_cli_convert_gguf_unsupported(monkeypatch, capsys, tmp_path, arch, kind, expected):
    model = tiny_source_model(tmp_path / "tok", n_layers=1)
    write_tiny_gguf(tmp_path / "m.gguf", model, tmp_path / "tok", arch=arch, tokenizer_kind=kind)
    out = tmp_path / "ckpt"
    assert_clean_failure(*run_cli_err(monkeypatch, capsys, "convert-gguf", tmp_path / "m.gguf", "--out", out), out, expected)


def test_cli_convert_gguf_sizes_that_do_not_fit_the_tensors(monkeypatch, capsys, tmp_path):
    """Metadata whose sizes are not the tensors' was written into a checkpoint that crashed when it loaded."""
    import dataclasses

    model = tiny_source_model(tmp_path / "tok", n_layers=1)
    model.config = dataclasses.replace(model.config, hidden_dim=96)  # the metadata says 96, the tensors hold 128
    write_tiny_gguf(tmp_path / "m.gguf", model, tmp_path / "tok")
    out = tmp_path / "ckpt"
    assert_clean_failure(*run_cli_err(monkeypatch, capsys, "convert-gguf", tmp_path / "m.gguf", "--out", out), out,
                         "its GGUF metadata makes it")


def test_cli_convert_gguf_not_gguf(monkeypatch, capsys, tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 truncated")
    out = tmp_path / "ckpt"
    assert_clean_failure(*run_cli_err(monkeypatch, capsys, "convert-gguf", tmp_path / "x.gguf", "--out", out), out, "GGUF")
    assert_clean_failure(*run_cli_err(monkeypatch, capsys, "convert-gguf", tmp_path / "no.gguf", "--out", out), out, "does not exist")


def test_cli_download_errors(monkeypatch, capsys, tmp_path):
    out = tmp_path / "ckpt"
    code, _, err = run_cli(monkeypatch, capsys, "download", "gpt-5", "--out", out)
    assert_clean_failure(code, err, out, "smollm2-135m-instruct")  # lists the known names
    # pip cannot reach any index: a clear error, not a traceback (and nothing cached).
    monkeypatch.setenv("LIT_LORA_CACHE", str(tmp_path / "cache"))
    for var, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
                       "PIP_NO_INDEX": "", "PIP_CONFIG_FILE": "/dev/null", "PIP_NO_CACHE_DIR": "1"}.items():
        monkeypatch.setenv(var, value)
    code, _, err = run_cli(monkeypatch, capsys, "download", "smollm2-135m-instruct", "--out", out)
    assert_clean_failure(code, err, out, "could not download")
    assert not list((tmp_path / "cache").rglob("*.gguf"))
