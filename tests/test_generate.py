"""generate: KV-cache decoding, batching, sampling, streaming, adapters, bad input; and the real model."""
from __future__ import annotations

import io

import pytest
import torch
from adapter_helpers import make_adapter
from conftest import run_cli, snapshot

from lit_lora.checkpoint import load_model
from lit_lora.prompts.builtin import BUILTINS
from lit_lora.errors import UserError
from lit_lora.generate import Sampling, generate_tokens, run_generate, sample
from lit_lora.lora import LoRAConfig
from lit_lora.text_stream import TextStream
from lit_lora.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread

GREEDY = Sampling(max_new_tokens=20, temperature=0)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint).eval()


def tokens(model, prompts, sampling=GREEDY, generator=None):
    """(B, n) generated ids."""
    return torch.stack(list(generate_tokens(model, prompts, sampling, generator=generator)), dim=1)


def test_kv_cache_greedy_equals_full_recompute(model):
    prompt = [5, 17, 42, 99, 3, 250, 8]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(GREEDY.max_new_tokens):  # no cache: the whole sequence through the model each step
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert tokens(model, [prompt])[0].tolist() == ids[len(prompt):]


def test_batch_equals_one_by_one(model):
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [300, 2, 77, 41, 9]]
    batch = tokens(model, prompts)
    for row, prompt in zip(batch, prompts):
        assert row.tolist() == tokens(model, [prompt])[0].tolist()


def test_sampling_rules(model):
    logits = torch.randn(3, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, Sampling(temperature=1.0, top_k=1)), greedy)
    assert torch.equal(sample(logits, Sampling(temperature=1.0, top_k=None, top_p=1e-6)), greedy)
    picks = torch.stack([sample(logits, Sampling(temperature=1.0, top_k=3)) for _ in range(50)], 1)
    top3 = logits.topk(3).indices
    assert all(set(row.tolist()) <= set(t.tolist()) for row, t in zip(picks, top3))
    hot = Sampling(max_new_tokens=10, temperature=1.5, top_k=None)
    a = tokens(model, [[5, 6, 7]], hot, torch.Generator().manual_seed(3))
    b = tokens(model, [[5, 6, 7]], hot, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_text_stream_keeps_characters_whole_and_stops_at_stop_strings(tiny_checkpoint):
    tokenizer = Tokenizer(tiny_checkpoint)
    text = "Paris é 😀 über ### Response: done ### Instruction: never printed"
    stream = TextStream(tokenizer, {2}, BUILTINS["alpaca"].stop_strings)
    pieces = []
    for token in tokenizer.encode(text, bos=False):
        pieces.append(stream.add(token))
        assert "\ufffd" not in pieces[-1]
        if stream.done:
            break
    assert stream.done and "".join(pieces) == stream.text == "Paris é 😀 über ### Response: done "
    stream = TextStream(tokenizer, {2}, ())
    out = "".join(stream.add(t) for t in tokenizer.encode("ab", bos=False) + [2, 5])
    assert out == "ab" and stream.done


def test_multiple_adapters_match_separate_runs(tmp_path, tiny_checkpoint):
    a = make_adapter(tiny_checkpoint, tmp_path / "a", seed=1)
    b = make_adapter(tiny_checkpoint, tmp_path / "b", seed=2, targets=("mlp",), template="alpaca")
    settings = dict(sampling=Sampling(max_new_tokens=12, temperature=0.9, top_k=50), seed=7, precision="32-true",
                    out=io.StringIO(), log=io.StringIO())
    both = run_generate(tiny_checkpoint, "hello world", lora_paths=[a, b], **settings)
    alone = [run_generate(tiny_checkpoint, "hello world", lora_paths=[p], **settings)[0] for p in (a, b)]
    base = run_generate(tiny_checkpoint, "hello world", **settings)
    assert both == alone and base[0] not in both


def test_cli_generate_streams_and_reports(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n\nthe quick brown fox\n")
    code, out, err = run_cli(monkeypatch, capsys, "generate", "--checkpoint_dir", tiny_checkpoint, "--prompt",
                             "hello", "--max_new_tokens", "8", "--temperature", "0", "--precision", "32-true")
    assert code == 0 and "Time for inference:" in err and "tokens/sec" in err and "Memory used:" in err
    streamed = out
    code, out, _ = run_cli(monkeypatch, capsys, "generate", "--checkpoint_dir", tiny_checkpoint, "--prompt",
                           "hello", "--max_new_tokens", "8", "--temperature", "0", "--precision", "32-true", "--no-stream")
    assert code == 0 and out == streamed
    code, out, _ = run_cli(monkeypatch, capsys, "generate", "--checkpoint_dir", tiny_checkpoint, "--prompts_file",
                           prompts, "--max_new_tokens", "4", "--temperature", "0")
    assert code == 0 and "## prompt 2" in out


@pytest.mark.parametrize("args,expected", [
    (["--top_k", "0"], "--top_k"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--top_p", "nan"], "--top_p must be a finite number, got nan"),
    (["--top_p", "-inf"], "--top_p must be a finite number, got -inf"),
    (["--prompt", "hello " * 400], "context"),
    (["--lora_path", "ADAPTER_OTHER_BASE"], "another checkpoint"),
    (["--lora_path", "ADAPTER_CORRUPT"], "lora.safetensors"),
    (["--precision", "int8"], "--precision"),
])
def test_cli_generate_bad_input(monkeypatch, capsys, tmp_path, tiny_checkpoint, args, expected):
    from conftest import make_tiny_checkpoint

    if "ADAPTER_OTHER_BASE" in args:
        other = make_tiny_checkpoint(tmp_path / "other", seed=9)
        args = ["--lora_path", make_adapter(other, tmp_path / "adapter")]
    if "ADAPTER_CORRUPT" in args:
        adapter = make_adapter(tiny_checkpoint, tmp_path / "adapter")
        (adapter / "lora.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        args = ["--lora_path", adapter]
    if "--prompt" not in args:
        args = ["--prompt", "hello", *args]
    before = snapshot(tiny_checkpoint, tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "generate", "--checkpoint_dir", tiny_checkpoint, *args)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and expected in err
    assert out == "" and snapshot(tiny_checkpoint, tmp_path) == before


@pytest.mark.slow
def test_real_model_knows_the_capital_of_france(smollm2_checkpoint):
    answer = run_generate(smollm2_checkpoint, "What is the capital of France?", template="chatml",
                          sampling=Sampling(max_new_tokens=24, temperature=0), out=io.StringIO(), log=io.StringIO())
    assert "Paris" in answer[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_model_computes_the_same(tiny_checkpoint, dtype):
    """Fused matmuls and packed weights change speed, not results; merged adapters still reach them."""
    from lit_lora.adapter import merge_adapter, restore_weights
    from lit_lora.fast_decode import prepare_for_generation, repack

    plain = load_model(tiny_checkpoint, dtype).eval()
    prepared = prepare_for_generation(load_model(tiny_checkpoint, dtype).eval())
    idx = torch.tensor([[5, 17, 42, 99, 3, 250, 8]])
    with torch.no_grad():
        torch.testing.assert_close(prepared(idx), plain(idx), atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=0)
    assert tokens(prepared, [idx[0].tolist()]).tolist() == tokens(plain, [idx[0].tolist()]).tolist()
    state = {f"layers.{i}.{name}.lora_{ab}": torch.randn(shape) for i in range(2)
             for name, a_shape, b_shape in [("self_attn.k_proj", (4, 64), (32, 4)), ("mlp.up_proj", (4, 64), (128, 4))]
             for ab, shape in (("A", a_shape), ("B", b_shape))}
    config = LoRAConfig(r=4, alpha=4, targets=["key", "up"])
    merge_adapter(plain, config, state)
    originals = merge_adapter(prepared, config, state)
    repack(prepared)
    with torch.no_grad():
        torch.testing.assert_close(prepared(idx), plain(idx), atol=1e-4 if dtype == torch.float32 else 5e-2, rtol=0)
        restore_weights(prepared, originals)
        repack(prepared)
        assert torch.equal(prepared(idx), prepare_for_generation(load_model(tiny_checkpoint, dtype).eval())(idx))
