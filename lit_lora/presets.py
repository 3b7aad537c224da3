"""Model presets: the published shapes of the checkpoints people fine-tune, as `Config` fields.

A preset builds a model without a checkpoint (benchmarks, memory estimates, training from scratch); a converted
checkpoint always carries its own config, read from its config.json, so its values win. The numbers are those
of each model's published config.json; no hub is reachable from the machines that wrote them, so
tests/test_families.py checks each preset's parameter count against the size its model card states.
"""
from __future__ import annotations

from typing import Any

# The Llama 3 scaling constants every released Llama 3.x model uses (only `factor` varies between them).
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0}


def every_but(n_layers: int, k: int) -> list[int]:
    """The local layers of a model whose every k-th layer is global (Gemma 2: k=2, Gemma 3: k=6)."""
    return [i for i in range(n_layers) if (i + 1) % k]


_SMOLLM2 = dict(vocab_size=49152, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True)
_LLAMA3 = dict(vocab_size=128256, n_kv_heads=8, rope_base=500000.0, max_seq_len=131072)
_QWEN25 = dict(family="qwen2", vocab_size=151936, qkv_bias=True, norm_eps=1e-6, rope_base=1e6, max_seq_len=32768,
               tie_embeddings=True)
_QWEN3 = dict(family="qwen3", vocab_size=151936, head_dim=128, n_kv_heads=8, qk_norm=True, norm_eps=1e-6,
              rope_base=1e6, max_seq_len=40960, tie_embeddings=True)
_GEMMA = dict(head_dim=256, norm_unit_offset=True, mlp_activation="gelu_tanh", sandwich_norms=True,
              attention_scale=256 ** -0.5, norm_eps=1e-6, tie_embeddings=True)
_GEMMA3 = dict(_GEMMA, family="gemma3_text", qk_norm=True, rope_base=1e6, rope_local_base=10000.0)
_PHI = dict(family="phi3", dim=3072, n_layers=32, hidden_dim=8192, rope_base=10000.0, max_seq_len=4096)
_GRANITE = dict(family="granite", vocab_size=49155, n_layers=40, n_heads=32, n_kv_heads=8, embedding_multiplier=12.0,
                residual_multiplier=0.22, tie_embeddings=True, max_seq_len=4096)

PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(_SMOLLM2, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, rope_base=100000.0),
    "smollm2-360m": dict(_SMOLLM2, dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560, rope_base=100000.0),
    "smollm2-1.7b": dict(_SMOLLM2, dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192,
                         rope_base=130000.0),
    "tinyllama-1.1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                           max_seq_len=2048),
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=4096),
    "llama-2-13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, max_seq_len=4096),
    "llama-3.2-1b": dict(_LLAMA3, dim=2048, n_layers=16, n_heads=32, hidden_dim=8192,
                         rope_scaling=dict(LLAMA3_ROPE, factor=32.0), tie_embeddings=True),
    "llama-3.2-3b": dict(_LLAMA3, dim=3072, n_layers=28, n_heads=24, hidden_dim=8192,
                         rope_scaling=dict(LLAMA3_ROPE, factor=32.0), tie_embeddings=True),
    "llama-3.1-8b": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, hidden_dim=14336,
                         rope_scaling=dict(LLAMA3_ROPE, factor=8.0)),
    "mistral-7b-v0.1": dict(family="mistral", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                            hidden_dim=14336, max_seq_len=32768, sliding_window=4096),
    "qwen2.5-0.5b": dict(_QWEN25, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864),
    "qwen2.5-1.5b": dict(_QWEN25, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, hidden_dim=8960),
    "qwen2.5-3b": dict(_QWEN25, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, hidden_dim=11008),
    "qwen2.5-7b": dict(_QWEN25, vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, hidden_dim=18944,
                       tie_embeddings=False),
    "qwen3-0.6b": dict(_QWEN3, dim=1024, n_layers=28, n_heads=16, hidden_dim=3072),
    "qwen3-1.7b": dict(_QWEN3, dim=2048, n_layers=28, n_heads=16, hidden_dim=6144),
    "qwen3-4b": dict(_QWEN3, dim=2560, n_layers=36, n_heads=32, hidden_dim=9728),
    "qwen3-8b": dict(_QWEN3, dim=4096, n_layers=36, n_heads=32, hidden_dim=12288, tie_embeddings=False),
    "gemma-2-2b": dict(_GEMMA, family="gemma2", vocab_size=256000, dim=2304, n_layers=26, n_heads=8, n_kv_heads=4,
                       hidden_dim=9216, max_seq_len=8192, attn_softcap=50.0, final_softcap=30.0,
                       sliding_window=4096, local_layers=every_but(26, 2), embedding_multiplier=2304 ** 0.5),
    "gemma-3-1b": dict(_GEMMA3, vocab_size=262144, dim=1152, n_layers=26, n_heads=4, n_kv_heads=1, hidden_dim=6912,
                       max_seq_len=32768, sliding_window=512, local_layers=every_but(26, 6),
                       embedding_multiplier=1152 ** 0.5),
    # The text decoder of Gemma 3 4B (its checkpoint also holds a vision tower, which lit-lora does not read).
    "gemma-3-4b": dict(_GEMMA3, vocab_size=262208, dim=2560, n_layers=34, n_heads=8, n_kv_heads=4, hidden_dim=10240,
                       max_seq_len=131072, sliding_window=1024, local_layers=every_but(34, 6),
                       rope_scaling={"rope_type": "linear", "factor": 8.0}, embedding_multiplier=2560 ** 0.5),
    # Phi's LongRoPE factors beyond 4k tokens come with the checkpoint (convert-hf reads them); the presets
    # keep the 4k context the models were pre-trained at, with plain RoPE.
    "phi-3.5-mini": dict(_PHI, vocab_size=32064, n_heads=32, n_kv_heads=32),
    "phi-4-mini": dict(_PHI, vocab_size=200064, n_heads=24, n_kv_heads=8, rope_dim=96, tie_embeddings=True),
    "granite-3.0-2b": dict(_GRANITE, dim=2048, hidden_dim=8192, attention_scale=0.015625, logits_scaling=8.0),
    "granite-3.0-8b": dict(_GRANITE, dim=4096, hidden_dim=12800, attention_scale=0.0078125, logits_scaling=16.0),
}
