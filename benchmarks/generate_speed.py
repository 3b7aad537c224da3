"""Decode speed: our torch loop, our llama.cpp engine, llama.cpp called directly and transformers' `generate`, on
the same checkpoint, prompt, dtype, greedy.

    python benchmarks/generate_speed.py --checkpoint_dir ~/.cache/lit-lora/checkpoints/smollm2-135m-instruct \
        [--precision 32-true] [--skip_llama_cpp] [--skip_transformers] [--skip_quantized]

The torch engine runs in fp32 and bf16, then with `--quantize int8` and `nf4` over the --precision dtype, each with
its greedy answer to the Paris question (quantised weights must still answer it).

The torch and transformers sides generate exactly --new_tokens tokens (EOS ignored) after a warm-up run; the time
includes the (short) prompt's prefill. The llama.cpp sides run on the checkpoint exported with export-gguf (the
precision's type) and stop at the same end ids, so they are compared in tokens/s; "ours" there is
`llamacpp.complete` (prompt ids in, text out, through TextStream), "direct" is llama-cpp-python's own
`Llama.generate` loop. The HF side is our checkpoint exported with `export_hf`, so the weights are the same. On a
shared machine the numbers are noisy: run it when the machine is quiet, look at the best of --repeats.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lit_lora.checkpoint import load_model
from lit_lora.device import GENERATE_PRECISIONS, PRECISIONS
from lit_lora.export import export_gguf, export_hf
from lit_lora.generate import Sampling, complete, decoding_model, generate_tokens
from lit_lora.llamacpp import GGUF_TYPE
from lit_lora.prompts.builtin import instruction_template
from lit_lora.tokenizer import Tokenizer

PROMPT = "Write a short story about a robot who learns to paint."
PARIS = "What is the capital of France?"


def ours(checkpoint_dir: Path, dtype: torch.dtype, prompt: list[int], n: int, repeats: int, prepare: bool,
         quantize: str = "none") -> tuple[float, str]:
    """(tokens/s, the greedy answer to the Paris question) of the torch engine."""
    model = load_model(checkpoint_dir, dtype, quantize=quantize).eval()
    if prepare:  # what `generate` does
        model = decoding_model(model, quantize)
    tokenizer = Tokenizer(checkpoint_dir)
    question = tokenizer.encode(instruction_template("chatml").single_turn.prompt(PARIS))
    answer = complete(model, tokenizer, [question], ("<|im_end|>",), Sampling(max_new_tokens=16, temperature=0))
    sampling = Sampling(max_new_tokens=n, temperature=0)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        count = sum(1 for _ in generate_tokens(model, [prompt], sampling))
        best = min(best, time.perf_counter() - t0)
    assert count == n
    return n / best, answer.texts[0].strip()


def llama_cpp_speeds(gguf: Path, tokenizer: Tokenizer, prompt: list[int], n: int, repeats: int) -> tuple[float, float]:
    """(tokens/s of our llama.cpp engine, of llama-cpp-python's generate loop called directly) on one loaded model."""
    from lit_lora import llamacpp
    from lit_lora.text_stream import stop_ids_for

    llm = llamacpp.open_llama(gguf, n_ctx=len(prompt) + n + 8, n_threads=torch.get_num_threads(), verbose=False)
    stops = stop_ids_for(tokenizer, ())

    def direct() -> int:
        count = 0
        for token in llm.generate(prompt, temp=0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            count += 1
            if token in stops or count >= n:
                return count
        return count

    def wrapped() -> int:
        return llamacpp.complete(llm, tokenizer, [prompt], (), Sampling(max_new_tokens=n, temperature=0)).n_generated

    best = {}
    for name, run in (("direct", direct), ("ours", wrapped)) * (repeats + 1):  # interleaved: the same conditions
        t0 = time.perf_counter()
        count = run()
        best[name] = max(best.get(name, 0.0), count / (time.perf_counter() - t0))
    return best["ours"], best["direct"]


def transformers_generate(hf_dir: Path, dtype: torch.dtype, prompt: list[int], n: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    idx = torch.tensor([prompt])
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
            best = min(best, time.perf_counter() - t0)
    assert out.shape[1] - idx.shape[1] == n
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path,
                        default=Path.home() / ".cache" / "lit-lora" / "checkpoints" / "smollm2-135m-instruct")
    parser.add_argument("--precision", choices=[p for p in GENERATE_PRECISIONS if p != "auto"], default="32-true")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip_transformers", action="store_true", help="no transformers peer")
    parser.add_argument("--skip_llama_cpp", action="store_true", help="no llama.cpp (engine and peer)")
    parser.add_argument("--skip_quantized", action="store_true", help="no int8 / nf4 rows")
    parser.add_argument("--plain", action="store_true", help="ours on the model as loaded: no fused matmuls, "
                        "no pre-packed weights (to see what prepare_for_generation buys)")
    args = parser.parse_args()

    dtype = PRECISIONS[args.precision][0]
    tokenizer = Tokenizer(args.checkpoint_dir)
    prompt = tokenizer.encode(instruction_template("chatml").single_turn.prompt(PROMPT))
    print(f"{args.checkpoint_dir.name}, {args.precision}, prompt {len(prompt)} tokens, greedy, "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    speeds = {}
    rows = [(p, "none") for p in ("32-true", "bf16-true")] + \
        ([] if args.skip_quantized else [(args.precision, "int8"), (args.precision, "nf4")])
    for precision, quantize in rows:
        speed, answer = ours(args.checkpoint_dir, PRECISIONS[precision][0], prompt, args.new_tokens, args.repeats,
                             not args.plain, quantize)
        speeds[precision, quantize] = speed
        label = f"{precision}, quantize {quantize}"
        print(f"lit-lora generate, torch engine, {label:24s} {speed:7.2f} tokens/s   Paris: {answer[:40]!r}")
    our_speed = speeds[args.precision, "none"]
    for quantize in [q for _, q in rows if q != "none"]:
        print(f"  quantize {quantize}: {speeds[args.precision, quantize] / speeds['bf16-true', 'none']:.2f}x bf16, "
              f"{speeds[args.precision, quantize] / speeds['32-true', 'none']:.2f}x fp32")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_llama_cpp:
            gguf = export_gguf(Path(tmp) / "model.gguf", args.checkpoint_dir, type=GGUF_TYPE[args.precision])
            engine, direct = llama_cpp_speeds(gguf, tokenizer, prompt, args.new_tokens, args.repeats)
            print(f"lit-lora generate, llama.cpp engine:  {engine:7.2f} tokens/s")
            print(f"llama.cpp (llama-cpp-python) direct:  {direct:7.2f} tokens/s   "
                  f"(engine / direct {engine / direct:.3f})")
        if not args.skip_transformers:
            hf_dir = export_hf(args.checkpoint_dir, Path(tmp) / "hf")
            hf_speed = transformers_generate(hf_dir, dtype, prompt, args.new_tokens, args.repeats)
            print(f"transformers generate:                {hf_speed:7.2f} tokens/s   (torch engine / transformers "
                  f"{our_speed / hf_speed:.2f}x)")


if __name__ == "__main__":
    main()
