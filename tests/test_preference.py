"""Preference tuning: prepare-preference, DPO and ORPO against their papers' formulas, training, evaluate, bad input."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, snapshot
from lit_lora.checkpoint import load_model
from lit_lora.data.dataset import IGNORE_INDEX, PreparedDataset
from lit_lora.data.preference import prepare_preference
from lit_lora.evaluate import evaluate
from lit_lora.finetune import finetune
from lit_lora.lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable
from lit_lora.preference import (PreferencePairs, batch_log_probs, dpo_losses, first_difference, orpo_losses,
                                 preference_terms, reference_weights, sft_weight, snapshot as lora_snapshot)
from lit_lora.data.batching import collate
from lit_lora.tokenizer import Tokenizer
from lit_lora.train_config import PreferenceSection, load_config
from test_finetune import TINY, assert_same_adapter, tiny_args
from test_integrity import assert_error, assert_not_written

pytestmark = pytest.mark.usefixtures("one_thread")


def pair_records(n: int = 40) -> list[dict]:
    return [{"prompt": f"Say the number {i}.", "chosen": f"The number is {i}.", "rejected": f"It is {i + 1}, I think."}
            for i in range(n)]


@pytest.fixture(scope="module")
def pairs_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    (root / "pairs.json").write_text(json.dumps(pair_records()))
    prepare_preference(tiny_checkpoint, root / "pairs.json", root / "prepared", template="chatml", val_size=8,
                       max_seq_length=64)
    return root / "prepared"


# ---------------------------------------------------------------------------------------------- formulas
def test_dpo_and_orpo_equal_the_papers_formulas():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(6, generator=g, dtype=torch.float64) * 30 for _ in range(4))
    beta, eps = 0.3, 0.1
    losses, chosen, rejected = dpo_losses(pc, pr, rc, rr, beta, eps)
    for i in range(6):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        sig = 1 / (1 + math.exp(-z))
        assert losses[i].item() == pytest.approx(-(1 - eps) * math.log(sig) - eps * math.log(1 - sig), abs=1e-9)
        assert chosen[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item(), abs=1e-12)
    losses, chosen, rejected = dpo_losses(pc, pr, rc, rr, beta, loss="ipo")  # the IPO paper's eq. 17, on sums
    for i in range(6):
        h = ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        assert losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, abs=1e-9)
        assert rejected[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item(), abs=1e-12)
    at_start, _, _ = dpo_losses(pc, pr, pc, pr, beta, loss="ipo")
    assert torch.allclose(at_start, torch.full_like(pc, 1 / (4 * beta ** 2)))
    pc = torch.cat([rc[:3] + 0.7, rc[3:] - 0.7])  # three chosen answers above the reference, three below it
    losses, chosen, _ = dpo_losses(pc, pr, rc, rr, beta, eps, loss="dpop", dpop_lambda=20.0)  # DPOP's eq. 3
    for i in range(6):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]) - 20.0 * max(0.0, (rc[i] - pc[i]).item())).item()
        sig = 1 / (1 + math.exp(-z))
        assert losses[i].item() == pytest.approx(-(1 - eps) * math.log(sig) - eps * math.log(1 - sig), abs=1e-9)
        assert chosen[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item(), abs=1e-12)
    assert torch.equal(losses[:3], dpo_losses(pc, pr, rc, rr, beta, eps)[0][:3])  # no penalty above the reference
    mc, mr = pc / 40, pr / 40  # mean token log-probs
    terms, chosen, _ = orpo_losses(mc, mr, beta)
    for i in range(6):
        p, q = math.exp(mc[i].item()), math.exp(mr[i].item())
        log_odds_ratio = math.log(p / (1 - p)) - math.log(q / (1 - q))
        assert terms[i].item() == pytest.approx(beta * math.log(1 + math.exp(-log_odds_ratio)), abs=1e-9)
        assert chosen[i].item() == pytest.approx(beta * mc[i].item())


def test_first_difference_keeps_each_pair_up_to_its_first_different_token():
    I = IGNORE_INDEX
    targets = torch.tensor([[I, 5, 6, 7, 2], [I, 5, 9, 7, 2],   # differ at position 2, the same after it
                            [I, 5, 2, I, I], [I, 5, 6, 2, I],   # chosen a prefix of rejected: its end marker differs
                            [I, I, 4, 2, I], [I, I, 8, 8, 2]])  # differ at the first answer token
    before = targets.clone()
    assert first_difference(targets).tolist() == [[I, 5, 6, I, I], [I, 5, 9, I, I], [I, 5, 2, I, I],
                                                   [I, 5, 6, I, I], [I, I, 4, I, I], [I, I, 8, I, I]]
    assert torch.equal(targets, before)  # the batch's own targets are untouched: the SFT term reads them


def reference_log_probs(model, batch, compare: str = "whole") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed target log-probabilities per row, their number), the plain way: full logits, log_softmax, gather,
    masked sum; with first_difference, each pair's tokens cut after the first position, found by a loop, where its
    targets differ."""
    logits = model(batch["input_ids"]).float()
    targets = batch["targets"]
    mask = targets != IGNORE_INDEX
    if compare == "first_difference":
        for i in range(0, len(targets), 2):
            where = [t for t in range(targets.shape[1]) if targets[i, t] != targets[i + 1, t]]
            if where:
                mask[i:i + 2, where[0] + 1:] = False
    logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * mask).sum(1), mask.sum(1)


@pytest.mark.parametrize("method, weight, compare", [("dpo", None, "whole"), ("dpo", 0.5, "whole"),
                                                     ("orpo", None, "whole"), ("orpo", 0.25, "whole"),
                                                     ("dpo", 0.5, "first_difference"),
                                                     ("orpo", None, "first_difference"),
                                                     ("ipo", None, "whole"), ("ipo", 0.5, "first_difference"),
                                                     ("dpop", None, "whole"), ("dpop", 0.5, "first_difference")])
def test_loss_and_gradients_equal_an_independent_implementation(tiny_checkpoint, pairs_dir, method, weight, compare):
    method, loss = ("dpo", method) if method in ("ipo", "dpop") else (method, "sigmoid")
    model = load_model(tiny_checkpoint, torch.float32)
    apply_lora(model, LoRAConfig(r=4, dropout=0.0, targets=["attention", "mlp"]))
    mark_only_lora_as_trainable(model)
    reference = lora_snapshot(model)  # B = 0: the base
    with torch.no_grad():  # move the policy away from the reference
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    pairs = PreferencePairs(PreparedDataset(pairs_dir, "train"))
    batch = collate(pairs.rows([0, 3, 5]), pad_id=2)
    beta, eps = 0.2, 0.0 if loss == "ipo" else 0.05
    p = PreferenceSection(beta=beta, label_smoothing=eps, loss=loss, dpop_lambda=5.0)

    with reference_weights(model, reference):
        ref = batch_log_probs(model, batch, chunk_size=3, compare=compare).logps
    rows = batch_log_probs(model, batch, chunk_size=3, compare=compare)  # the chunked head of training
    losses, chosen, _, nll = preference_terms(method, rows, ref, p)
    ours = losses.mean() + sft_weight(method, weight) * nll / rows.whole_counts[0::2].sum()
    assert (rows.counts < rows.whole_counts).all() == (compare == "first_difference")
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    with torch.no_grad():
        base = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                base[name] = p.clone()
                p.copy_(reference[name])
        ref_plain = reference_log_probs(model, batch, compare)[0]
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(base[name])
    policy, n = reference_log_probs(model, batch, compare)
    pc, pr = policy[0::2], policy[1::2]
    whole, whole_n = reference_log_probs(model, batch)
    chosen_nll = -whole[0::2].sum() / whole_n[0::2].sum()  # always over the whole chosen answers
    h = (pc - ref_plain[0::2]) - (pr - ref_plain[1::2])
    if loss == "ipo":  # the squared distance of the log-ratio margin from 1 / (2 beta)
        theirs = ((h - 1 / (2 * beta)) ** 2).mean() + (weight or 0) * chosen_nll
    elif method == "dpo":  # RPO with a weight: DPO plus the chosen answers' NLL per token times it
        below = torch.relu(ref_plain[0::2] - pc)  # DPOP: how far each chosen answer fell below the reference
        z = beta * (h - 5.0 * below if loss == "dpop" else h)
        dpo = (-(1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z))).mean()
        theirs = dpo + (weight or 0) * chosen_nll
    else:  # the paper's NLL + beta * odds-ratio term, the NLL reweighted when asked
        p_c, p_r = torch.exp(pc / n[0::2]), torch.exp(pr / n[1::2])
        ratio = torch.log(p_c / (1 - p_c)) - torch.log(p_r / (1 - p_r))
        theirs = (1 if weight is None else weight) * chosen_nll - beta * torch.log(torch.sigmoid(ratio)).mean()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert any(g.abs().max() > 1e-4 for g in grads.values())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- data
def test_the_record_shapes_prepare_the_same_pairs(tiny_checkpoint, tmp_path):
    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                       "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pair_records(12)]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in conversational]
    sharegpt = [{"conversations": [{"from": "human", "value": r["prompt"]}], "chosen": {"from": "gpt",
                 "value": r["chosen"]}, "rejected": {"from": "gpt", "value": r["rejected"]}} for r in pair_records(12)]
    arrays = []
    for i, records in enumerate([pair_records(12), conversational, implicit, sharegpt]):
        (tmp_path / f"{i}.json").write_text(json.dumps(records))
        meta = prepare_preference(tiny_checkpoint, tmp_path / f"{i}.json", tmp_path / f"out{i}", template="chatml",
                                  val_size=2)
        assert meta["preference"] and meta["counts"]["pairs"] == 12
        data = PreparedDataset(tmp_path / f"out{i}", "train")
        arrays.append((data.tokens.tolist(), data.targets.tolist(), data.offsets.tolist()))
    assert all(a == arrays[0] for a in arrays[1:])

    tokenizer = Tokenizer(tiny_checkpoint)
    pairs = PreferencePairs(PreparedDataset(tmp_path / "out0", "train"))
    chosen, rejected = pairs[0]
    text = [tokenizer.decode(e["input_ids"][e["labels"] != IGNORE_INDEX].tolist(), skip_special=False)
            for e in (chosen, rejected)]
    record = next(r for r in pair_records(12) if text[0].startswith(r["chosen"]))
    assert text == [record["chosen"] + "<|im_end|>", record["rejected"] + "<|im_end|>"]  # the answers only
    p = int(pairs.examples.prompt_lengths[0])
    assert chosen["input_ids"][:p].tolist() == rejected["input_ids"][:p].tolist()


def test_long_pairs_lose_first_exchanges_then_answer_tokens_and_are_counted(tiny_checkpoint, tmp_path):
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello " * 30},
               {"role": "assistant", "content": "world " * 30}, {"role": "user", "content": "Say it."}]
    records = [{"prompt": history, "chosen": "Yes.", "rejected": "No."},  # fits once its first exchange goes
               {"prompt": [{"role": "user", "content": "Say it."}], "chosen": "yes " * 80, "rejected": "no " * 80},
               {"prompt": [{"role": "user", "content": "hello " * 80}], "chosen": "a", "rejected": "b"},
               *pair_records(3)]
    (tmp_path / "long.json").write_text(json.dumps(records))
    meta = prepare_preference(tiny_checkpoint, tmp_path / "long.json", tmp_path / "out", template="chatml",
                              max_seq_length=48, val_size=0)
    c = meta["counts"]
    assert (c["cut_at_turn"], c["answer_cut"], c["dropped"], c["pairs"]) == (1, 1, 1, 5)
    data = PreparedDataset(tmp_path / "out", "train")
    assert data.lengths.max() <= 48
    assert len(PreferencePairs(data)) == 5


@pytest.mark.parametrize("record, words", [
    ({"prompt": "Hi", "chosen": "Hello"}, ["record 2", "rejected"]),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}, ["record 2", "same answer"]),
    ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"}],
      "rejected": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "B"}]},
     ["record 2", "different prompts"]),
    ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}],
      "rejected": "C"}, ["one assistant answer"]),
])
def test_bad_pairs_are_refused_in_one_line_and_nothing_is_written(tiny_checkpoint, tmp_path, monkeypatch, capsys,
                                                                  record, words):
    (tmp_path / "bad.json").write_text(json.dumps([pair_records(1)[0], record]))
    code, _, err = run_cli(monkeypatch, capsys, "prepare-preference", "--checkpoint_dir", tiny_checkpoint,
                           "--data_file", tmp_path / "bad.json", "--destination", tmp_path / "out")
    assert_error(code, err, *words)
    assert_not_written(tmp_path / "out")


def test_the_task_pairs_share_the_instruction_datas_prompts(tiny_checkpoint, tmp_path):
    from lit_lora.data.tasks import make_task, prepare_task

    plain = make_task("extract", 30, 5)
    pairs = make_task("extract", 30, 5, pairs=True)
    for a, b in zip(plain["train"] + plain["val"], pairs["train"] + pairs["val"]):
        assert {k: b[k] for k in a} == a and b["rejected"] != a["output"]
    sft = prepare_task("extract", tiny_checkpoint, tmp_path / "sft", n_train=30, n_val=5, template="chatml")
    pref = prepare_task("extract", tiny_checkpoint, tmp_path / "pref", n_train=30, n_val=5, template="chatml",
                        preference=True)
    assert pref["counts"]["pairs"] == 35 and pref["counts"]["val"] == 10
    for split in ("train", "val"):
        a, b = PreparedDataset(tmp_path / "sft", split), PreparedDataset(tmp_path / "pref", split)
        for i in range(len(a)):  # the SFT example is the chosen one, token for token
            assert b[2 * i]["input_ids"].tolist()[: len(a[i]["input_ids"])] == a[i]["input_ids"].tolist()
            assert b.prompt_lengths[2 * i] == a.prompt_lengths[i]


def test_the_real_pairs_prepare(smollm2_checkpoint, shared_data, tmp_path):
    meta = prepare_preference(smollm2_checkpoint, shared_data / "dpo_en_demo.json", tmp_path / "out",
                              max_seq_length=1024)
    c = meta["counts"]
    assert meta["source"]["kind"] == "sharegpt" and c["records"] == 300
    assert c["pairs"] + c["dropped"] + c["prompt_tokens_differ"] == 300 and c["val"] == 2 * round(0.1 * c["pairs"])
    PreferencePairs(PreparedDataset(tmp_path / "out", "val"))


# ---------------------------------------------------------------------------------------------- training
def dpo_config(checkpoint: Path, data: Path, out: Path, *overrides: str):
    return load_config(TINY, tiny_args(checkpoint, data, out, "--method=dpo", "--lora.dropout=0",
                                       "--train.learning_rate=0.01", "--train.warmup_steps=1", "--eval.interval=4",
                                       *overrides))


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_dpo_starts_at_log_2_with_zero_rewards_and_learns_the_preference(tiny_checkpoint, pairs_dir, tmp_path):
    summary = finetune(dpo_config(tiny_checkpoint, pairs_dir, tmp_path / "out", "--train.max_steps=8"))
    logged = rows(tmp_path / "out" / "metrics.csv")
    first_train = next(r for r in logged if r["split"] == "train")
    for row in (logged[0], first_train):  # step-0 validation, the first step's loss
        assert float(row["loss"]) == pytest.approx(math.log(2), abs=1e-6)
        assert float(row["rewards_chosen"]) == float(row["rewards_rejected"]) == float(row["margin"]) == 0
        assert float(row["accuracy"]) == 0.5
    last_val = [r for r in logged if r["split"] == "val"][-1]
    assert float(last_val["loss"]) < math.log(2) - 0.05 and float(last_val["accuracy"]) > 0.5
    assert summary["val_loss_last"] == pytest.approx(float(last_val["loss"]))


def test_ipo_starts_at_its_squared_target_and_moves_the_margin_towards_it(tiny_checkpoint, pairs_dir, tmp_path):
    beta = 0.5  # target margin 1 / (2 beta) = 1 nat: the loss starts at its square
    finetune(dpo_config(tiny_checkpoint, pairs_dir, tmp_path / "out", "--train.max_steps=8", "--preference.loss=ipo",
                        f"--preference.beta={beta}"))
    logged = rows(tmp_path / "out" / "metrics.csv")
    assert float(logged[0]["loss"]) == pytest.approx(1 / (4 * beta ** 2), abs=1e-6)
    assert float(logged[0]["margin"]) == 0
    last_val = [r for r in logged if r["split"] == "val"][-1]
    assert float(last_val["loss"]) < 0.5 and 0 < float(last_val["margin"])
    assert load_config(tmp_path / "out" / "config.yaml").preference.loss == "ipo"


def test_dpo_accumulation_and_resume_give_the_same_adapter(tiny_checkpoint, pairs_dir, tmp_path):
    finetune(dpo_config(tiny_checkpoint, pairs_dir, tmp_path / "one", "--train.max_steps=4",
                        "--train.micro_batch_size=8", "--train.global_batch_size=8"))
    finetune(dpo_config(tiny_checkpoint, pairs_dir, tmp_path / "acc", "--train.max_steps=4",
                        "--train.micro_batch_size=2", "--train.global_batch_size=8"))
    assert_same_adapter(tmp_path / "one" / "final", tmp_path / "acc" / "final", rtol=1e-4, atol=1e-6)
    # 2 steps, then continued to 4 from its checkpoint: the reference is the run's start, not the checkpoint
    finetune(dpo_config(tiny_checkpoint, pairs_dir, tmp_path / "resumed", "--train.max_steps=2",
                        "--train.micro_batch_size=8", "--train.global_batch_size=8", "--train.save_interval=2"))
    finetune(dpo_config(tiny_checkpoint, pairs_dir, tmp_path / "resumed", "--train.max_steps=4",
                        "--train.micro_batch_size=8", "--train.global_batch_size=8"), resume="auto")
    assert_same_adapter(tmp_path / "one" / "final", tmp_path / "resumed" / "final", rtol=0, atol=0)


def test_dpo_from_an_sft_adapter_uses_it_as_the_reference(tiny_checkpoint, pairs_dir, prepared_sft, tmp_path):
    finetune(load_config(TINY, tiny_args(tiny_checkpoint, prepared_sft, tmp_path / "sft", "--train.max_steps=3",
                                         "--lora.r=4")))
    config = dpo_config(tiny_checkpoint, pairs_dir, tmp_path / "dpo", "--train.max_steps=4",
                        f"--init_lora={tmp_path / 'sft' / 'final'}")
    finetune(config)
    logged = rows(tmp_path / "dpo" / "metrics.csv")
    assert float(logged[0]["loss"]) == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as its reference
    assert float(logged[0]["rewards_chosen"]) == 0
    saved = load_config(tmp_path / "dpo" / "config.yaml")
    assert saved.lora.r == 4 and saved.init_lora == str(tmp_path / "sft" / "final")

    orpo = load_config(TINY, tiny_args(tiny_checkpoint, pairs_dir, tmp_path / "orpo", "--method=orpo",
                                       "--train.max_steps=4", "--eval.interval=4"))
    summary = finetune(orpo)
    assert summary["val_loss_last"] < summary["val_loss_first"]


def test_a_resume_whose_init_lora_changed_is_refused(tiny_checkpoint, pairs_dir, prepared_sft, tmp_path, monkeypatch,
                                                     capsys):
    sft = tmp_path / "sft"
    finetune(load_config(TINY, tiny_args(tiny_checkpoint, prepared_sft, sft, "--train.max_steps=2", "--lora.r=4")))
    dpo = tiny_args(tiny_checkpoint, pairs_dir, tmp_path / "dpo", "--method=dpo", f"--init_lora={sft / 'final'}",
                    "--train.save_interval=2")
    finetune(load_config(TINY, [*dpo, "--train.max_steps=2"]))
    # The same path, another adapter: the reference and the starting point would not be the run's.
    finetune(load_config(TINY, tiny_args(tiny_checkpoint, prepared_sft, sft, "--train.max_steps=3", "--lora.r=4")),
             resume="auto")
    capsys.readouterr()  # the runs' progress
    before = snapshot(tmp_path / "dpo")
    code, _, err = run_cli(monkeypatch, capsys, "finetune-lora", "--config", TINY, *dpo, "--train.max_steps=4",
                           "--resume", "auto")
    assert_error(code, err, "init_lora", "another adapter than the run started from")
    assert snapshot(tmp_path / "dpo") == before


@pytest.fixture(scope="module")
def prepared_sft(tiny_checkpoint, tmp_path_factory) -> Path:
    from lit_lora.data.prepare import prepare

    root = tmp_path_factory.mktemp("sft")
    records = [{"instruction": r["prompt"], "input": "", "output": r["chosen"]} for r in pair_records()]
    (root / "records.json").write_text(json.dumps(records))
    prepare(tiny_checkpoint, root / "prepared", data_file=root / "records.json", format="alpaca", template="chatml",
            val_size=8, max_seq_length=64)
    return root / "prepared"


@pytest.mark.parametrize("overrides, words", [
    (["--method=dpo", "DATA=sft"], ["method dpo", "prepare-preference"]),
    (["--method=sft"], ["chosen/rejected pairs", "method: dpo"]),
    (["--method=dpo", "--train.packing=true"], ["packing"]),
    (["--method=ipo"], ["method 'ipo'", "preference.loss ipo"]),
    (["--method=dpo", "--preference.loss=hinge"], ["preference.loss", "ipo"]),
    (["--method=orpo", "--preference.loss=ipo"], ["preference.loss ipo", "method dpo"]),
    (["--method=orpo", "--preference.loss=dpop"], ["preference.loss dpop", "method dpo"]),
    (["--method=dpo", "--preference.loss=dpop", "--preference.dpop_lambda=-1"], ["preference.dpop_lambda", ">= 0"]),
    (["--method=dpo", "--preference.loss=ipo", "--preference.label_smoothing=0.1"], ["label_smoothing", "ipo"]),
    (["--method=dpo", "--preference.beta=0"], ["preference.beta"]),
    (["--method=dpo", "--preference.sft_weight=-1"], ["preference.sft_weight", ">= 0"]),
    (["--method=dpo", "--preference.compare=prefix"], ["preference.compare", "first_difference"]),
    (["--method=dpo", "--init_lora=nowhere"], ["init_lora", "nowhere"]),
])
def test_wrong_data_or_settings_are_refused_before_anything_is_written(tiny_checkpoint, pairs_dir, prepared_sft,
                                                                        tmp_path, monkeypatch, capsys, overrides,
                                                                        words):
    data = prepared_sft if "DATA=sft" in overrides else pairs_dir
    before = snapshot(data)
    args = tiny_args(tiny_checkpoint, data, tmp_path / "out", *[o for o in overrides if o != "DATA=sft"])
    code, _, err = run_cli(monkeypatch, capsys, "finetune-lora", "--config", TINY, *args)
    assert_error(code, err, *words)
    assert_not_written(tmp_path / "out")
    assert snapshot(data) == before


def test_rpo_adds_the_chosen_answers_loss_times_its_weight(tiny_checkpoint, pairs_dir, tmp_path):
    finetune(dpo_config(tiny_checkpoint, pairs_dir, tmp_path / "out", "--train.max_steps=1",
                        "--preference.sft_weight=0.5"))
    step0 = rows(tmp_path / "out" / "metrics.csv")[0]
    # the policy is the base at step 0: its chosen answers' loss on the pairs the run validates on (see below)
    base = evaluate(tiny_checkpoint, pairs_dir, [], metric="loss", progress=False, batch_size=3, limit=4)
    assert float(step0["loss"]) == pytest.approx(math.log(2) + 0.5 * base["models"][0]["loss"], abs=1e-5)
    assert float(step0["chosen_loss"]) == pytest.approx(base["models"][0]["loss"], abs=1e-5)
    assert load_config(tmp_path / "out" / "config.yaml").preference.sft_weight == 0.5


def test_a_resume_that_changes_the_objective_is_refused(tiny_checkpoint, pairs_dir, tmp_path, monkeypatch, capsys):
    dpo = ["--method=dpo", "--lora.dropout=0", "--train.learning_rate=0.01", "--train.warmup_steps=1"]
    finetune(load_config(TINY, tiny_args(tiny_checkpoint, pairs_dir, tmp_path / "out", *dpo, "--train.max_steps=2",
                                         "--train.save_interval=2")))
    capsys.readouterr()  # the first run's progress
    before = snapshot(tmp_path / "out")
    for changed, word in (("--preference.sft_weight=0.5", "preference.sft_weight"),
                          ("--preference.beta=0.5", "preference.beta"),
                          ("--preference.compare=first_difference", "preference.compare"),
                          ("--preference.loss=ipo", "preference.loss")):
        args = tiny_args(tiny_checkpoint, pairs_dir, tmp_path / "out", *dpo, "--train.max_steps=4", changed)
        code, _, err = run_cli(monkeypatch, capsys, "finetune-lora", "--config", TINY, *args, "--resume", "auto")
        assert_error(code, err, word)
        assert snapshot(tmp_path / "out") == before


# ---------------------------------------------------------------------------------------------- evaluate
def test_evaluate_reports_each_adapters_reward_against_the_base(tiny_checkpoint, pairs_dir, tmp_path):
    finetune(dpo_config(tiny_checkpoint, pairs_dir, tmp_path / "out", "--train.max_steps=8"))
    # limit 4: the pairs the run validated on (eval.max_batches 2 x micro-batches of 2)
    result = evaluate(tiny_checkpoint, pairs_dir, [tmp_path / "out" / "final"], metric="loss", progress=False,
                      beta=0.1, batch_size=3, limit=4)
    base, tuned = result["models"]
    assert base["reward_accuracy"] == 0.5 and base["reward_margin"] == 0
    assert base["dpo_loss"] == pytest.approx(math.log(2))
    assert tuned["reward_accuracy"] > 0.5 and tuned["dpo_loss"] < math.log(2)
    # the training run's last validation used the same reference (the base) and beta
    last_val = [r for r in rows(tmp_path / "out" / "metrics.csv") if r["split"] == "val"][-1]
    assert tuned["dpo_loss"] == pytest.approx(float(last_val["loss"]), abs=1e-5)
    assert tuned["reward_margin"] == pytest.approx(float(last_val["margin"]), abs=1e-5)
    assert result["n"] == 4  # pairs
