"""The two family recipes (configs/qwen2.5-0.5b-instruct-chat.yaml, configs/gemma-3-1b-it-chat.yaml) as a user runs
them, on a tiny random model of the family carrying the family's real chat template: convert-hf, prepare-chat (the
loss on each answer and its end-of-turn marker), finetune-lora with the recipe's settings, generate with the adapter.

Gemma 3's own template is not among ../shared's; Gemma 2's writes the same turns (<start_of_turn>, <end_of_turn>).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA, write_tiny_tokenizer
from test_chat_template import REAL, make_tokenizer_dir
from test_families import build_hf_model
from test_prepare_chat import all_examples, conversations, target_spans

from lit_lora.convert.hf import convert_hf
from lit_lora.data.conversations import prepare_chat
from lit_lora.finetune import finetune
from lit_lora.generate import Sampling, run_generate
from lit_lora.tokenizer import Tokenizer
from lit_lora.train_config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = {"qwen2": ("qwen2.5-0.5b-instruct-chat.yaml", "Qwen-Qwen2.5-7B-Instruct"),
           "gemma3_text": ("gemma-3-1b-it-chat.yaml", "google-gemma-2-2b-it")}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", list(RECIPES))
def test_recipe_runs_on_its_family(family, tmp_path, capsys):
    recipe, template_name = RECIPES[family]
    template = SHARED_DATA / "chat_templates" / f"{template_name}.jinja"
    if not template.is_file():
        pytest.skip(f"{template} is not present")
    spec = REAL[template_name]
    write_tiny_tokenizer(tmp_path / "base")
    hf_dir = make_tokenizer_dir(tmp_path / "base", tmp_path / "hf", template.read_text(encoding="utf-8"),
                                spec["bos"], spec["eos"], spec["specials"])
    build_hf_model(family, vocab_size=Tokenizer(hf_dir).vocab_size).save_pretrained(hf_dir)
    checkpoint = convert_hf(hf_dir, tmp_path / "ckpt")

    chats = tmp_path / "chats.jsonl"  # Gemma's template refuses a system message: those go
    chats.write_text("".join(json.dumps({"messages": [m for m in conv if spec["system"] or m["role"] != "system"]})
                             + "\n" for conv in conversations()))
    meta = prepare_chat(checkpoint, chats, tmp_path / "data", val_size=2)
    tokenizer = Tokenizer(checkpoint)
    expected = sorted(m["content"].strip() for conv in conversations() for m in conv if m["role"] == "assistant")
    spans = [tokenizer.decode(span, skip_special=False) for ex in all_examples(tmp_path / "data")
             for span in target_spans(ex)]
    assert meta["template"] == "chat" and all(span.rstrip("\n").endswith(spec["marker"]) for span in spans)
    assert sorted(span.rstrip("\n").removesuffix(spec["marker"]).strip() for span in spans) == expected

    config = load_config(CONFIGS / recipe, [f"--checkpoint_dir={checkpoint}", f"--data_dir={tmp_path / 'data'}",
                                            f"--out_dir={tmp_path / 'out'}", "--train.max_steps=4", "--train.global_batch_size=4",
                                            "--eval.interval=2", "--eval.max_new_tokens=2", "--precision=32-true",
                                            "--accelerator=cpu", "--train.save_interval=2"])
    summary = finetune(config)
    assert summary["steps"] == 4 and (tmp_path / "out" / "final" / "lora.safetensors").is_file()
    capsys.readouterr()
    answers = run_generate(checkpoint, prompt="What is 2 + 2?", lora_paths=[tmp_path / "out" / "final"],
                           sampling=Sampling(max_new_tokens=6, temperature=0), engine="torch", device="cpu")
    assert len(answers) == 1 and isinstance(answers[0], str)
