"""Built-in checkable tasks: determinism, sizes, an honest held-out split, answers true to their sentences."""
from __future__ import annotations

import datetime as dt
import json
import re

import pytest

from lit_lora.data import tasks
from lit_lora.data.tasks import (DATE_FORMATS, MONEY, SPLITS, TEMPLATES, amount_key, amount_texts, make_task,
                                 parse_answer, write_task)
from lit_lora.errors import UserError

N_TRAIN, N_VAL = 2000, 400


@pytest.fixture(scope="module")
def task():
    return make_task("extract", N_TRAIN, N_VAL, seed=7)


def answers(records):
    return [parse_answer(r["output"]) for r in records]


def words(records) -> set[str]:
    return {w for r in records for w in re.findall(r"[A-Za-z']+", r["input"])}


def template_pattern(template: str) -> re.Pattern:
    """A template as a regex: its fixed text literally, each slot as some text."""
    parts = re.split(r"\{\w+\}", template)
    return re.compile("(.+?)".join(re.escape(p) for p in parts))


def test_same_seed_same_records_other_seed_other_records(task):
    assert make_task("extract", N_TRAIN, N_VAL, seed=7) == task
    assert make_task("extract", N_TRAIN, N_VAL, seed=8)["train"] != task["train"]


def test_sizes_and_alpaca_shape(task):
    assert len(task["train"]) == N_TRAIN and len(task["val"]) == N_VAL
    for record in task["train"] + task["val"]:
        assert set(record) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) and v for v in record.values())
    assert make_task("extract", 1, 0, seed=0)["val"] == []


def test_one_split_does_not_depend_on_the_other_size(task):
    assert make_task("extract", 10, N_VAL, seed=7)["val"] == task["val"]
    assert make_task("extract", N_TRAIN, 5, seed=7)["train"] == task["train"]


def test_every_answer_parses_and_is_true_to_its_sentence(task):
    for record in task["train"] + task["val"]:
        parsed = parse_answer(record["output"])
        assert parsed is not None, record["output"]
        date, cents, currency = parsed
        sentence = record["input"]
        assert any(render(date) in sentence for render in DATE_FORMATS.values()), record
        assert any(spelling.format(n=n) in sentence
                   for spelling in MONEY[currency] for n in amount_texts(cents, currency)), record


def test_formats_written_as_intended():
    d = dt.date(2024, 3, 7)
    rendered = {name: render(d) for name, render in DATE_FORMATS.items()}
    assert rendered == {
        "iso": "2024-03-07", "month_day_year": "March 7, 2024", "mon_day_year": "Mar 7, 2024",
        "day_month_year": "7 March 2024", "day_mon_year": "7 Mar 2024", "ordinal": "the 7th of March 2024",
        "weekday": "Thursday, March 7, 2024", "dmy_slash": "07/03/2024 (day/month/year)",
        "mdy_slash": "03/07/2024 (month/day/year)",
    }
    assert [tasks.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"]
    assert amount_key(125050) == "1250.50" and amount_key(700) == "7.00"
    assert amount_texts(125000, "EUR") == ["1250.00", "1,250.00", "1250", "1,250"]
    assert amount_texts(125000, "JPY") == ["1250", "1,250"]
    assert parse_answer(" 2024-03-07;1250.50;EUR\n") == (d, 125050, "EUR")
    assert parse_answer("2024-02-30;1.00;EUR") is None and parse_answer("2024-03-07;1250.5;EUR") is None


def test_every_format_and_currency_spelling_is_in_training(task):
    date_formats, spellings = set(), set()
    for record in task["train"]:
        date, cents, currency = parse_answer(record["output"])
        date_formats |= {name for name, render in DATE_FORMATS.items() if render(date) in record["input"]}
        spellings |= {s for s in MONEY[currency] for n in amount_texts(cents, currency) if s.format(n=n) in record["input"]}
    assert date_formats == set(DATE_FORMATS)
    assert spellings == {s for all_spellings in MONEY.values() for s in all_spellings}


def test_held_out_templates_never_in_training(task):
    assert not set(TEMPLATES["train"]) & set(TEMPLATES["val"])
    patterns = {split: [template_pattern(t) for t in TEMPLATES[split]] for split in SPLITS}
    for split in SPLITS:
        other = "val" if split == "train" else "train"
        for record in task[split]:
            assert any(p.fullmatch(record["input"]) for p in patterns[split]), record["input"]
            assert not any(p.fullmatch(record["input"]) for p in patterns[other]), record["input"]


def test_held_out_names_never_in_training(task):
    for pool in (tasks.FIRST_NAMES, tasks.SURNAMES, tasks.MERCHANTS):
        assert not set(pool["train"]) & set(pool["val"])
    train_words = words(task["train"])
    held_out_names = tasks.FIRST_NAMES["val"] + tasks.SURNAMES["val"]
    assert not train_words & set(held_out_names)
    train_text = "\n".join(r["input"] for r in task["train"])
    assert not [m for m in tasks.MERCHANTS["val"] if m in train_text]
    # and the held-out split does use them
    val_text = "\n".join(r["input"] for r in task["val"])
    assert all(m in val_text for m in tasks.MERCHANTS["val"])


def test_held_out_dates_and_amounts_never_in_training(task):
    train, val = answers(task["train"]), answers(task["val"])
    assert not {d for d, _, _ in train} & {d for d, _, _ in val}
    assert not {c for _, c, _ in train} & {c for _, c, _ in val}
    assert all(tasks.is_held_out("date", d.isoformat()) for d, _, _ in val)
    assert not any(tasks.is_held_out("amount", amount_key(c)) for _, c, _ in train)
    # Across seeds too: the split is a property of the values, not of the seed.
    other_val = answers(make_task("extract", 1, N_VAL, seed=99)["val"])
    assert not {d for d, _, _ in train} & {d for d, _, _ in other_val}


def test_write_task_writes_alpaca_json(tmp_path, task):
    paths = write_task("extract", tmp_path / "task", 50, 20, seed=7)
    assert json.loads(paths["train"].read_text()) == make_task("extract", 50, 20, seed=7)["train"]
    assert json.loads(paths["val"].read_text()) == task["val"][:20]
    from lit_lora.data.readers import read_records
    records, _ = read_records(paths["val"], "alpaca")
    assert [r.output for r in records] == [r["output"] for r in task["val"][:20]]


@pytest.mark.parametrize("name, n_train, n_val, seed, message", [
    ("sums", 10, 10, 0, "unknown task 'sums'; choose one of extract"),
    ("extract", 0, 10, 0, "n_train must be a whole number from 1"),
    ("extract", 10, -1, 0, "n_val must be a whole number from 0"),
    ("extract", 10**6, 10, 0, "n_train must be a whole number from 1 to 100,000"),
    ("extract", 2.5, 10, 0, "n_train must be a whole number"),
    ("extract", True, 10, 0, "n_train must be a whole number"),
    ("extract", 10, 10, "x", "seed must be a whole number"),
])
def test_bad_input_is_a_user_error(name, n_train, n_val, seed, message):
    with pytest.raises(UserError, match=re.escape(message)):
        make_task(name, n_train, n_val, seed)


def test_write_task_refuses_a_file_as_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        write_task("extract", tmp_path / "f", 5, 5)
