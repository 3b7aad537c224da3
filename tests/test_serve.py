"""serve: the OpenAI API over one base and many adapters, checked with the real `openai` client.

Every greedy answer must equal `generate`'s with the same adapter, alone or batched with requests for other
adapters; bad requests get their 4xx and the server keeps serving."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="serve needs the serve extra")
pytest.importorskip("uvicorn", reason="serve needs the serve extra")
openai = pytest.importorskip("openai", reason="the tests talk to the server with the openai client")

from adapter_helpers import make_adapter  # noqa: E402
from conftest import run_cli  # noqa: E402
from lit_lora.generate import Sampling, run_generate  # noqa: E402
from lit_lora.serve.server import run_serve  # noqa: E402
from test_integrity import assert_error  # noqa: E402

QUESTIONS = ["hello there", "tell me a story about a cat and a dog", "x"]
NEW_TOKENS = 12
ADAPTERS = {"a0": (("query", "value"), 4), "a1": (("attention", "mlp"), 8), "a2": (("key", "down"), 2)}


@pytest.fixture(scope="module")
def lora_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, (targets, r)) in enumerate(ADAPTERS.items()):
        make_adapter(tiny_checkpoint, root / name, seed=i, targets=targets, r=r, template="chatml", scale=0.3)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, key: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post(url: str, body: bytes | dict, key: str | None = None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


@contextlib.contextmanager
def serving(checkpoint: Path, **options):
    """A server in a thread of this process; its base URL. Stopped as uvicorn stops on SIGTERM."""
    port, holder, failed = free_port(), {}, []

    def run() -> None:
        try:
            run_serve(checkpoint, port=port, precision="32-true", log=io.StringIO(),
                      ready=lambda server: holder.setdefault("server", server), **options)
        except BaseException as e:  # noqa: BLE001 - reported by the waiting test
            failed.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if failed:
            raise failed[0]
        with contextlib.suppress(OSError):
            if get(f"{url}/health")[0] == 200:
                break
        time.sleep(0.1)
    try:
        yield url
    finally:
        holder["server"].should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, lora_dir):
    with serving(tiny_checkpoint, lora_dir=lora_dir, max_adapters=2, max_batch=4) as url:
        yield url


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def generated(checkpoint: Path, adapter: Path | None, question: str, template: str, new_tokens: int = NEW_TOKENS
              ) -> str:
    """generate's answer in the server's precision: auto picks bf16 on a CPU where it is faster, and merged bf16 weights
    round differently from the server's unmerged updates (a greedy step with a 1e-4 logit margin flipped)."""
    return run_generate(checkpoint, prompt=question, lora_paths=[adapter] if adapter else [], template=template,
                        sampling=Sampling(max_new_tokens=new_tokens, temperature=0), stream=False, out=io.StringIO(),
                        log=io.StringIO(), engine="torch", precision="32-true")[0]


def ask(c: openai.OpenAI, model: str, question: str, chat: bool, stream: bool) -> str:
    options = dict(model=model, max_tokens=NEW_TOKENS, temperature=0, stream=stream)
    if chat:
        answer = c.chat.completions.create(messages=[{"role": "user", "content": question}], **options)
        return "".join(ch.choices[0].delta.content or "" for ch in answer if ch.choices) if stream \
            else answer.choices[0].message.content
    answer = c.completions.create(prompt=f"{question}\n", **options)  # the prompt generate's plain template makes
    return "".join(ch.choices[0].text for ch in answer if ch.choices) if stream else answer.choices[0].text


def test_every_greedy_answer_is_generates_alone_and_in_mixed_batches(server, tiny_checkpoint, lora_dir):
    c = client(server)
    base = tiny_checkpoint.name
    assert [m.id for m in c.models.list().data] == [base, *ADAPTERS]
    # chat asks as generate asks (the adapter's template); completions continue the prompt as given
    cases = [(model, q, chat, stream) for model in [base, *ADAPTERS] for q in QUESTIONS
             for chat in (True, False) for stream in (True, False)]
    want = {(model, q, chat): generated(tiny_checkpoint, None if model == base else lora_dir / model, q,
                                        "auto" if chat else "plain")
            for model, q, chat, _ in cases}
    alone = {case: ask(c, *case) for case in cases[::5]}
    with ThreadPoolExecutor(8) as pool:  # 8 at a time over 4 rows and 2 adapter slots: batched, and evicting
        batched = dict(zip(cases, pool.map(lambda case: ask(c, *case), cases)))
    for case, text in [*alone.items(), *batched.items()]:
        assert text == want[case[:3]], case
    assert len(set(want.values())) > len(QUESTIONS) * 2  # the adapters do change the answers


def engine_answers(checkpoint: Path, adapters: dict[str, Path], questions: list[str], max_rows: int,
                   slots: int, chunk: int) -> dict[tuple[str | None, str], str]:
    """Greedy answers of the engine alone (no HTTP), every (adapter, question) submitted at once."""
    from lit_lora.checkpoint import load_config
    from lit_lora.generate import load_for_generation
    from lit_lora.prompts.format import prompt_format
    from lit_lora.serve.adapters import AdapterSource, ResidentAdapters
    from lit_lora.serve.batch import AdapterTable, Rows
    from lit_lora.serve.engine import Engine, Request
    from lit_lora.tokenizer import Tokenizer

    tokenizer, rows = Tokenizer(checkpoint), Rows()
    model = load_for_generation(checkpoint, "32-true", True)
    resident = ResidentAdapters(AdapterTable(model, rows, slots), AdapterSource(checkpoint, load_config(checkpoint),
                                                                                 adapters, None))
    engine = Engine(model, tokenizer, resident, rows, max_rows, 256, 64, prefill_chunk=chunk)
    form, answers, finished = prompt_format("chatml", {}, tokenizer), {}, threading.Semaphore(0)

    def emit_to(key, pieces):
        def emit(event):
            if event.kind == "text":
                pieces.append(event.text)
            else:
                answers[key] = "".join(pieces) if event.kind == "done" else f"error: {event.text}"
                finished.release()
        return emit

    keys = [(name, q) for name in [None, *adapters] for q in questions]
    engine.start()
    for key in keys:
        engine.submit(Request(form.question_ids(tokenizer, key[1]), Sampling(max_new_tokens=24, temperature=0),
                              form.stop_strings, key[0], emit_to(key, [])))
    for _ in keys:
        assert finished.acquire(timeout=120)
    engine.stop()
    return answers


def test_the_engine_matches_generate_with_chunked_prefill_few_slots_and_a_sliding_window(tmp_path):
    from conftest import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "windowed", sliding_window=6)  # Mistral's: every layer windowed
    adapters = {name: make_adapter(checkpoint, tmp_path / name, seed=i, targets=targets, r=r, template="chatml",
                                   scale=0.3) for i, (name, (targets, r)) in enumerate(ADAPTERS.items())}
    questions = ["hello there", "tell me a story about a cat and a dog and a bird"]
    answers = engine_answers(checkpoint, adapters, questions, max_rows=3, slots=2, chunk=5)
    for (name, question), text in answers.items():
        want = generated(checkpoint, adapters[name] if name else None, question, "chatml", new_tokens=24)
        assert text == want, (name, question)


def test_usage_streaming_chunks_and_choices(server, lora_dir):
    c = client(server)
    answer = c.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0.9, seed=7, n=2)
    assert [ch.index for ch in answer.choices] == [0, 1] and answer.usage.prompt_tokens > 0
    assert 2 <= answer.usage.completion_tokens <= 10  # both choices, each at most max_tokens
    again = c.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                      temperature=0.9, seed=7, n=2)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in answer.choices]
    chunks = list(c.chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_bad_requests_get_their_4xx_in_one_line_and_the_server_keeps_serving(server, tiny_checkpoint, lora_dir):
    chat = f"{server}/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    broken = lora_dir / "broken"
    broken.mkdir()
    (broken / "adapter_config.yaml").write_text("r: [not, a, rank\n")
    long_prompt = " ".join(["word"] * 400)
    cases = [
        (b"{not json", 400, "not valid JSON"),
        ({"model": "nope", "messages": hi}, 404, "no model named 'nope'"),
        ({"model": "../" + lora_dir.name + "/a0", "messages": hi}, 404, "no model named"),  # only lora_dir's own
        ({"model": "a0", "messages": [{"role": "user", "content": long_prompt}]}, 400, "shorten the prompt"),
        ({"model": "a0", "messages": hi, "max_tokens": 0}, 400, "max_tokens must be between 1 and"),
        ({"model": "a0", "messages": hi, "max_tokens": 10**9}, 400, "max_tokens must be between 1 and"),
        ({"model": "a0", "messages": hi, "temperature": -1}, 400, "temperature must be in"),
        ({"model": "a0", "messages": hi, "n": 99}, 400, "n must be between"),
        ({"model": "a0", "messages": []}, 400, "messages must be"),
        ({"model": "broken", "messages": hi}, 400, "adapter 'broken' cannot be served"),
    ]
    try:
        for body, status, words in cases:
            code, answer, _ = post(chat, body)
            message = answer["error"]["message"]
            assert code == status and words in message and "\n" not in message, (body, code, answer)
            code, answer, _ = post(chat, {"model": "a2", "messages": hi, "max_tokens": 3, "temperature": 0})
            assert code == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        shutil.rmtree(broken)


def test_a_new_adapter_folder_is_served_a_changed_one_read_again_and_peft_ones_too(server, tiny_checkpoint, lora_dir):
    c = client(server)
    fresh = lora_dir / "fresh"
    try:
        shutil.copytree(lora_dir / "a0", fresh)
        assert "fresh" in [m.id for m in c.models.list().data]
        assert ask(c, "fresh", "hello there", True, False) == generated(tiny_checkpoint, lora_dir / "a0",
                                                                         "hello there", "auto")
        shutil.rmtree(fresh)
        shutil.copytree(lora_dir / "a1", fresh)  # other weights under the same name
        assert ask(c, "fresh", "hello there", True, False) == generated(tiny_checkpoint, lora_dir / "a1",
                                                                         "hello there", "auto")
        from lit_lora.export import export_peft

        export_peft(lora_dir / "a2", lora_dir / "peft")  # a PEFT adapter directory, served as ours are
        assert ask(c, "peft", "hello there", True, False) == generated(tiny_checkpoint, lora_dir / "peft",
                                                                        "hello there", "auto")
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(lora_dir / "peft", ignore_errors=True)


def test_a_client_that_goes_away_frees_its_row(server):
    chat = client(server).chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=240, temperature=1.0, stream=True)
    next(iter(chat))
    chat.close()
    for _ in range(100):
        if json.loads(get(f"{server}/health")[1])["running"] == 0:
            break
        time.sleep(0.1)
    assert json.loads(get(f"{server}/health")[1])["running"] == 0


def test_api_key_and_a_full_queue(tiny_checkpoint, lora_dir):
    with serving(tiny_checkpoint, lora_dir=lora_dir, api_key="s3cret", max_batch=1, max_queue=1) as url:
        assert get(f"{url}/health")[0] == 200  # liveness needs no key
        hi = {"model": "a0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "temperature": 1.0}
        for key in (None, "wrong"):
            code, answer, _ = post(f"{url}/v1/chat/completions", hi, key)
            assert code == 401 and "API key" in answer["error"]["message"]
        with ThreadPoolExecutor(6) as pool:  # one runs, one waits, the rest find the queue full
            results = list(pool.map(lambda _: post(f"{url}/v1/chat/completions", hi, "s3cret"), range(6)))
        codes = sorted(code for code, _, _ in results)
        assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}, codes
        assert all(headers.get("retry-after") == "1" for code, _, headers in results if code == 429)
        assert get(f"{url}/v1/models", "s3cret")[0] == 200


def test_twenty_adapters_over_four_slots_are_all_served(tiny_checkpoint, tmp_path):
    for i in range(20):
        make_adapter(tiny_checkpoint, tmp_path / f"n{i:02d}", seed=100 + i, template="chatml", scale=0.3)
    with serving(tiny_checkpoint, lora_dir=tmp_path, max_adapters=4) as url:
        c = client(url)
        for i in list(range(20)) + [3, 17, 3]:
            assert ask(c, f"n{i:02d}", "hi", True, False) is not None
            metrics = dict(line.rsplit(" ", 1) for line in get(f"{url}/metrics")[1].splitlines())
            assert int(metrics["lit_lora_adapters_resident"]) <= 4
        assert int(metrics["lit_lora_adapter_loads_total"]) >= 20


def test_sigterm_finishes_what_runs_and_exits_0(tiny_checkpoint, lora_dir):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lit_lora.cli", "serve", "--checkpoint_dir", tiny_checkpoint,
                                "--lora_dir", lora_dir, "--port", str(port), "--precision", "32-true"],
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(OSError):
                if get(f"{url}/health")[0] == 200:
                    break
            time.sleep(0.1)
        stream = client(url).chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=200, temperature=1.0, seed=1, stream=True)
        chunks = iter(stream)
        first = next(chunks)
        process.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert first.choices[0].delta.role == "assistant" and rest[-1].choices[0].finish_reason in ("stop", "length")
        assert process.wait(60) == 0
        assert process.stderr.read().strip().endswith("stopped")
    finally:
        process.kill()


def test_serve_refuses_bad_options_in_one_line(monkeypatch, capsys, tiny_checkpoint, tmp_path):
    for options, words in [(["--port", "0"], "--port must be in"),
                           (["--lora_dir", tmp_path / "none"], "not a directory"),
                           (["--max_batch", "0"], "--max_batch must be >= 1"),
                           (["--lora_path", f"x={tmp_path}"], "adapter 'x' cannot be served")]:
        code, _, err = run_cli(monkeypatch, capsys, "serve", "--checkpoint_dir", tiny_checkpoint, *options)
        assert_error(code, err, words)
