"""Data preparation: templates, readers, tokenised format, masks, truncation, determinism, bad input."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from lit_lora.data.dataset import IGNORE_INDEX, PreparedDataset
from lit_lora.data.prepare import prepare
from lit_lora.data.readers import is_placeholder_input, read_records
from lit_lora.errors import UserError
from lit_lora.prompts.builtin import instruction_template
from lit_lora.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
ALPACA = FIXTURES / "alpaca_tiny.json"
DOLLY = FIXTURES / "dolly_tiny.jsonl"


def examples(directory: Path):
    """Every prepared example of both splits."""
    return [ds[i] for split in ("train", "val") for ds in [PreparedDataset(directory, split)] for i in range(len(ds))]


def check_masks(directory: Path, tokenizer: Tokenizer, records, template_name: str) -> None:
    """Each example is exactly template prompt + response + EOS, and only response + EOS is trained on."""
    template = instruction_template(template_name).single_turn
    eos = tokenizer.decode([tokenizer.eos_id], skip_special=False)
    expected = {template.prompt(r.instruction, "" if is_placeholder_input(r.input) else r.input): r.output
                for r in records}
    for example in examples(directory):
        ids, labels = example["input_ids"], example["labels"]
        trained = labels != IGNORE_INDEX
        n_prompt = int((~trained).sum())
        assert not trained[:n_prompt].any() and trained[n_prompt:].all()  # one prompt block, then the response
        assert torch.equal(labels[trained], ids[trained])
        prompt = tokenizer.decode(ids[:n_prompt], skip_special=False)
        assert tokenizer.decode(labels[trained], skip_special=False) == expected[prompt] + eos


# ---------------------------------------------------------------------------------------------- templates, readers
def test_alpaca_template_is_stanfords():
    t = instruction_template("alpaca").single_turn
    assert t.prompt("Do X.", "some input") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDo X.\n\n"
        "### Input:\nsome input\n\n### Response:")
    assert t.prompt("Do X.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X.\n\n### Response:")
    with pytest.raises(UserError, match="unknown template"):
        instruction_template("vicuna")


@pytest.mark.parametrize("text", ["<noinput>", "<No Input>", "No input.", "[noinput]", "\\<noinput\\>",
                                  "< noinput >", "No input required"])
def test_placeholder_inputs(text):
    assert is_placeholder_input(text)


@pytest.mark.parametrize("text", ["", "None of them", "Innovation", "There is no input here, really"])
def test_real_inputs_are_not_placeholders(text):
    assert not is_placeholder_input(text)


def test_dolly_reader_maps_context_and_response_and_skips_blank_lines():
    records, fields = read_records(DOLLY, "auto")
    assert fields["input"] == "context" and len(records) == 6
    assert records[0].input.startswith("The city museum") and records[0].output == "It opened in May 1921."


# ---------------------------------------------------------------------------------------------- prepare
def test_alpaca_counts_masks_and_placeholders(tiny_checkpoint, tmp_path):
    meta = prepare(tiny_checkpoint, tmp_path / "out", data_file=ALPACA, format="alpaca", val_size=3)
    c = meta["counts"]
    assert (c["records"], c["empty_output"], c["placeholder_input"], c["examples"]) == (10, 1, 2, 9)
    assert (c["train"], c["val"]) == (6, 3)
    assert len(PreparedDataset(tmp_path / "out", "train")) == 6
    records, _ = read_records(ALPACA, "alpaca")
    tokenizer = Tokenizer(tiny_checkpoint)
    check_masks(tmp_path / "out", tokenizer, records, "alpaca")
    assert meta["tokenizer"] == tokenizer.identity()


def test_no_mask_inputs_trains_on_everything(tiny_checkpoint, tmp_path):
    prepare(tiny_checkpoint, tmp_path / "out", data_file=DOLLY, val_size=1, mask_inputs=False)
    for example in examples(tmp_path / "out"):
        assert torch.equal(example["labels"], example["input_ids"])


def test_chatml_uses_special_tokens(tiny_checkpoint, tmp_path):
    prepare(tiny_checkpoint, tmp_path / "out", data_file=DOLLY, template="chatml", val_fraction=0.3)
    tokenizer = Tokenizer(tiny_checkpoint)
    im_start = tokenizer.token_to_id("<|im_start|>")
    for example in examples(tmp_path / "out"):
        assert example["input_ids"][0] == im_start  # the marker is one token, not split into pieces
        assert example["input_ids"][-1] == tokenizer.eos_id
    check_masks(tmp_path / "out", tokenizer, read_records(DOLLY)[0], "chatml")


def test_truncation_keeps_eos_and_drops_prompts_that_do_not_fit(tiny_checkpoint, tmp_path):
    tokenizer = Tokenizer(tiny_checkpoint)
    records, _ = read_records(ALPACA, "alpaca")
    template = instruction_template("alpaca").single_turn
    prompt_lengths = sorted(len(tokenizer.encode(template.prompt(r.instruction, r.input))) for r in records)
    max_len = prompt_lengths[len(prompt_lengths) // 2] + 3  # about half the prompts leave room to answer
    meta = prepare(tiny_checkpoint, tmp_path / "out", data_file=ALPACA, val_size=0, max_seq_length=max_len)
    c = meta["counts"]
    assert c["truncated"] > 0 and c["prompt_too_long"] > 0
    assert c["examples"] == c["records"] - c["empty_output"] - c["prompt_too_long"]
    outputs = [r.output for r in records]
    for example in examples(tmp_path / "out"):
        ids, labels = example["input_ids"], example["labels"]
        assert len(ids) <= max_len and ids[-1] == tokenizer.eos_id
        response = tokenizer.decode(labels[labels != IGNORE_INDEX][:-1], skip_special=False)
        assert response and any(o.startswith(response) for o in outputs)


def test_same_seed_gives_identical_files(tiny_checkpoint, tmp_path):
    def files(out, seed):
        prepare(tiny_checkpoint, out, data_file=ALPACA, val_size=3, seed=seed)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    first = files(tmp_path / "a", 1)
    assert first == files(tmp_path / "b", 1)
    assert first["val.safetensors"] != files(tmp_path / "c", 2)["val.safetensors"]
    assert sorted(first) == ["meta.json", "train.safetensors", "val.safetensors"]


def test_dataset_is_memory_mapped_and_pickles_small(tiny_checkpoint, tmp_path):
    prepare(tiny_checkpoint, tmp_path / "out", data_file=ALPACA, val_size=2)
    ds = PreparedDataset(tmp_path / "out", "train")
    import numpy as np

    assert isinstance(ds.tokens, np.memmap)
    assert list(ds.lengths) == [len(ds[i]["input_ids"]) for i in range(len(ds))]
    copy = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    assert torch.equal(copy[-1]["labels"], ds[-1]["labels"]) and ds[0]["input_ids"].dtype == torch.long
    with pytest.raises(UserError, match="run `prepare-alpaca`"):
        PreparedDataset(tmp_path / "missing", "train")


def test_field_map_for_custom_names(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) for i in range(5)))
    assert run_cli(monkeypatch, capsys, "prepare-json", "--checkpoint_dir", tiny_checkpoint, "--data_file", data,
                   "--destination", tmp_path / "out", "--field_map", "instruction=question,output=answer",
                   "--val_size", "1")[0] == 0
    ds = PreparedDataset(tmp_path / "out", "val")
    labels = ds[0]["labels"]
    assert Tokenizer(tiny_checkpoint).decode(labels[labels != IGNORE_INDEX]).isdigit()


def test_url_is_downloaded_then_prepared(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    url = ALPACA.resolve().as_uri()  # file:// goes through urllib like https:// would, without a network
    assert run_cli(monkeypatch, capsys, "prepare-alpaca", "--checkpoint_dir", tiny_checkpoint, "--url", url,
                   "--destination", tmp_path / "out", "--val_fraction", "0.2")[0] == 0
    meta = PreparedDataset(tmp_path / "out", "val").meta
    assert meta["source"]["path"] == url and (meta["counts"]["train"], meta["counts"]["val"]) == (7, 2)


# ---------------------------------------------------------------------------------------------- bad input
BAD_INPUTS = [  # (file name, content, extra args, words the one-line error must contain)
    ("broken.json", '[{"instruction": "a", "output": ', [], ["broken.json", "not valid JSON", "line 1"]),
    ("object.json", '{"instruction": "a", "output": "b"}', [], ["object.json", "dict", "not a list"]),
    ("no_output.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', [],
     ["no_output.json", "record 2", "'output'"]),
    ("no_instruction.jsonl", '{"instruction": "a", "output": "b"}\n{"input": "x", "output": "y"}\n', [],
     ["no_instruction.jsonl", "line 2", "'instruction'"]),
    ("wrong_type.json", '[{"instruction": "a", "input": "", "output": 5}]', [],
     ["wrong_type.json", "record 1", "'output' must be a string, not int"]),
    ("bad_line.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n', [],
     ["bad_line.jsonl", "line 2", "not valid JSON"]),
    ("empty.json", "  \n", [], ["empty.json", "is empty"]),
    ("ok.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]',
     ["--field_map", "question=q"], ["--field_map", "unknown field 'question'"]),
    ("ok.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]',
     ["--max_seq_length", "8"], ["--max_seq_length 8", "too small for any prompt"]),
]


@pytest.mark.parametrize("name,content,args,words", BAD_INPUTS, ids=[f"{b[0]}{b[2][:1]}" for b in BAD_INPUTS])
def test_bad_input_is_one_line_error_and_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch, capsys, name, content, args, words):
    (tmp_path / name).write_text(content)
    out = tmp_path / "data" / "out"
    code, _, err = run_cli(monkeypatch, capsys, "prepare-json", "--checkpoint_dir", tiny_checkpoint, "--data_file",
                           tmp_path / name, "--destination", out, "--val_size", "1", *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    assert not out.exists() and not any(p.name.startswith(".out") for p in out.parent.glob("*") if out.parent.exists())


def test_failed_run_leaves_earlier_data_untouched(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    prepare(tiny_checkpoint, out, data_file=ALPACA, val_size=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="too small"):
        prepare(tiny_checkpoint, out, data_file=DOLLY, val_size=2, max_seq_length=4, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------------------------- the real files
@pytest.fixture(scope="module")
def real_tokenizer_dir(request, tiny_checkpoint) -> Path:
    """SmolLM2's tokenizer when the real model is at hand, else the tiny one."""
    try:
        return request.getfixturevalue("smollm2_checkpoint")
    except (pytest.FixtureLookupError, pytest.skip.Exception):
        return tiny_checkpoint


def test_real_alpaca_5000(shared_data, real_tokenizer_dir, tmp_path, monkeypatch, capsys):
    assert run_cli(monkeypatch, capsys, "prepare-alpaca", "--checkpoint_dir", real_tokenizer_dir, "--data_file",
                   shared_data / "alpaca_5000.json", "--destination", tmp_path / "alpaca")[0] == 0
    meta = PreparedDataset(tmp_path / "alpaca", "train").meta
    c = meta["counts"]
    assert (c["records"], c["empty_output"], c["examples"], c["train"], c["val"]) == (5000, 2, 4998, 2998, 2000)
    assert c["placeholder_input"] >= 46  # SOURCES.txt counts 46 "<No Input>"-like ones; we catch more spellings
    records, _ = read_records(shared_data / "alpaca_5000.json", "alpaca")
    val = PreparedDataset(tmp_path / "alpaca", "val")
    template = instruction_template("alpaca").single_turn
    by_prompt = {template.prompt(r.instruction, "" if is_placeholder_input(r.input) else r.input): r.output
                 for r in records}
    tokenizer = Tokenizer(real_tokenizer_dir)
    for i in range(0, len(val), 97):  # a sample: decoding all 5000 would only repeat the fixture tests
        ids, labels = val[i]["input_ids"], val[i]["labels"]
        n_prompt = int((labels == IGNORE_INDEX).sum())
        response = tokenizer.decode(labels[n_prompt:], skip_special=False)
        output = by_prompt[tokenizer.decode(ids[:n_prompt], skip_special=False)]
        eos = tokenizer.decode([tokenizer.eos_id], skip_special=False)
        assert response == output + eos or (len(ids) == 512 and output.startswith(response[: -len(eos)]))


def test_real_dolly_head(shared_data, real_tokenizer_dir, tmp_path, monkeypatch, capsys):
    path = shared_data / "dolly_first9_transcribed.jsonl"
    assert run_cli(monkeypatch, capsys, "prepare-dolly", "--checkpoint_dir", real_tokenizer_dir, "--data_file", path,
                   "--destination", tmp_path / "dolly", "--val_size", "2", "--template", "chatml")[0] == 0
    c = PreparedDataset(tmp_path / "dolly", "train").meta["counts"]
    assert (c["records"], c["examples"], c["train"], c["val"]) == (9, 9, 7, 2)
    check_masks(tmp_path / "dolly", Tokenizer(real_tokenizer_dir), read_records(path, "dolly")[0], "chatml")


def test_val_file_is_the_validation_split(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    train = [{"instruction": f"train {i}", "input": "", "output": f"t{i}"} for i in range(6)]
    val = [{"instruction": f"held out {i}", "input": "", "output": f"v{i}"} for i in range(3)]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "val.json").write_text(json.dumps(val))
    meta = prepare(tiny_checkpoint, tmp_path / "out", data_file=tmp_path / "train.json", val_file=tmp_path / "val.json",
                   format="alpaca", template="plain")
    assert meta["counts"]["train"] == 6 and meta["counts"]["val"] == 3
    tok = Tokenizer(tiny_checkpoint)
    val_data = PreparedDataset(tmp_path / "out", "val")
    assert [tok.decode(val_data[i]["input_ids"]).startswith(f"held out {i}") for i in range(3)] == [True] * 3
    with pytest.raises(UserError, match="--val_file or --val_size"):
        prepare(tiny_checkpoint, tmp_path / "out2", data_file=tmp_path / "train.json", val_file=tmp_path / "val.json",
                val_size=1)
