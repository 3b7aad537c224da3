"""Every family against transformers: a tiny random model built from the family's own config class with its
peculiarities switched on, saved, converted, run; exported back; and a LoRA on it through PEFT.

The sequences are longer than the sliding window (8), so local layers really drop keys; Phi 3's full forward
(40 tokens) passes its LongRoPE original context (32), so its long factors are exercised too.
"""
from __future__ import annotations

import json

import pytest
import torch
from adapter_helpers import randomize_lora
from conftest import write_tiny_tokenizer

from lit_lora.adapter import write_adapter_files
from lit_lora.checkpoint import load_model
from lit_lora.convert.hf import FAMILIES, convert_hf
from lit_lora.export import export_hf, export_peft
from lit_lora.fast_decode import prepare_for_generation
from lit_lora.fileio import atomic_dir
from lit_lora.generate import Sampling, generate_tokens, next_logits
from lit_lora.lora import LoRAConfig, apply_lora, lora_layers, merged_weight
from lit_lora.model import LLaMA, Config
from lit_lora.presets import PRESETS

pytest.importorskip("transformers")

VOCAB, WINDOW = 512, 8
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
LONGROPE = {"rope_type": "longrope", "rope_theta": 5000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.3, 1.7, 2.0], "long_factor": [1.5, 2.5, 4.0, 6.0],
            "original_max_position_embeddings": 32}
# family -> (transformers config class, what it switches on)
FAMILY_SETTINGS = {
    "llama": ("LlamaConfig", dict(rope_theta=5000.0)),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),  # q/k/v bias, no o bias
    "gemma": ("GemmaConfig", dict(head_dim=24, hidden_activation="gelu_pytorch_tanh")),  # (1 + w), sqrt(width)
    "qwen3": ("Qwen3Config", dict(head_dim=24)),  # per-head q/k norms, explicit head size
    "gemma2": ("Gemma2Config", dict(head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW,
                                    attn_logit_softcapping=0.5, final_logit_softcapping=0.3,
                                    tie_word_embeddings=True)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW,
                                             sliding_window_pattern=3, rope_theta=100000.0,
                                             rope_local_base_freq=500.0,
                                             rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # fused projections, partial rotary; transformers takes LongRoPE's original context from the top-level key
    "phi3": ("Phi3Config", dict(rope_parameters=LONGROPE, original_max_position_embeddings=32, pad_token_id=0)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                                      logits_scaling=2.5, attention_bias=True, mlp_bias=True)),
}
IDX = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))


def build_hf_model(family: str, **overrides):
    import transformers

    class_name, settings = FAMILY_SETTINGS[family]
    config = getattr(transformers, class_name)(**{**COMMON, **settings, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # the default init leaves norms at 1 (Gemma: 0) and biases at 0: a mix-up would not show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if family.startswith("gemma") else p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module", params=list(FAMILY_SETTINGS))
def family(request, tmp_path_factory):
    """(family, transformers model, its HF directory, our converted checkpoint)."""
    root = tmp_path_factory.mktemp(request.param)
    hf = build_hf_model(request.param)
    hf.save_pretrained(root / "hf")
    write_tiny_tokenizer(root / "hf")
    return request.param, hf, root / "hf", convert_hf(root / "hf", root / "ckpt")


def test_config_reads_the_family(family):
    name, _, _, checkpoint = family
    config = load_model(checkpoint).config
    assert config.family == name
    expected = {  # the field each family's config.json must have switched on
        "mistral": config.sliding_window == WINDOW and config.local_layers is None,
        "qwen2": config.qkv_bias and not config.attention_bias,
        "qwen3": config.qk_norm and config.head_dim == 24,
        "gemma2": config.attn_softcap == 0.5 and config.final_softcap == 0.3 and config.local_layers == [0, 2],
        "gemma3_text": config.qk_norm and config.rope_local_base == 500.0 and config.local_layers == [0, 1],
        "phi3": config.rope_dim == 8 and config.rope_scaling["original_max_position_embeddings"] == 32
        and config.rope_scaling["attention_factor"] > 1,
        "granite": config.residual_multiplier == 0.5 and config.logits_scaling == 2.5,
    }
    assert expected.get(name, config.sliding_window is None)


def test_prefill_logits_match_transformers(family):
    _, hf, _, checkpoint = family
    with torch.no_grad():
        assert (load_model(checkpoint).eval()(IDX) - hf(IDX).logits).abs().max() < 1e-4


@pytest.mark.parametrize("fused", [False, True], ids=["model", "prepared-for-generation"])
def test_kv_cache_decoding_matches_transformers(family, fused):
    """4 prompt tokens, then 16 one at a time: across the window boundary at 8."""
    _, hf, _, checkpoint = family
    model = load_model(checkpoint).eval()
    model = prepare_for_generation(model) if fused else model
    idx = IDX[:, :20]
    model.set_kv_cache(2, 20)
    with torch.no_grad():
        steps = [model(idx[:, :4], torch.arange(4))]
        steps += [model(idx[:, t : t + 1], torch.tensor([t])) for t in range(4, 20)]
        assert (torch.cat(steps, 1) - hf(idx).logits).abs().max() < 1e-4


def test_greedy_tokens_match_transformers(family):
    _, hf, _, checkpoint = family
    prompt = IDX[:1, :4]
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, 4:].tolist()
    model = prepare_for_generation(load_model(checkpoint).eval())
    ours = [int(t) for t in generate_tokens(model, [prompt[0].tolist()], Sampling(temperature=0, max_new_tokens=16))]
    assert ours == theirs


@pytest.mark.parametrize("family", ["phi3"], indirect=True)
def test_longrope_decoding_across_the_original_context_matches_transformers(family):
    """Phi 3: 28 prompt tokens, 12 generated, across LongRoPE's original context (32), where transformers drops its
    cache and prefills again with the long factors; logits of every step and the tokens."""
    _, hf, _, checkpoint = family
    prompt = IDX[:1, :28]
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
    scores = []

    def forward(model, idx, input_pos, mask):
        scores.append(next_logits(model, idx, input_pos, mask))
        return scores[-1]

    model = prepare_for_generation(load_model(checkpoint).eval())
    ours = [int(t) for t in generate_tokens(model, [prompt[0].tolist()], Sampling(temperature=0, max_new_tokens=12),
                                            forward=forward)]
    assert ours == out.sequences[0, 28:].tolist()
    assert (torch.cat(scores) - torch.cat(out.scores)).abs().max() < 1e-4


def test_export_hf_loads_as_the_family_class(family, tmp_path):
    from transformers import AutoModelForCausalLM

    name, hf, _, checkpoint = family
    export_hf(checkpoint, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [FAMILIES[name]]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(again).__name__ == FAMILIES[name]
    with torch.no_grad():
        assert (again(IDX).logits - hf(IDX).logits).abs().max() < 1e-4


def trained_adapter(checkpoint, out):
    """LoRA on every projection, trained three steps (B moves off zero) on random tokens."""
    model = apply_lora(load_model(checkpoint), LoRAConfig(r=4, alpha=8.0, dropout=0.0, targets=["attention", "mlp"]))
    randomize_lora(model, seed=1, scale=0.05)
    params = [p for layer in lora_layers(model) for p in (layer.lora_A, layer.lora_B)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        logits = model(IDX[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), IDX[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with atomic_dir(out) as tmp:
        write_adapter_files(tmp, model, checkpoint, {"template": None})
    return model.eval()


def test_lora_through_peft_and_merged(monkeypatch, capsys, family, tmp_path):
    from conftest import run_cli
    from peft import PeftModel
    from test_integrity import assert_error

    name, hf, _, checkpoint = family
    model = trained_adapter(checkpoint, tmp_path / "adapter")
    export_peft(tmp_path / "adapter", tmp_path / "peft")
    with torch.no_grad():
        ours = model(IDX)
        base = load_model(checkpoint).eval()
        assert (ours - base(IDX)).abs().max() > 1e-3  # the adapter changes the answer
        theirs = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()(IDX).logits
        assert (ours - theirs).abs().max() < 1e-4
        state = dict(base.named_parameters())
        for layer_name, layer in [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A")]:
            state[f"{layer_name}.weight"].copy_(merged_weight(layer.weight, layer.lora_A, layer.lora_B, layer.scaling))
        assert (base(IDX) - ours).abs().max() < 1e-4
    if name == "phi3":  # read back, the fused modules are named (it was refused for the rank_pattern they need)
        code, _, err = run_cli(monkeypatch, capsys, "generate", "--checkpoint_dir", checkpoint, "--lora_path",
                               tmp_path / "peft", "--prompt", "hi", "--max_new_tokens", 2, "--precision", "32-true")
        assert_error(code, err, "fused qkv_proj / gate_up_proj", "the lit-lora adapter it was exported from")


@pytest.mark.parametrize("family", ["phi3"], indirect=True)
def test_a_peft_adapter_on_phi3s_fused_projections_imports_exactly(family, tmp_path):
    """A LoRA PEFT trained on Phi 3's fused qkv_proj / gate_up_proj: each part keeps A and takes its rows of B."""
    import copy

    from peft import LoraConfig, get_peft_model

    from lit_lora.adapter import load_checked_adapter
    from lit_lora.checkpoint import load_config
    from lit_lora.lora import lora_applied

    _, hf, _, checkpoint = family
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                               init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    lora_config, state, _ = load_checked_adapter(tmp_path / "peft", checkpoint, load_config(checkpoint))
    assert sorted(lora_config.targets) == sorted(["query", "key", "value", "output", "gate", "up", "down"])
    with torch.no_grad(), lora_applied(load_model(checkpoint).eval(), lora_config, state) as model:
        ours, base = model(IDX), hf(IDX).logits
        theirs = peft_model(IDX).logits
    assert (theirs - base).abs().max() > 1e-3 and (ours - theirs).abs().max() < 1e-4


# Parameter counts the model cards state (in billions), for the presets' shapes.
PUBLISHED_SIZES = {"qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09, "qwen2.5-7b": 7.61,
                   "qwen3-0.6b": 0.6, "qwen3-1.7b": 1.7, "qwen3-4b": 4.0, "qwen3-8b": 8.2, "gemma-2-2b": 2.61,
                   "gemma-3-1b": 1.0, "phi-3.5-mini": 3.82, "phi-4-mini": 3.84, "granite-3.0-2b": 2.53,
                   "granite-3.0-8b": 8.17, "llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21, "llama-3.1-8b": 8.03,
                   "mistral-7b-v0.1": 7.24}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_preset_has_the_published_size(name):
    with torch.device("meta"):
        model = LLaMA(Config.from_name(name))
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(n - PUBLISHED_SIZES[name]) / PUBLISHED_SIZES[name] < 0.03, n
    assert name in PRESETS


# family -> a change to its config.json -> words of the one-line refusal. Before each was refused, a value of the
# wrong type or size crashed the import with a traceback, or made a checkpoint that was silently wrong (a string
# "false" tied the head to the embedding; unknown layer types were full attention) or crashed only when it ran.
@pytest.mark.parametrize("family,change,words", [
    ("qwen2", {"vision_config": {"model_type": "siglip_vision_model"}}, ["'vision_config'", "a vision tower"]),
    ("qwen2", {"num_local_experts": 8}, ["'num_local_experts'", "a mixture of experts"]),
    ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["unsupported rope_type 'yarn'"]),
    ("qwen2", {"hidden_act": "relu"}, ["unsupported hidden_act 'relu'"]),
    ("qwen2", {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]}, ["unsupported architecture"]),
    ("qwen2", {"model_type": None, "architectures": None}, ["neither model_type nor architectures"]),
    ("qwen2", {"num_attention_heads": "4"}, ["num_attention_heads in config.json", "a whole number >= 1", "'4'"]),
    ("qwen2", {"tie_word_embeddings": "false"}, ["tie_word_embeddings", "true or false"]),
    ("qwen2", {"rope_parameters": [10000.0]}, ["rope_parameters in config.json", "an object"]),
    ("qwen2", {"vocab_size": 600}, ["model.embed_tokens.weight is [512, 64]", "makes it [600, 64]", "vocab_size"]),
    ("qwen2", {"vocab_size": 100}, ["tokens, the model 100 embedding rows", "not this model's tokenizer"]),
    ("mistral", {"sliding_window": 0}, ["sliding_window in config.json", "a whole number >= 1, not 0"]),
    ("gemma2", {"layer_types": ["sliding_attention"]}, ["layer_types", "one type per layer (3", "a list of 1"]),
    ("gemma2", {"layer_types": ["local", "global", "local"]}, ["layer_types holds 'local'", "full_attention"]),
    ("gemma2", {"query_pre_attn_scalar": 0}, ["query_pre_attn_scalar in config.json", "a number > 0"]),
    ("qwen3", {"head_dim": 16}, ["makes it [16]", "head_dim"]),
    ("phi3", {"rope_parameters": {**LONGROPE, "partial_rotary_factor": 0}}, ["partial_rotary_factor", "(0, 1]"]),
    ("phi3", {"rope_parameters": {**LONGROPE, "short_factor": [1.0, 2.0]}}, ["short_factor has 2 entries", "need 4"]),
    ("phi3", {"num_key_value_heads": 1}, ["qkv_proj.weight has 128 rows", "64 + 16 + 16", "num_key_value_heads"]),
])
def test_what_the_model_cannot_compute_is_refused_by_name(monkeypatch, capsys, tmp_path, family, change, words):
    from conftest import run_cli
    from test_integrity import assert_error

    hf = build_hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    write_tiny_tokenizer(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    capsys.readouterr()  # transformers' progress bar
    code, _, err = run_cli(monkeypatch, capsys, "convert-hf", tmp_path / "hf", "--out", tmp_path / "ckpt")
    assert_error(code, err, *words)
    assert not (tmp_path / "ckpt").exists()


def test_keys_a_config_leaves_out_mean_what_transformers_assumes():
    import transformers

    from lit_lora.convert.hf import config_from_hf, config_to_hf

    base = {k: v for k, v in COMMON.items() if k != "tie_word_embeddings"}
    gemma2 = config_from_hf({**base, "model_type": "gemma2"})  # no soft-caps, window or query_pre_attn_scalar
    hf = transformers.Gemma2Config(**base)
    assert (gemma2.attn_softcap, gemma2.final_softcap, gemma2.sliding_window) == \
        (hf.attn_logit_softcapping, hf.final_logit_softcapping, hf.sliding_window)
    assert gemma2.attention_scale == hf.query_pre_attn_scalar ** -0.5
    gemma3 = config_from_hf({**base, "model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}}})  # no local RoPE settings
    assert gemma3.rope_local_base == 10000.0
    # Qwen with every layer windowed: transformers reads the export as that, not by its max_window_layers default.
    qwen = config_from_hf({**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
                           "max_window_layers": 0})
    assert qwen.sliding_window == 8 and qwen.local_layers is None
    again = transformers.Qwen2Config(**{k: v for k, v in config_to_hf(qwen).items() if k != "architectures"})
    assert again.layer_types == ["sliding_attention"] * COMMON["num_hidden_layers"]
