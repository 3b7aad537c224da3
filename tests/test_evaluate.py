"""evaluate: the same loss as finetune-lora's validation, batched exact match equal to one at a time, bad input."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from adapter_helpers import make_adapter
from conftest import run_cli, snapshot
from test_finetune import prepared, run  # noqa: F401  (fixtures)

from lit_lora.evaluate import evaluate, normalize

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, prepared, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "out"
    torch.set_num_threads(1)
    return out, run(tiny_checkpoint, prepared, out)


def test_loss_equals_the_runs_last_validation_loss(tiny_checkpoint, prepared, trained):
    out, summary = trained
    # tiny.yaml validates on eval.max_batches (2) x micro_batch_size (2) examples in 32-true.
    result = evaluate(tiny_checkpoint, prepared, [out / "final"], metric="loss", limit=4, batch_size=2,
                      precision="32-true", progress=False)
    base, tuned = result["models"]
    assert tuned["loss"] == pytest.approx(summary["val_loss_last"], rel=1e-6)
    assert base["loss"] == pytest.approx(summary["val_loss_first"], rel=1e-6)
    assert tuned["loss"] < base["loss"]


def test_batched_exact_match_equals_one_at_a_time(tiny_checkpoint, prepared, trained):
    out, _ = trained
    kwargs = dict(metric="exact_match", max_new_tokens=6, precision="32-true", progress=False)
    batched = evaluate(tiny_checkpoint, prepared, [out / "final"], batch_size=8, **kwargs)
    single = evaluate(tiny_checkpoint, prepared, [out / "final"], batch_size=1, **kwargs)
    assert batched["predictions"] == single["predictions"]
    assert [m["exact_match"] for m in batched["models"]] == [m["exact_match"] for m in single["models"]]
    assert batched["n"] == 8 and all(len(p["answers"]) == 2 for p in batched["predictions"])


def test_exact_match_counts_strict_and_normalised(tiny_checkpoint, tmp_path):
    # References equal to what the model answers score 1; the normalised match folds case and spaces.
    assert normalize("  The  Answer\n") == normalize("the answer")
    records = [{"instruction": "hello world", "input": "", "output": "x"}]
    (tmp_path / "one.json").write_text(json.dumps(records))
    first = evaluate(tiny_checkpoint, tmp_path / "one.json", metric="exact_match", max_new_tokens=4,
                     precision="32-true", progress=False)
    answer = first["predictions"][0]["answers"]["base"]
    records[0]["output"] = f"  {answer.upper()}  " if answer.strip() else "unlikely"
    (tmp_path / "one.json").write_text(json.dumps(records))
    second = evaluate(tiny_checkpoint, tmp_path / "one.json", metric="exact_match", max_new_tokens=4,
                      precision="32-true", progress=False)
    base = second["models"][0]
    if answer.strip() and answer.upper() != answer:
        assert base["exact_match"] == 0.0 and base["exact_match_normalized"] == 1.0


def test_cli_table_json_and_out(tiny_checkpoint, prepared, trained, tmp_path, monkeypatch, capsys):
    out, _ = trained
    code, stdout, _ = run_cli(monkeypatch, capsys, "evaluate", "--checkpoint_dir", tiny_checkpoint, "--data", prepared,
                              "--lora_path", out / "final", "--limit", 4, "--max_new_tokens", 4,
                              "--precision", "32-true", "--json", "--out", tmp_path / "res.json")
    assert code in (0, None)
    scores = json.loads(stdout)
    assert [m["name"] for m in scores["models"]] == ["base", str(out / "final")]
    assert {"loss", "perplexity", "exact_match", "exact_match_normalized", "n"} <= set(scores["models"][0])
    saved = json.loads((tmp_path / "res.json").read_text())
    assert len(saved["predictions"]) == 4 and "reference" in saved["predictions"][0]
    code, stdout, _ = run_cli(monkeypatch, capsys, "evaluate", "--checkpoint_dir", tiny_checkpoint, "--data", prepared,
                              "--limit", 2, "--metric", "loss", "--precision", "32-true")
    assert code in (0, None) and stdout.splitlines()[0].split()[:3] == ["model", "loss", "ppl"]


def test_bad_input_is_one_line(tiny_checkpoint, prepared, tmp_path, monkeypatch, capsys):
    from conftest import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other", seed=1, n_layers=3)
    other_tok = tmp_path / "other_tok"
    shutil.copytree(tiny_checkpoint, other_tok)
    tok = json.loads((other_tok / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|changed|>"
    (other_tok / "tokenizer.json").write_text(json.dumps(tok))
    foreign = make_adapter(other, tmp_path / "foreign")
    no_outputs = tmp_path / "prompts.json"
    no_outputs.write_text(json.dumps([{"instruction": "hi"}]))
    empty_val = tmp_path / "empty_val"
    from lit_lora.data.prepare import prepare

    (tmp_path / "r.json").write_text(json.dumps([{"instruction": f"n {i}", "output": "x"} for i in range(3)]))
    prepare(tiny_checkpoint, empty_val, data_file=tmp_path / "r.json", val_size=0)
    cases = [
        (("--data", prepared, "--checkpoint_dir", other_tok), "prepared with another tokenizer"),
        (("--data", empty_val), "split of"),
        (("--data", prepared, "--limit", 0), "--limit must be >= 1"),
        (("--data", no_outputs, "--metric", "exact_match"), "no reference outputs"),
        (("--data", prepared, "--lora_path", foreign), "another model"),
    ]
    for args, message in cases:
        if "--checkpoint_dir" not in args:
            args = ("--checkpoint_dir", tiny_checkpoint, *args)
        code, stdout, stderr = run_cli(monkeypatch, capsys, "evaluate", *args, "--precision", "32-true")
        assert code == 2, (args, stderr)
        assert stderr.startswith("error:") and message in stderr and stderr.count("\n") == 1, stderr


def test_quickstart_flow_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    """The README's first command's stages, in order, through the CLI: prepare-task, evaluate (base),
    finetune-lora, evaluate (before/after), merge-lora, generate with the merged model."""
    from conftest import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "tiny", max_seq_len=1024)
    data, out = tmp_path / "task", tmp_path / "run"

    def cli(*args) -> str:
        code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
        assert code in (0, None), stderr
        return stdout

    assert "(64 train, 8 val)" in cli("prepare-task", "extract", "--checkpoint_dir", ckpt, "--destination", data,
                                      "--n_train", 64, "--n_val", 8, "--max_seq_length", 1024)
    before = json.loads(cli("evaluate", "--checkpoint_dir", ckpt, "--data", data, "--max_new_tokens", 4, "--json"))
    assert [m["name"] for m in before["models"]] == ["base"] and before["n"] == 8
    cli("finetune-lora", "--config", Path(__file__).parents[1] / "configs" / "tiny.yaml", "--checkpoint_dir", ckpt,
        "--data_dir", data, "--out_dir", out, "--eval.max_new_tokens", 2)
    table = cli("evaluate", "--checkpoint_dir", ckpt, "--lora_path", out / "final", "--data", data,
                "--max_new_tokens", 4, "--precision", "32-true")
    rows = table.splitlines()
    assert rows[1].startswith("base") and rows[2].startswith(str(out / "final")) and "%" in rows[2]
    assert (out / "loss.png").is_file()
    cli("merge-lora", "--checkpoint_dir", ckpt, "--lora_path", out / "final", "--out", tmp_path / "merged")
    common = ("--prompt", "hello world", "--template", "chatml", "--temperature", 0, "--max_new_tokens", 6,
              "--precision", "32-true")
    merged = cli("generate", "--checkpoint_dir", tmp_path / "merged", *common)
    assert merged == cli("generate", "--checkpoint_dir", ckpt, "--lora_path", out / "final", *common)


def test_baseline_rows_are_reused_not_rescored(tiny_checkpoint, prepared, trained, tmp_path, monkeypatch):
    out, _ = trained
    kwargs = dict(limit=4, max_new_tokens=4, precision="32-true", progress=False)
    both = evaluate(tiny_checkpoint, prepared, [out / "final"], **kwargs)
    (tmp_path / "base.json").write_text(json.dumps(evaluate(tiny_checkpoint, prepared, **kwargs)))
    import lit_lora.evaluate as ev

    scored = []
    original = ev.score_answers
    monkeypatch.setattr(ev, "score_answers", lambda *a: (scored.extend(s.name for s, _ in a[-2]), original(*a))[1])
    reused = evaluate(tiny_checkpoint, prepared, [out / "final"], baseline=tmp_path / "base.json", **kwargs)
    assert scored == [str(out / "final")]  # the base came from the file
    strip = lambda r: [{k: v for k, v in m.items() if k != "seconds"} for m in r["models"]]  # noqa: E731
    assert strip(reused) == strip(both) and reused["predictions"] == both["predictions"]
    with pytest.raises(Exception, match="scored other examples"):
        evaluate(tiny_checkpoint, prepared, [out / "final"], baseline=tmp_path / "base.json", limit=3,
                 max_new_tokens=4, precision="32-true", progress=False)


# ---------------------------------------------------------------------------------------------- bad input
def refused_before_the_work(monkeypatch, capsys, roots, *args) -> str:
    """The one error line of `evaluate ARGS`, which must come before the checkpoint is even read, and leave every
    file under `roots` as it was."""
    import lit_lora.evaluate as ev

    def work(*_):
        raise AssertionError("the work started before the destination was checked")

    monkeypatch.setattr(ev, "load_config", work)
    before = snapshot(*roots)
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", *args)
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert snapshot(*roots) == before
    return err


def test_out_that_is_an_input_or_cannot_be_written_is_refused_first(tiny_checkpoint, prepared, tmp_path, monkeypatch,
                                                                    capsys):
    raw, baseline, not_a_dir = tmp_path / "raw.json", tmp_path / "base.json", tmp_path / "file.txt"
    raw.write_text(json.dumps([{"instruction": "hello", "output": "world"}]))
    baseline.write_text("{}")
    not_a_dir.write_text("x")
    (tmp_path / "sub").mkdir()
    os.link(raw, tmp_path / "link.json")
    cases = [
        (raw, f"--out {raw} is the input {raw}"),
        (tmp_path / "sub" / ".." / "raw.json", "is the input"),
        (tmp_path / "link.json", "is the input"),
        (baseline, f"--out {baseline} is the input {baseline}"),
        (prepared / "meta.json", f"is inside the input {prepared}"),
        (tmp_path / "missing" / "res.json", f"the directory {tmp_path / 'missing'} does not exist; create it"),
        (not_a_dir / "res.json", f"the directory {not_a_dir} is not a directory"),
        (tmp_path / "sub", f"--out {tmp_path / 'sub'} is a directory; name a file"),
    ]
    for out, message in cases:
        data = prepared if out.parent == prepared else raw
        err = refused_before_the_work(monkeypatch, capsys, [tmp_path, prepared], "--checkpoint_dir", tiny_checkpoint,
                                      "--data", data, "--baseline", baseline, "--out", out)
        assert message in err, err
    assert not (tmp_path / "missing").exists()


def test_baseline_is_matched_by_the_examples_not_the_path(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from lit_lora.data.prepare import prepare

    def records(answer: str) -> str:
        return json.dumps([{"instruction": f"n {i}", "output": answer} for i in range(3)])

    (tmp_path / "r.json").write_text(records("x"))
    prepare(tiny_checkpoint, tmp_path / "data", data_file=tmp_path / "r.json", val_size=0)
    kwargs = dict(split="train", metric="loss", precision="32-true", progress=False)
    evaluate(tiny_checkpoint, tmp_path / "data", out=tmp_path / "base.json", **kwargs)
    shutil.copytree(tmp_path / "data", tmp_path / "moved")  # the same data at another path: the baseline holds
    again = evaluate(tiny_checkpoint, tmp_path / "moved", baseline=tmp_path / "base.json", **kwargs)
    assert again["models"] == json.loads((tmp_path / "base.json").read_text())["models"]

    (tmp_path / "r.json").write_text(records("y"))  # prepared again, at the same path, with other answers
    prepare(tiny_checkpoint, tmp_path / "data", data_file=tmp_path / "r.json", val_size=0, overwrite=True)
    old = json.loads((tmp_path / "base.json").read_text())
    del old["examples_sha256"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    for baseline, message in [("base.json", "scored other examples (as many, with other content"),
                              ("old.json", "records no hash of the examples it scored")]:
        before = snapshot(tmp_path)
        code, out, err = run_cli(monkeypatch, capsys, "evaluate", "--checkpoint_dir", tiny_checkpoint, "--data",
                                 tmp_path / "data", "--split", "train", "--metric", "loss", "--precision", "32-true",
                                 "--baseline", tmp_path / baseline, "--out", tmp_path / "new.json")
        assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert snapshot(tmp_path) == before and not (tmp_path / "new.json").exists()
