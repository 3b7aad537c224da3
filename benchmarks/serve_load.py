"""Load on `serve`: many clients, each request for a random adapter, against one request at a time and against
switching adapters by merge and restore.

    python benchmarks/serve_load.py [--checkpoint_dir CKPT] [--clients 8] [--requests 32] [--max_tokens 32]
                                    [--adapters 4] [--cache_adapters 20]

Adapters are random LoRA tensors (r 8 on q and v, seeded) over the real SmolLM2-135M-Instruct where its
checkpoint is cached; questions are the first Alpaca instructions of ../shared when present. Every request is a
greedy chat completion streamed through the real openai client (time to first token is the first text chunk).
Scenarios, each on a server of its own (a subprocess, so its peak RSS is its own):
  batched        serve --max_batch 8: requests for different adapters share each decode step
  one at a time  the same server with --max_batch 1 (the others wait in its queue)
  merge/restore  no server: one request after another, its adapter merged into the weights and restored after,
                 as generate and chat do (no HTTP cost at all: the most favourable case for it)
"Wrong" counts answers that differ from the one-at-a-time server's. Then the adapter cache: --cache_adapters
adapters on disk, --max_adapters 4, each asked twice; the server's resident memory after each answer against its
memory with the base alone plus four adapters' bytes.
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REAL = Path.home() / ".cache" / "lit-lora" / "checkpoints" / "smollm2-135m-instruct"
ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_5000.json"
FALLBACK = ["Give three tips for staying healthy.", "What is the capital of France?", "Name a primary color.",
            "Write a haiku about rain.", "Explain what a noun is.", "Suggest a name for a cat."]


def make_adapters(checkpoint: Path, root: Path, count: int) -> list[str]:
    from lit_lora.adapter import write_adapter_files
    from lit_lora.checkpoint import load_model
    from lit_lora.lora import LoRAConfig, apply_lora, lora_layers

    model = apply_lora(load_model(checkpoint), LoRAConfig(r=8, alpha=16, dropout=0.0, targets=["query", "value"]))
    names = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in lora_layers(model):
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.05)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)
        (root / f"adapter{i}").mkdir(parents=True)
        write_adapter_files(root / f"adapter{i}", model, checkpoint, {"template": None})
        names.append(f"adapter{i}")
    return names


def questions(count: int) -> list[str]:
    pool = [r["instruction"] for r in json.loads(ALPACA.read_text())[:200] if not r.get("input")] \
        if ALPACA.is_file() else FALLBACK
    return [pool[i % len(pool)] for i in range(count)]


class Server:
    """`serve` in a subprocess on a free port."""

    def __init__(self, checkpoint: Path, lora_dir: Path, *options: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process = subprocess.Popen([sys.executable, "-m", "lit_lora.cli", "serve", "--checkpoint_dir",
                                         str(checkpoint), "--lora_dir", str(lora_dir), "--port", str(self.port),
                                         *options], stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(1200):
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=5)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def rss_gib(self, field: str = "VmRSS") -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1]) / 2**20

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def chat(url: str, model: str, question: str, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    start, first, text = time.perf_counter(), None, ""
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    tokens = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"text": text, "tokens": tokens, "latency": end - start, "ttft": (first or end) - start}


def load(url: str, work: list[tuple[str, str]], clients: int, max_tokens: int) -> tuple[list, float, int]:
    errors = 0

    def one(job):
        nonlocal errors
        try:
            return chat(url, *job, max_tokens)
        except Exception:  # noqa: BLE001 - counted, the load goes on
            errors += 1
            return None

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, work))
    return results, time.perf_counter() - start, errors


def merge_and_restore(checkpoint: Path, lora_dir: Path, work: list[tuple[str, str]], max_tokens: int) -> tuple:
    from lit_lora.adapter import load_checked_adapter
    from lit_lora.checkpoint import load_config
    from lit_lora.generate import Sampling, TorchEngine
    from lit_lora.prompts.format import prompt_format
    from lit_lora.tokenizer import Tokenizer

    config, tokenizer = load_config(checkpoint), Tokenizer(checkpoint)
    engine = TorchEngine.load(checkpoint, "auto", True, False, None)
    adapters = {name: load_checked_adapter(lora_dir / name, checkpoint, config) for name, _ in work}
    sampling = Sampling(max_new_tokens=max_tokens, temperature=0)
    results, start = [], time.perf_counter()
    for name, question in work:
        lora_config, state, meta = adapters[name]
        form = prompt_format("auto", meta, tokenizer)
        t0 = time.perf_counter()
        with engine.adapter(lora_dir / name, lora_config, state) as answer:
            done = answer(tokenizer, [form.question_ids(tokenizer, question)], form.stop_strings, sampling, None)
        results.append({"text": done.texts[0], "tokens": done.n_generated, "latency": time.perf_counter() - t0,
                        "ttft": float("nan")})
    return results, time.perf_counter() - start, 0


def row(name: str, results: list, seconds: float, errors: int, reference: list | None, rss: float | None) -> str:
    done = [r for r in results if r]
    latency = sorted(r["latency"] for r in done)
    ttft = sorted(r["ttft"] for r in done)
    wrong = "" if reference is None else \
        sum(r is None or r["text"] != ref["text"] for r, ref in zip(results, reference))
    tokens = sum(r["tokens"] for r in done)

    def p(values, q):
        return values[min(len(values) - 1, int(q * len(values)))]
    return (f"| {name} | {len(done) / seconds:.2f} | {tokens / seconds:.1f} | {p(latency, .5):.2f} / "
            f"{p(latency, .99):.2f} | {p(ttft, .5):.2f} / {p(ttft, .99):.2f} | {errors} | {wrong} | "
            f"{'' if rss is None else f'{rss:.2f}'} |")


def cache_test(checkpoint: Path, count: int, max_tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(checkpoint, Path(tmp), count)
        adapter_bytes = sum(f.stat().st_size for f in (Path(tmp) / names[0]).iterdir())
        server = Server(checkpoint, Path(tmp), "--max_adapters", "4")
        try:
            chat(server.url, checkpoint.name, "hi", 4)
            base_rss, peak = server.rss_gib(), 0.0
            for name in names + names:
                chat(server.url, name, "hi", max_tokens)
                metrics = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
                resident = int(next(line for line in metrics.splitlines()
                                    if line.startswith("lit_lora_adapters_resident")).split()[1])
                assert resident <= 4, metrics
                peak = max(peak, server.rss_gib())
        finally:
            server.stop()
    print(f"\nadapter cache: {count} adapters on disk, --max_adapters 4, each asked twice: every answer given, at "
          f"most 4 resident; RSS {base_rss:.3f} GiB after the base's first answer, at most {peak:.3f} GiB after "
          f"(+{(peak - base_rss) * 1024:.1f} MiB; four adapters are {4 * adapter_bytes / 2**20:.1f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path, default=REAL)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--cache_adapters", type=int, default=20, help="0 skips the adapter cache test")
    args = parser.parse_args()

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        lora_dir = Path(tmp)
        names = make_adapters(args.checkpoint_dir, lora_dir, args.adapters)
        work = [(rng.choice(names), q) for q in questions(args.requests)]
        print(f"{args.requests} greedy chat requests of at most {args.max_tokens} tokens, {args.clients} clients, "
              f"each for one of {args.adapters} adapters at random; {torch.get_num_threads()} threads\n")
        print("| scenario | requests/s | generated tokens/s | latency p50 / p99 s | first token p50 / p99 s "
              "| errors | wrong | peak RSS GiB |\n|---|---|---|---|---|---|---|---|")
        runs = {}
        for name, options in [("one at a time", ["--max_batch", "1"]), ("batched", ["--max_batch", "8"])]:
            server = Server(args.checkpoint_dir, lora_dir, *options)
            try:
                chat(server.url, names[0], "hi", 2)  # warm-up
                runs[name] = load(server.url, work, args.clients, args.max_tokens)
                rss = server.rss_gib("VmHWM")
            finally:
                server.stop()
            print(row(name, *runs[name], runs["one at a time"][0] if name == "batched" else None, rss), flush=True)
        merged = merge_and_restore(args.checkpoint_dir, lora_dir, work, args.max_tokens)
        print(row("merge/restore, in process", *merged, runs["one at a time"][0], None))
        batched, single = runs["batched"], runs["one at a time"]
        ratio = (sum(r["tokens"] for r in batched[0] if r) / batched[1]) / \
            (sum(r["tokens"] for r in single[0] if r) / single[1])
        print(f"\nbatched / one at a time: {ratio:.2f}x the generated tokens/s")
    if args.cache_adapters:
        cache_test(args.checkpoint_dir, args.cache_adapters, args.max_tokens)


if __name__ == "__main__":
    main()
