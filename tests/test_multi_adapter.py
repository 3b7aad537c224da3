"""Several adapters trained together over one base (`adapters:`): each exactly as if trained alone, and bad input."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from lit_lora.data.prepare import prepare
from lit_lora.errors import UserError
from lit_lora.finetune import finetune
from lit_lora.train_config import load_config
from test_finetune import ONE_THREAD, TINY, assert_same_adapter, prepared, tiny_args  # noqa: F401  (a fixture)
from test_integrity import assert_error, assert_not_written

pytestmark = pytest.mark.usefixtures("one_thread")

# Two adapters unlike in every way they may differ: rank, targets, variant, learning rate, LoRA+ and data (whose
# examples are longer, so their micro-batches are padded to another length).
TWO = ("[{name: small, r: 2, dropout: 0.1}, {name: wide, r: 4, targets: [attention, mlp], variant: dora, "
       "learning_rate: 0.005, lora_plus_ratio: 4, data_dir: DATA}]")


@pytest.fixture(scope="module")
def longer(tiny_checkpoint, tmp_path_factory) -> Path:
    """Other data: 24 records whose answers are longer than `prepared`'s."""
    root = tmp_path_factory.mktemp("longer")
    records = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i + 3)))}
               for i in range(24)]
    (root / "records.json").write_text(json.dumps(records))
    prepare(tiny_checkpoint, root / "prepared", data_file=root / "records.json", format="alpaca", template="alpaca",
            val_size=4, max_seq_length=64)
    return root / "prepared"


def together(checkpoint: Path, data: Path, other: Path, out: Path, *overrides: str):
    return load_config(TINY, tiny_args(checkpoint, data, out, f"--adapters={TWO.replace('DATA', str(other))}",
                                       "--lora.dropout=0.05", *overrides))


@pytest.mark.parametrize("overrides", [(), ("--train.gradient_checkpointing=true", "--train.packing=true")],
                         ids=["padded", "checkpointed-packed"])
def test_adapters_trained_together_equal_each_trained_alone(tiny_checkpoint, prepared, longer, tmp_path, overrides):
    # 4 micro-batches per step (accumulation), dropout on, 6 steps over 32 and 20 examples: both cross an epoch.
    config = together(tiny_checkpoint, prepared, longer, tmp_path / "together", *overrides)
    summary = finetune(config)
    assert set(summary["adapters"]) == {"small", "wide"}
    for name, solo in config.solo_configs().items():
        solo.out_dir = str(tmp_path / "alone" / name)
        alone = finetune(solo)
        ours = tmp_path / "together" / name
        assert_same_adapter(ours / "final", tmp_path / "alone" / name / "final", rtol=1e-5, atol=1e-6)
        assert summary["adapters"][name]["steps"] == alone["steps"] == 6
        for key in ("tokens_seen", "trainable_params", "total_params"):
            assert summary["adapters"][name][key] == alone[key], key
        assert summary["adapters"][name]["val_loss_last"] == pytest.approx(alone["val_loss_last"], rel=1e-5)
        for file in ("config.yaml", "metrics.csv", "summary.json", "loss.png", "step-000003/training_state.pt"):
            assert (ours / file).is_file(), file


def test_resume_after_a_kill_continues_each_adapter_exactly(tiny_checkpoint, prepared, longer, tmp_path):
    config = together(tiny_checkpoint, prepared, longer, tmp_path / "straight")
    finetune(config)
    killed = tmp_path / "killed"  # as a kill during step 5 leaves it: step-000003/ and metrics, no final/
    for name in ("small", "wide"):
        (killed / name).mkdir(parents=True)
        shutil.copytree(tmp_path / "straight" / name / "step-000003", killed / name / "step-000003")
        shutil.copy(tmp_path / "straight" / name / "metrics.csv", killed / name / "metrics.csv")
    resumed = finetune(together(tiny_checkpoint, prepared, longer, killed), resume="auto")
    for name in ("small", "wide"):
        assert resumed["adapters"][name]["steps_this_run"] == 3
        assert_same_adapter(tmp_path / "straight" / name / "final", killed / name / "final", rtol=0, atol=0)
    # Each adapter's checkpoint is that of a run of it alone: one continues alone from it, as it would have.
    solo = load_config(TINY, tiny_args(tiny_checkpoint, prepared, tmp_path / "alone", "--lora.dropout=0.1",
                                       "--lora.r=2"))
    shutil.copytree(tmp_path / "straight/small/step-000003", tmp_path / "alone/step-000003")
    finetune(solo, resume="auto")
    assert_same_adapter(tmp_path / "straight/small/final", tmp_path / "alone/final", rtol=0, atol=0)


def test_bad_adapters_are_one_line_and_write_nothing(tiny_checkpoint, prepared, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    cases = [
        ("[{name: a}, {name: a, r: 2}]", "two adapters are named 'a'"),
        ("[{name: a}, {name: b/c}]", "adapters[1] (b/c) needs a name of letters"),
        ("[{name: a}, {r: 2}]", "adapters[1] needs a name"),
        ("[{name: a, variant: dora, targets: [query, head]}]", "adapters[0] (a): lora.variant dora cannot take"),
        ("[{name: a}, {name: b, rank: 2}]", "unknown config key adapters[1].rank"),
        ("[{name: a}, {name: b, r: 0}]", "adapters[1] (b): LoRA rank r must be >= 1"),
        ("[{name: a}, {name: b, learning_rate: -1}]", "adapters[1] (b): train.learning_rate must be > 0"),
        ("[{name: a}, {name: b, data_dir: nowhere}]", "adapter b: nowhere holds no prepared train data"),
        ("[{name: a, targets: [query, head]}]", "the head target cannot be trained in adapters:"),
        ("[{name: a}, {name: train}]", "adapters[1] (train): the name 'train' is taken"),
    ]
    for adapters, message in cases:
        code, _, err = run_cli(monkeypatch, capsys, "finetune-lora", "--config", TINY,
                               *tiny_args(tiny_checkpoint, prepared, out, f"--adapters={adapters}"))
        assert_error(code, err, message)
        assert_not_written(out)
    with pytest.raises(UserError, match="--resume .* names one checkpoint"):
        finetune(together(tiny_checkpoint, prepared, prepared, out), resume=str(tmp_path))
    assert_not_written(out)


def test_sweep_trains_scores_and_reports_each_combination(tiny_checkpoint, prepared, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    code, printed, err = run_cli(monkeypatch, capsys, "finetune-lora", "--config", TINY,
                                 *tiny_args(tiny_checkpoint, prepared, out, "--eval.max_batches=null"),
                                 "--sweep", "r=1,4", "--sweep", "variant=lora,dora")
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [row["name"] for row in rows] == ["base", "r1-lora", "r1-dora", "r4-lora", "r4-dora"]
    assert (out / "sweep.png").stat().st_size > 0 and "| r4-dora | 4 | dora |" in (out / "sweep.md").read_text()
    for row in rows[1:]:  # the table's loss is the adapter's own: its run's last validation (of the whole split)
        summary = json.loads((out / row["name"] / "summary.json").read_text())
        assert float(row["val_loss"]) == pytest.approx(summary["val_loss_last"], rel=1e-5)
        assert int(row["adapter_bytes"]) == summary["adapter_bytes"]
    sizes = {row["name"]: int(row["trainable_params"]) for row in rows}
    assert sizes["r4-lora"] == 4 * sizes["r1-lora"] and sizes["r1-dora"] > sizes["r1-lora"]


@pytest.mark.parametrize("specs, message", [
    (["r=1,x"], "--sweep r: 'x' is not a rank"),
    (["r=0"], "--sweep r: '0' is not a rank"),
    (["rank=1,2"], "--sweep 'rank=1,2' is not KEY=V1,V2"),
    (["r=2", "r=4"], "--sweep names r twice"),
    (["variant=lora,qlora"], "--sweep variant: 'qlora' is not one of lora, dora"),
])
def test_bad_sweeps_are_one_line_and_write_nothing(tiny_checkpoint, prepared, tmp_path, monkeypatch, capsys, specs,
                                                   message):
    out = tmp_path / "sweep"
    flags = [arg for spec in specs for arg in ("--sweep", spec)]
    code, _, err = run_cli(monkeypatch, capsys, "finetune-lora", "--config", TINY,
                           *tiny_args(tiny_checkpoint, prepared, out), *flags)
    assert_error(code, err, message)
    assert_not_written(out)


def test_ddp_two_processes_train_adapters_together_as_one_process(tiny_checkpoint, prepared, longer, tmp_path):
    adapters = TWO.replace("DATA", str(longer)).replace("dropout: 0.1", "dropout: 0.0")  # one process draws for all
    common = ("--train.max_steps=2", "--eval.interval=100", "--train.micro_batch_size=2", f"--adapters={adapters}")
    cmd = [sys.executable, "-m", "lit_lora.cli", "finetune-lora", "--config", str(TINY),
           *tiny_args(tiny_checkpoint, prepared, tmp_path / "ddp", *common, "--devices=2", "--strategy=ddp")]
    done = subprocess.run(cmd, env=ONE_THREAD, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    finetune(load_config(TINY, tiny_args(tiny_checkpoint, prepared, tmp_path / "single", *common)))
    for name in ("small", "wide"):
        assert_same_adapter(tmp_path / "ddp" / name / "final", tmp_path / "single" / name / "final", rtol=1e-5,
                            atol=1e-6)


def test_sweep_names_are_folder_names():
    from lit_lora.sweep import sweep_adapters

    entries = sweep_adapters(["r=16", "learning_rate=0.001,2e-3", "use_rslora=false,true"])
    assert [e.name for e in entries] == ["r16-lr0p001", "r16-lr0p001-rslora", "r16-lr0p002", "r16-lr0p002-rslora"]
    assert [(e.r, e.learning_rate, e.use_rslora) for e in entries][1] == (16, 0.001, True)


def test_adapters_ending_at_different_steps_each_end_as_alone(tiny_checkpoint, prepared, longer, tmp_path):
    # One epoch: 32 examples are 4 steps of 8, the other data's 20 are 2; the shorter one then sits out.
    config = together(tiny_checkpoint, prepared, longer, tmp_path / "together", "--train.max_steps=null",
                      "--train.epochs=1")
    summary = finetune(config)
    assert {name: s["steps"] for name, s in summary["adapters"].items()} == {"small": 4, "wide": 2}
    solo = config.solo_configs()["wide"]
    solo.out_dir = str(tmp_path / "alone")
    finetune(solo)
    assert_same_adapter(tmp_path / "together/wide/final", tmp_path / "alone/final", rtol=1e-5, atol=1e-6)


def test_a_diverging_adapter_stops_the_run_before_any_adapter_steps(tiny_checkpoint, prepared, longer, tmp_path,
                                                                     monkeypatch):
    import lit_lora.finetune as ft

    real, calls = ft.segment_losses, []

    def wide_nan_from_the_second_step(model, batch, rows, chunk_size):
        losses = real(model, batch, rows, chunk_size)
        calls.append(1)
        return [loss * float("nan") if len(calls) > 4 and name == "wide" else loss
                for loss, (name, *_) in zip(losses, rows)]

    monkeypatch.setattr(ft, "segment_losses", wide_nan_from_the_second_step)
    with pytest.raises(UserError, match="training loss of adapter wide became nan at step 2"):
        finetune(together(tiny_checkpoint, prepared, longer, tmp_path / "out", "--train.save_interval=1"))
    for name in ("small", "wide"):  # both stopped at their step-1 checkpoint, neither stepped again
        assert sorted(p.name for p in (tmp_path / "out" / name).glob("step-*")) == ["step-000001"]
        assert not (tmp_path / "out" / name / "final").exists()


def test_16_mixed_is_refused_for_adapters_together(tiny_checkpoint, prepared, longer, tmp_path):
    with pytest.raises(UserError, match="precision 16-mixed cannot train several adapters together"):
        finetune(together(tiny_checkpoint, prepared, longer, tmp_path / "out", "--precision=16-mixed"))
    assert_not_written(tmp_path / "out")


def test_longrope_past_its_original_context_is_refused_together(prepared, tmp_path):
    from conftest import make_tiny_checkpoint

    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 32}
    checkpoint = make_tiny_checkpoint(tmp_path / "phi", rope_scaling=longrope)
    config = load_config(TINY, tiny_args(checkpoint, prepared, tmp_path / "out", "--adapters=[{name: a}, {name: b}]"))
    with pytest.raises(UserError, match="LongRoPE changes its rotation past 32 positions, .* data reach 64"):
        finetune(config)
    assert_not_written(tmp_path / "out")


def test_a_ddp_sweep_is_scored_once(tiny_checkpoint, prepared, tmp_path):
    cmd = [sys.executable, "-m", "lit_lora.cli", "finetune-lora", "--config", str(TINY),
           *tiny_args(tiny_checkpoint, prepared, tmp_path / "sweep", "--train.max_steps=2", "--devices=2",
                      "--strategy=ddp", "--train.micro_batch_size=4"), "--sweep", "r=1,2"]
    done = subprocess.run(cmd, env=ONE_THREAD, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("adapters scored on the validation split") == 1
    assert len(list(csv.DictReader(open(tmp_path / "sweep/sweep.csv")))) == 3  # the base and r1, r2
