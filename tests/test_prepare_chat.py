"""prepare-chat: conversations in both formats, rendered with the checkpoint's template, masked per token, cut at
turn boundaries, and bad input refused with one line and nothing written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, snapshot

from lit_lora.data.conversations import prepare_chat
from lit_lora.data.dataset import IGNORE_INDEX, PreparedDataset
from lit_lora.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
CHATS = FIXTURES / "chat_tiny.jsonl"
ALPACA = FIXTURES / "alpaca_tiny.json"
ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def conversations() -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in CHATS.read_text().splitlines()]


def target_spans(example: dict) -> list[list[int]]:
    """The runs of consecutive target tokens of one example."""
    spans, current = [], []
    for token, label in zip(example["input_ids"].tolist(), example["labels"].tolist()):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans, current = spans + [current], []
    return spans + ([current] if current else [])


def all_examples(directory: Path) -> list[dict]:
    return [ex for split in ("train", "val") for ex in PreparedDataset(directory, split)]


def test_targets_are_each_assistant_turn_and_its_end_marker(tiny_checkpoint, tmp_path):
    meta = prepare_chat(tiny_checkpoint, CHATS, tmp_path / "out", val_size=2)
    tokenizer = Tokenizer(tiny_checkpoint)
    c = meta["counts"]
    assert (c["records"], c["examples"], c["train"], c["val"]) == (8, 8, 6, 2)
    assert meta["template"] == "chat" and meta["chat_template"]["source"] == tokenizer.chat_template
    expected = sorted([m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"] for conv in conversations())
    found = sorted([tokenizer.decode(span, skip_special=False) for span in target_spans(ex)]
                   for ex in all_examples(tmp_path / "out"))
    assert found == expected


def test_sharegpt_prepares_the_same_files_as_messages(tiny_checkpoint, tmp_path):
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": ROLES[m["role"]], "value": m["content"]} for m in conv]}
                                    for conv in conversations()]))
    prepare_chat(tiny_checkpoint, CHATS, tmp_path / "a", val_size=2)
    meta = prepare_chat(tiny_checkpoint, sharegpt, tmp_path / "b", val_size=2)
    assert meta["source"]["kind"] == "sharegpt"
    for name in ("train.safetensors", "val.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_last_and_all(tiny_checkpoint, tmp_path):
    tokenizer = Tokenizer(tiny_checkpoint)
    prepare_chat(tiny_checkpoint, CHATS, tmp_path / "last", val_size=0, train_on="last")
    last = sorted([tokenizer.decode(s, skip_special=False) for s in target_spans(ex)]
                  for ex in all_examples(tmp_path / "last"))
    assert last == sorted([[[m for m in conv if m["role"] == "assistant"][-1]["content"] + "<|im_end|>"]
                           for conv in conversations()])
    prepare_chat(tiny_checkpoint, CHATS, tmp_path / "all", val_size=0, train_on="all")
    for ex in all_examples(tmp_path / "all"):
        assert torch.equal(ex["labels"], ex["input_ids"])


def test_instruction_records_become_one_exchange(tiny_checkpoint, tmp_path):
    meta = prepare_chat(tiny_checkpoint, ALPACA, tmp_path / "out", val_size=0, system="Be brief.")
    assert meta["source"]["kind"].startswith("instructions") and meta["counts"]["empty_output"] == 1
    tokenizer = Tokenizer(tiny_checkpoint)
    outputs = {r["output"] for r in json.loads(ALPACA.read_text())}
    for ex in all_examples(tmp_path / "out"):
        text = tokenizer.decode(ex["input_ids"], skip_special=False)
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
        (span,) = target_spans(ex)
        answer = tokenizer.decode(span, skip_special=False)
        assert answer.endswith("<|im_end|>") and answer[: -len("<|im_end|>")] in outputs


def test_long_conversations_are_cut_at_a_turn_boundary(tiny_checkpoint, tmp_path):
    tokenizer = Tokenizer(tiny_checkpoint)
    longest = conversations()[2]  # three exchanges
    full = len(tokenizer.encode(tokenizer_template_text(tokenizer, longest)))
    two = len(tokenizer.encode(tokenizer_template_text(tokenizer, longest[:4])))
    meta = prepare_chat(tiny_checkpoint, CHATS, tmp_path / "out", val_size=0, max_seq_length=two)
    assert two < full and meta["counts"]["cut_at_turn"] >= 1
    for ex in all_examples(tmp_path / "out"):
        assert len(ex["input_ids"]) <= two
        spans = target_spans(ex)
        assert all(tokenizer.decode(s, skip_special=False).endswith("<|im_end|>") for s in spans)


def test_a_first_answer_too_long_is_cut_and_counted(tiny_checkpoint, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Say hello."},
                                             {"role": "assistant", "content": "hello world " * 30}]}) + "\n"
                    + CHATS.read_text())
    meta = prepare_chat(tiny_checkpoint, data, tmp_path / "out", val_size=0, max_seq_length=24)
    c = meta["counts"]
    assert c["cut_mid_turn"] >= 1 and c["examples"] + c["dropped"] == 9
    assert all(len(ex["input_ids"]) <= 24 and target_spans(ex) for ex in all_examples(tmp_path / "out"))


def tokenizer_template_text(tokenizer: Tokenizer, messages: list[dict]) -> str:
    from lit_lora.prompts.chat_template import ChatTemplate

    return ChatTemplate.from_tokenizer(tokenizer).render(messages)


# ---------------------------------------------------------------------------------------------- bad input
def without_template(tiny_checkpoint: Path, directory: Path) -> Path:
    shutil.copytree(tiny_checkpoint, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


STRICT = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
BAD_INPUT = {  # name: (records or None, extra args, words of the error)
    "unknown_role": ([{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}], [],
                     ["line 1", "role 'robot'", "system, user, assistant"]),
    "no_assistant": ([{"messages": [{"role": "user", "content": "hi"}]}], [], ["line 1", "no assistant turn"]),
    "not_alternating": ([{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                       {"role": "assistant", "content": "c"}]}], ["--template", "STRICT"],
                        ["conversation 1", "refused the conversation", "roles must alternate"]),
    "fails_to_render": (None, ["--template", "BROKEN"], ["failed to render", "UndefinedError"]),
    "no_template": (None, ["--checkpoint_dir", "NOTEMPLATE"], ["has no chat template", "--template chatml"]),
    "unknown_template": (None, ["--template", "vicuna"], ["unknown chat template 'vicuna'", "auto"]),
    "builtin_needs_tokens": (None, ["--template", "llama3"], ["llama3 template needs", "<|eot_id|>"]),
    "bad_train_on": (None, ["--train_on", "user"], ["unknown --train_on 'user'", "assistant, last, all"]),
    "val_options": (None, ["--val_fraction", "1.5"], ["--val_fraction 1.5 must be at least 0 and below 1"]),
    "only_empty_answers": ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}],
                           [], ["every record has an empty answer"]),
    "both_keys": ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                   {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                    "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "c"}]}], [],
                  ['data.jsonl: line 2: the record has both "messages" and "conversations"; keep one of the two keys']),
    "neither_shape": ([{"foo": 1}], [], ["line 1 is neither a conversation", "nor an instruction record"]),
    "content_parts": ([{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                     {"role": "assistant", "content": "x"}]}], [], ["list of content parts", "one string"]),
    "runaway_template": (None, ["--template", "RUNAWAY"], ["wrote more than 10,000,000 characters", "runaway loops"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch, capsys, case):
    records, extra, words = BAD_INPUT[case]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records) if records else CHATS.read_text())
    (tmp_path / "strict.jinja").write_text(STRICT)
    (tmp_path / "broken.jinja").write_text("{{ messages[0].content.nothing() }}")
    (tmp_path / "runaway.jinja").write_text("{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}"
                                            "{% endfor %}")
    replace = {"STRICT": str(tmp_path / "strict.jinja"), "BROKEN": str(tmp_path / "broken.jinja"),
               "RUNAWAY": str(tmp_path / "runaway.jinja"),
               "NOTEMPLATE": str(without_template(tiny_checkpoint, tmp_path / "plain-ckpt")) if case == "no_template"
               else ""}
    args = {"--checkpoint_dir": str(tiny_checkpoint), "--data_file": str(data), "--destination": str(tmp_path / "out")}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = replace.get(value, value)
    before = snapshot(tmp_path, tiny_checkpoint)
    code, _, err = run_cli(monkeypatch, capsys, "prepare-chat", *[x for pair in args.items() for x in pair])
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    for word in words:
        assert word in err
    assert not (tmp_path / "out").exists() and snapshot(tmp_path, tiny_checkpoint) == before


def test_last_keeps_the_final_answer_when_cutting(tiny_checkpoint, tmp_path):
    """With train_on=last the target is the final answer, so a long conversation loses its first exchanges instead."""
    tokenizer = Tokenizer(tiny_checkpoint)
    longest = conversations()[2]  # three exchanges
    two = len(tokenizer.encode(tokenizer_template_text(tokenizer, longest[2:])))
    meta = prepare_chat(tiny_checkpoint, CHATS, tmp_path / "out", val_size=0, train_on="last", max_seq_length=two)
    assert meta["counts"]["cut_at_turn"] >= 1
    answers = sorted(tokenizer.decode(span, skip_special=False) for ex in all_examples(tmp_path / "out")
                     for span in target_spans(ex))
    assert answers == sorted([m for m in conv if m["role"] == "assistant"][-1]["content"] + "<|im_end|>"
                             for conv in conversations())


def test_empty_answers_and_an_empty_system_prompt(tiny_checkpoint, tmp_path):
    data = tmp_path / "chats.jsonl"
    empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}
    data.write_text(json.dumps(empty) + "\n" + CHATS.read_text())
    meta = prepare_chat(tiny_checkpoint, data, tmp_path / "out", val_size=0, system="")
    assert meta["counts"]["empty_output"] == 1 and meta["counts"]["examples"] == 8
    tokenizer = Tokenizer(tiny_checkpoint)
    texts = [tokenizer.decode(ex["input_ids"], skip_special=False) for ex in all_examples(tmp_path / "out")]
    assert sum(t.startswith("<|im_start|>system\n<|im_end|>") for t in texts) == 0  # no empty system turn
