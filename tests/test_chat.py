"""Generation in the adapter's own chat format, merged checkpoints that keep it, and the `chat` command through a
pipe: two adapters, a switch, history kept, a context-window overflow handled."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adapter_helpers import make_adapter
from lit_lora.adapter import ADAPTER_CONFIG
from lit_lora.chat import run_chat
from lit_lora.checkpoint import load_info, load_model
from lit_lora.errors import UserError
from lit_lora.fast_decode import prepare_for_generation
from lit_lora.generate import Sampling, complete, run_generate
from lit_lora.merge import merge_checkpoint
from lit_lora.prompts.chat_template import CHAT_TEMPLATE_FILE, ChatTemplate
from lit_lora.prompts.format import prompt_format
from lit_lora.tokenizer import Tokenizer
from conftest import run_cli, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread

# ChatML with a generation prompt and a default system prompt, as SmolLM2's (the tiny checkpoint's own has neither).
CHAT_SOURCE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
               "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GREEDY = Sampling(max_new_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory) -> list[Path]:
    """Two random adapters that record CHAT_SOURCE as the template they were trained with."""
    root = tmp_path_factory.mktemp("adapters")
    paths = [make_adapter(tiny_checkpoint, root / f"a{seed}", seed=seed, template=None) for seed in (1, 2)]
    for path in paths:
        config = yaml.safe_load((path / ADAPTER_CONFIG).read_text())
        config["chat_template"] = {"name": "test chat template", "source": CHAT_SOURCE}
        (path / ADAPTER_CONFIG).write_text(yaml.safe_dump(config))
    return paths


def adapter_meta(path: Path) -> dict:
    return yaml.safe_load((path / ADAPTER_CONFIG).read_text())


def test_generate_asks_in_the_recorded_chat_template(tiny_checkpoint, adapters):
    tokenizer = Tokenizer(tiny_checkpoint)
    chosen = prompt_format("auto", adapter_meta(adapters[0]), tokenizer)
    expected = ChatTemplate(CHAT_SOURCE).render([{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "hello\n\nworld"}],
                                                add_generation_prompt=True)
    assert chosen.question_ids(tokenizer, "hello", "world", system="Be brief.") == tokenizer.encode(expected, bos=False)
    assert chosen.stop_strings == ("<|im_end|>",)
    alpaca = prompt_format("alpaca", {}, tokenizer)  # an instruction template keeps its own form for an input
    assert alpaca.question_ids(tokenizer, "hello", "world") == tokenizer.encode(alpaca.template.single_turn.prompt("hello", "world"))
    with pytest.raises(UserError, match="takes one instruction"):  # and has no system turn
        alpaca.question_ids(tokenizer, "hello", system="Be brief.")


def test_merged_checkpoint_keeps_the_chat_template(tiny_checkpoint, adapters, tmp_path):
    merged = merge_checkpoint(tiny_checkpoint, adapters[0], tmp_path / "merged")
    assert load_info(merged)["chat_template"]["source"] == CHAT_SOURCE
    assert (merged / CHAT_TEMPLATE_FILE).read_text() == CHAT_SOURCE  # what an HF export serves it with
    a = run_generate(merged, "hello world", sampling=GREEDY, precision="32-true", stream=False, system="Be brief.")
    b = run_generate(tiny_checkpoint, "hello world", lora_paths=[adapters[0]], sampling=GREEDY, precision="32-true",
                     stream=False, system="Be brief.")
    assert a == b


def answers_of(merged: Path, conversation: list[dict], system: str | None = None) -> str:
    """What a model with the adapter merged offline answers to `conversation`, greedily."""
    tokenizer = Tokenizer(merged)
    model = prepare_for_generation(load_model(merged).eval())
    messages = ([{"role": "system", "content": system}] if system else []) + conversation
    prompt = tokenizer.encode(ChatTemplate(CHAT_SOURCE).render(messages, add_generation_prompt=True))
    return complete(model, tokenizer, [prompt], ("<|im_end|>",), GREEDY).texts[0]


def chat(checkpoint: Path, adapters: list[Path], lines: list[str], max_new_tokens: int = 8):
    out, log = io.StringIO(), io.StringIO()
    session = run_chat(checkpoint, adapters, sampling=Sampling(max_new_tokens=max_new_tokens, temperature=0),
                       precision="32-true", input=io.StringIO("".join(f"{line}\n" for line in lines)), out=out,
                       log=log)
    return session, out.getvalue(), log.getvalue()


def test_chat_switches_adapters_and_keeps_the_history(tiny_checkpoint, adapters, tmp_path):
    session, out, log = chat(tiny_checkpoint, adapters, ["hello world", "/adapter 2", "/system Be brief.",
                                                         "the quick brown fox", "/exit", "never read"])
    assert session.active.name == str(adapters[1]) and f"now answering with {adapters[1]}" in log
    history = session.history
    assert [m["content"] for m in history[::2]] == ["hello world", "the quick brown fox"]
    # Each answer is what the adapter active at the time answers, merged offline, to the conversation so far.
    first = answers_of(merge_checkpoint(tiny_checkpoint, adapters[0], tmp_path / "m1"), history[:1])
    second = answers_of(merge_checkpoint(tiny_checkpoint, adapters[1], tmp_path / "m2"), history[:3], "Be brief.")
    assert (history[1]["content"], history[3]["content"]) == (first, second)
    assert out.startswith(first)


def test_chat_drops_the_oldest_turns_when_the_context_is_full(tiny_checkpoint, adapters):
    message = "Summarise the following sentence: the quick brown fox jumps over the lazy dog."
    session, out, log = chat(tiny_checkpoint, adapters[:1], [f"{message} {i}" for i in range(6)], max_new_tokens=60)
    assert log.count("dropping the oldest turns") == 1
    assert "error" not in log and session.history[-1]["role"] == "assistant"  # the last message was answered too
    contents = [m["content"] for m in session.history[::2]]
    assert contents[-1] == f"{message} 5" and contents[0] != f"{message} 0"  # newest kept, oldest gone
    prompt = session.active.format.conversation_ids(session.tokenizer, session.history[:-1])
    assert len(prompt) <= session.max_seq_len  # every turn was answered inside the window


def test_chat_command_reads_a_pipe(tiny_checkpoint, adapters):
    script = Path(sys.executable).parent / "chat"
    result = subprocess.run([str(script), "--checkpoint_dir", str(tiny_checkpoint), "--lora_path", str(adapters[0]),
                             "--lora_path", str(adapters[1]), "--temperature", "0", "--max_new_tokens", "4"],
                            input="hello\n/adapter nope\n/adapter 0\nhello\n/exit\n", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "error: no adapter 'nope'; choose by number: 0 = base" in result.stderr
    assert "now answering with base" in result.stderr and "Traceback" not in result.stderr


def test_chat_bad_start_is_one_line(tiny_checkpoint, tmp_path):
    script = Path(sys.executable).parent / "chat"
    result = subprocess.run([str(script), "--checkpoint_dir", str(tiny_checkpoint), "--template", "llama3"],
                            input="", capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert "llama3 template needs the special tokens" in result.stderr and len(result.stderr.splitlines()) == 1


def test_hf_export_of_a_merged_chat_model_serves_its_template(tiny_checkpoint, adapters, tmp_path):
    """transformers, given the export, renders conversations as the adapter was trained (test-only reference)."""
    transformers = pytest.importorskip("transformers")
    from lit_lora.export import export_hf

    exported = export_hf(merge_checkpoint(tiny_checkpoint, adapters[0], tmp_path / "merged"), tmp_path / "hf")
    reference = transformers.AutoTokenizer.from_pretrained(str(exported))
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
                {"role": "user", "content": "again"}]
    ours = ChatTemplate(CHAT_SOURCE).render(messages, add_generation_prompt=True)
    assert reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == ours


def test_finetune_on_conversations_records_the_template(tiny_checkpoint, tmp_path):
    from lit_lora.data.conversations import prepare_chat
    from lit_lora.finetune import finetune
    from lit_lora.train_config import load_config

    fixtures = Path(__file__).parent / "fixtures"
    prepare_chat(tiny_checkpoint, fixtures / "chat_tiny.jsonl", tmp_path / "data", val_size=2, system="Be brief.")
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", [
        f"--checkpoint_dir={tiny_checkpoint}", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'run'}",
        "--train.max_steps=2", "--eval.max_new_tokens=2", "--train.global_batch_size=2", "--train.micro_batch_size=2"])
    finetune(config)
    meta = adapter_meta(tmp_path / "run" / "final")
    assert meta["template"] == "chat" and meta["system"] == "Be brief."
    assert meta["chat_template"]["source"] == Tokenizer(tiny_checkpoint).chat_template
    chosen = prompt_format("auto", meta, Tokenizer(tiny_checkpoint))
    assert chosen.system == "Be brief." and chosen.stop_strings == ("<|im_end|>",)


def test_evaluate_scores_conversations_in_the_adapters_template(tiny_checkpoint, adapters):
    """A raw conversation file is rendered with the adapter's recorded template; the reference is the last answer."""
    from lit_lora.evaluate import evaluate, format_table

    data = Path(__file__).parent / "fixtures" / "chat_tiny.jsonl"
    result = evaluate(tiny_checkpoint, data, [adapters[0]], split="train", limit=3, max_new_tokens=4,
                      precision="32-true", progress=False)
    last_answers = [[m for m in json.loads(line)["messages"] if m["role"] == "assistant"][-1]["content"]
                    for line in data.read_text().splitlines()[:3]]
    assert [p["reference"] for p in result["predictions"]] == last_answers
    prompts = [p["prompt"] for p in result["predictions"]]
    assert prompts[0].startswith("<|im_start|>system\nYou are a terse assistant.")  # its own system turn
    assert all(p.startswith("<|im_start|>system\nYou are helpful.") for p in prompts[1:])  # the template's default
    assert all(p.endswith("<|im_end|>\n<|im_start|>assistant\n") for p in prompts)
    assert all(0 <= m["stopped"] <= 1 for m in result["models"]) and "stopped" in format_table(result)


def test_a_template_that_writes_bos_gets_one_bos(tiny_checkpoint, tmp_path):
    """The tokenizer adds BOS to plain text, but a chat template writes its own: generation must not add a second."""
    import shutil

    from lit_lora.prompts.masking import encode_conversation

    directory = tmp_path / "bos"
    shutil.copytree(tiny_checkpoint, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, bos_token="<|endoftext|>", chat_template="{{ bos_token }}" + CHAT_SOURCE)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(directory)
    question = prompt_format("auto", {}, tokenizer).question_ids(tokenizer, "hello")
    training = encode_conversation(tokenizer, ChatTemplate.from_tokenizer(tokenizer),
                                   [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]).ids
    assert question.count(tokenizer.bos_id) == 1 and training[: len(question)] == question


def test_a_sentencepiece_checkpoint_is_asked_plainly_or_told_clearly(tiny_checkpoint):
    """Without tokenizer.json a chat template cannot be tokenised as the model's own: auto falls back to plain."""
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(backend="sentencepiece", chat_template=CHAT_SOURCE, config={},
                                path=tiny_checkpoint / "tokenizer.model")
    assert prompt_format("auto", {}, tokenizer).name == "plain"
    with pytest.raises(UserError, match="need a tokenizer.json"):
        prompt_format("chatml", {}, tokenizer, multi_turn=True)


def test_a_message_too_long_leaves_the_conversation_as_it_was(tiny_checkpoint, adapters):
    session, _, log = chat(tiny_checkpoint, adapters[:1], ["hello", "hello world " * 200, "/exit"])
    assert "error: this message needs" in log and "dropping the oldest turns" not in log
    assert [m["content"] for m in session.history[::2]] == ["hello"]


def test_an_ambiguous_adapter_name_is_refused(tiny_checkpoint, adapters, tmp_path):
    import shutil

    twin = tmp_path / "other" / adapters[0].name
    shutil.copytree(adapters[0], twin)
    session, _, log = chat(tiny_checkpoint, [adapters[0], twin], [f"/adapter {twin.name}", "/adapter 2", "/exit"])
    assert f"more than one adapter '{twin.name}'; choose by number" in log and session.active.name == str(twin)


def test_text_that_is_not_utf8_is_refused(tiny_checkpoint, adapters, tmp_path):
    """Bytes that are not UTF-8 reach Python as lone surrogates; they get one line, not a traceback."""
    with pytest.raises(UserError, match="--prompt is not valid UTF-8"):
        run_generate(tiny_checkpoint, "h\udcffi", sampling=GREEDY, precision="32-true")
    (tmp_path / "prompts.txt").write_bytes(b"h\xffi\n")
    with pytest.raises(UserError, match="not UTF-8 text"):
        run_generate(tiny_checkpoint, prompts_file=tmp_path / "prompts.txt", sampling=GREEDY, precision="32-true")
    with pytest.raises(UserError, match="is a directory"):
        run_generate(tiny_checkpoint, prompts_file=tmp_path, sampling=GREEDY, precision="32-true")
    session, _, log = chat(tiny_checkpoint, adapters[:1], ["h\udcffi", "/nope", "hello", "/exit"])
    assert "error: this message is not valid UTF-8" in log and "unknown command /nope" in log
    assert [m["content"] for m in session.history[::2]] == ["hello"]


# ---------------------------------------------------------------------------------------------- bad input
def test_a_pipe_with_no_answered_message_exits_2(tiny_checkpoint, adapters, monkeypatch, capsys):
    """Each refused message keeps its own line, and the last line says that nothing was answered."""
    before = snapshot(tiny_checkpoint, *adapters)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world " * 200 + "\n/nope\nh\udcffi\n"))
    code, out, err = run_cli(monkeypatch, capsys, "chat", "--checkpoint_dir", tiny_checkpoint, "--lora_path",
                             adapters[0], "--temperature", 0, "--max_new_tokens", 4, "--precision", "32-true")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(errors) == 3 and errors[0].startswith("error: this message needs")
    assert errors[1].startswith("error: this message is not valid UTF-8") and "unknown command /nope" in err
    assert err.splitlines()[-1] == errors[2] == ("error: no message was answered (2 refused, each error is above); "
                                                "fix them and send them again")
    assert snapshot(tiny_checkpoint, *adapters) == before


@pytest.mark.parametrize("option", ["--temperature", "--top_p"])
def test_a_sampling_option_that_is_not_finite_is_one_line(tiny_checkpoint, monkeypatch, capsys, option):
    before = snapshot(tiny_checkpoint)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    code, out, err = run_cli(monkeypatch, capsys, "chat", "--checkpoint_dir", tiny_checkpoint, option, "nan")
    assert (code, out, err) == (2, "", f"error: {option} must be a finite number, got nan\n")
    assert snapshot(tiny_checkpoint) == before
