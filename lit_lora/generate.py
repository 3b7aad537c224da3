"""Text generation with a KV cache, as gpt-fast does it: one prefill pass, then one token per step.

Layers, from the bottom:
  sample            next token ids (B,) from logits (B, V): greedy at temperature 0, else top-k / top-p sampling
  generate_tokens   the decode loop over a batch of token prompts, left-padded to a common length
  TextStream        (text_stream.py, shared with the llama.cpp engine) incremental decoding of one row: only
                    final text comes out (no half UTF-8 characters, nothing that could start a stop string)
  complete          prompts in, texts out, optionally streamed
  run_generate      what the `generate` command does: load the base once, then answer with each adapter

Before decoding, `fast_decode.prepare_for_generation` fuses projections and pre-packs weights (same math).
Adapters are merged into the weights for generation (`adapter.merge_adapter`) and the original weights are
put back before the next one: decoding then runs at base speed, and the weights are bit-identical to the
checkpoint `merge-lora` writes, so both give the same greedy output.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, TextIO

import torch

from lit_lora.adapter import load_checked_adapter, merge_adapter, restore_weights
from lit_lora.checkpoint import load_config, load_info, load_model
from lit_lora.device import (GENERATE_PRECISIONS, PRECISIONS, check_precision, peak_memory_bytes, resolve_device,
                             resolve_precision)
from lit_lora.errors import UserError
from lit_lora.fast_decode import prepare_for_generation, repack
from lit_lora.lora import lora_applied
from lit_lora.model import LLaMA, additive_mask, causal_mask
from lit_lora.prompts.format import prompt_format
from lit_lora.quantize import decoding_quantize, quantization, to_int8
from lit_lora.text_stream import Completion, TextStream, stop_ids_for
from lit_lora.tokenizer import Tokenizer


@dataclass
class Sampling:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 is greedy
    top_k: int | None = 200  # None keeps the whole vocabulary
    top_p: float = 1.0  # nucleus sampling; 1 keeps everything top_k kept

    def __post_init__(self) -> None:
        for option in fields(self):  # NaN slips through any `value < bound` check, infinity through lower bounds
            value = getattr(self, option.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{option.name} must be a finite number, got {value}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top_k must be >= 1, got {self.top_k}; use --temperature 0 for greedy decoding")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > s.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_logits(model: LLaMA, idx: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) of the last position only: the output head is the largest matrix, skip it elsewhere."""
    return model.logits(model.hidden_states(idx, input_pos, mask)[:, -1])


def longrope_restart(config) -> int | None:
    """The position from which LongRoPE rotates with its long factors: transformers prefills the whole sequence
    again there, so that the cached keys are rotated as the new ones are, and so do we."""
    s = config.rope_scaling or {}
    return s["original_max_position_embeddings"] if s.get("rope_type") == "longrope" else None


def generate_tokens(
    model: LLaMA, prompts: list[list[int]], sampling: Sampling, pad_id: int = 0,
    generator: torch.Generator | None = None, forward: Callable = next_logits,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, (B,), once per step, for up to `sampling.max_new_tokens` steps.

    Prompts are padded on the left to a common length T0, so all rows decode at the same cache position.
    Pad keys are masked out, and RoPE only sees distances between positions, so the shift changes nothing.
    The caller decides when to stop (stop ids, stop strings) by no longer asking for tokens.
    """
    B, T0 = len(prompts), max(len(p) for p in prompts)
    if T0 >= model.config.max_seq_len:
        raise UserError(f"the prompt is {T0} tokens, the model's context is {model.config.max_seq_len}; "
                        f"shorten the prompt")
    total = min(T0 + sampling.max_new_tokens, model.config.max_seq_len)
    device = model.embed_tokens.weight.device
    # Everything the loop touches is allocated here; each step only takes views of it.
    tokens = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    key_valid = torch.ones(B, 1, 1, total, dtype=torch.bool, device=device)  # broadcasts to (B, H, T, S)
    for b, p in enumerate(prompts):
        tokens[b, T0 - len(p):T0] = torch.tensor(p, dtype=torch.long)
        key_valid[b, ..., : T0 - len(p)] = False
    # The one-token steps take the mask as an additive bias (0 or -inf): one add per layer, no conversion.
    key_bias = additive_mask(key_valid, model.embed_tokens.weight.dtype)
    positions = torch.arange(total, device=device)

    def prefill(n: int) -> torch.Tensor:
        # A pad query attends to itself only, so no row of the mask is empty (that would be NaN).
        eye = torch.eye(n, dtype=torch.bool, device=device)
        mask = (causal_mask(positions[:n], n) & key_valid[..., :n]) | eye  # (B, 1, n, n)
        return forward(model, tokens[:, :n], positions[:n], mask)

    restart = longrope_restart(model.config)
    model.set_kv_cache(B, total)
    try:
        with torch.inference_mode():
            token = sample(prefill(T0), sampling, generator)
            for t in range(T0, total):
                tokens[:, t] = token
                yield token
                if t + 1 < total:
                    if t == restart:  # every cached key again, with the long factors
                        logits = prefill(t + 1)
                    else:
                        logits = forward(model, tokens[:, t : t + 1], positions[t : t + 1], key_bias[..., : t + 1])
                    token = sample(logits, sampling, generator)
    finally:
        model.set_kv_cache(0)


def complete(
    model: LLaMA, tokenizer: Tokenizer, prompts: list[list[int]], stop_strings: tuple[str, ...], sampling: Sampling,
    generator: torch.Generator | None = None, stream: TextIO | None = None, forward: Callable = next_logits,
) -> Completion:
    """Texts for a batch of token prompts. `stream` gets row 0 live.
    A row ends at an end id of the tokenizer or at one of `stop_strings` (not included in its text)."""
    stop_ids = stop_ids_for(tokenizer, stop_strings)
    rows = [TextStream(tokenizer, stop_ids, stop_strings) for _ in prompts]
    n_generated = 0
    for step in generate_tokens(model, prompts, sampling, tokenizer.pad_id, generator, forward):
        for row, token in zip(rows, step.tolist()):
            if not row.done:  # a finished row's tokens are padding: not counted, not shown
                n_generated += 1
                piece = row.add(token)
                if stream is not None and row is rows[0] and piece:
                    stream.write(piece)
                    stream.flush()
        if all(row.done for row in rows):
            break
    stopped = [row.done for row in rows]
    for row in rows:
        piece = row.finish()
        if stream is not None and row is rows[0] and piece:
            stream.write(piece)
    return Completion([row.text for row in rows], n_generated, stopped)


def load_for_generation(checkpoint_dir: Path, precision: str, verify: bool, pack: bool = True,
                        device: torch.device = torch.device("cpu"), quantize: str = "none") -> LLaMA:
    """The base model in eval mode on `device` (the weights read straight onto it), in `precision` (auto: the
    faster there), quantised as `quantize` says and prepared for decoding."""
    dtype = PRECISIONS[resolve_precision(precision, device.type, training=False)][0]
    return decoding_model(load_model(checkpoint_dir, dtype, device, verify=verify, quantize=quantize).eval(), quantize,
                          pack)


def decoding_model(model: LLaMA, quantize: str, pack: bool = True) -> LLaMA:
    """A loaded model shaped for decoding: fused and packed (none), fused with int8 weights (int8), or an NF4
    model as loaded (its 4-bit weights are not fused, and adapters stay unmerged beside them, as in training)."""
    if quantize == "nf4":
        return model
    model = prepare_for_generation(model, pack=pack and quantize == "none")
    return to_int8(model) if quantize == "int8" else model


def check_text(text: str, what: str) -> str:
    """Refuse text that cannot be tokenised: bytes that are not UTF-8 arrive as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{what} is not valid UTF-8 text; pass it as UTF-8") from None
    return text


def read_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    if (prompt is None) == (prompts_file is None):
        raise UserError("give exactly one of --prompt and --prompts_file")
    if prompts_file is None:
        return [check_text(prompt, "--prompt")]
    if Path(prompts_file).is_dir() or not Path(prompts_file).exists():
        problem = "is a directory" if Path(prompts_file).is_dir() else "does not exist"
        raise UserError(f"prompts file {prompts_file} {problem}; pass a text file with one prompt per line")
    try:
        text = Path(prompts_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{prompts_file} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{prompts_file} holds no prompts (one prompt per line)")
    return prompts


def run_generate(
    checkpoint_dir: Path, prompt: str | None = None, input: str = "", prompts_file: Path | None = None,
    lora_paths: list[Path] = (), template: str = "auto", sampling: Sampling = Sampling(), seed: int | None = None,
    num_samples: int = 1, stream: bool = True, precision: str = "auto", compile: bool = False,
    out: TextIO | None = None, log: TextIO | None = None, verify: bool = True, system: str | None = None,
    engine: str = "auto", device: str = "auto", quantize: str | None = None,
) -> list[str]:
    """Answer the prompts with the base (or with each adapter in turn); texts to `out`, timings to `log`.

    With more than one answer (adapters x samples, or a prompts file) each is headed by a `### ...` line.
    Only a single prompt streams; a batch prints its answers when the batch is done. `engine`: torch, llama.cpp
    (the checkpoint and adapters exported to GGUF once, see llamacpp.py) or auto (llama.cpp where installed, on
    the CPU). `device`: auto (the first GPU, else the CPU), cpu, cuda[:N] or mps. `quantize`: the torch engine's
    base weights, none, int8 or nf4 (None: nf4 for adapters trained over it, else none).
    """
    from lit_lora import llamacpp

    out, log = out or sys.stdout, log or sys.stderr
    check_precision(precision, GENERATE_PRECISIONS)
    where = resolve_device(device)
    if num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {num_samples}")
    texts = read_prompts(prompt, prompts_file)
    check_text(input, "--input")
    check_text(system or "", "--system")
    # Everything that can be refused (adapters, templates, prompts) is checked before the model loads.
    config, tokenizer = load_config(checkpoint_dir), Tokenizer(checkpoint_dir)
    adapters = [(p, *load_checked_adapter(p, checkpoint_dir, config, verify)) for p in lora_paths]
    # Without an adapter: the format a merged checkpoint's adapter was trained in, if it records one.
    jobs = []
    for path, lora_config, state, meta in adapters or [(None, None, None, load_info(checkpoint_dir))]:
        chosen = prompt_format(template, meta, tokenizer)
        prompts = [chosen.question_ids(tokenizer, text, input, system) for text in texts]
        jobs.append((path, lora_config, state, chosen.stop_strings, prompts))
    quantize = decoding_quantize(quantize, [meta for *_, meta in adapters], log)
    if compile and quantize != "none":
        raise UserError(f"--compile is not supported with --quantize {quantize} (torch.compile of the quantised "
                        f"weights is untested); drop one of them")
    longest = max(len(p) for *_, prompts in jobs for p in prompts)
    if longest >= config.max_seq_len:
        raise UserError(f"the prompt is {longest} tokens, the model's context is {config.max_seq_len}; shorten it")
    if llamacpp.choose_engine(engine, checkpoint_dir, [(p, meta) for p, *_, meta in adapters], log, where,
                              quantize) == "torch":
        answerer = TorchEngine.load(checkpoint_dir, precision, verify, compile, seed, where, quantize)
    else:
        if compile:
            print("note: --compile is for the torch engine; llama.cpp ignores it", file=log)
        answerer = llamacpp.LlamaCppEngine(checkpoint_dir, precision, verify, seed, longest + sampling.max_new_tokens)
        print(f"engine: llama.cpp ({answerer.model.name})", file=log)
    many = len(adapters) > 1 or num_samples > 1 or len(texts) > 1

    answers = []
    for path, lora_config, state, stop_strings, prompts in jobs:
        with answerer.adapter(path, lora_config, state) as answer:
            for i in range(num_samples):
                if many:
                    print(f"### {path or 'base'}" + (f", sample {i + 1}" if num_samples > 1 else ""), file=out,
                          flush=True)
                live = out if stream and len(prompts) == 1 else None
                t0 = time.perf_counter()
                results, n_generated, _ = answer(tokenizer, prompts, stop_strings, sampling, live)
                elapsed = time.perf_counter() - t0
                for j, result in enumerate(results):
                    if live is None:
                        print((f"## prompt {j + 1}\n" if len(results) > 1 else "") + result, file=out)
                if live is not None:
                    print(file=out)
                answers.extend(results)
                print(f"Time for inference: {elapsed:.02f} sec total, {n_generated / elapsed:.02f} tokens/sec",
                      file=log)
    print(f"Memory used: {peak_memory_bytes(where)[1] / 1024**3:.02f} GB", file=log)
    return answers


class TorchEngine:
    """The base loaded once; each adapter merged into it for its answers, then the weights restored."""

    def __init__(self, model: LLaMA, seed: int | None = None, forward: Callable = next_logits) -> None:
        self.model, self.seed, self.forward = model, seed, forward

    @classmethod
    def load(cls, checkpoint_dir: Path, precision: str, verify: bool, compile: bool, seed: int | None,
             device: torch.device = torch.device("cpu"), quantize: str = "none") -> TorchEngine:
        model = load_for_generation(checkpoint_dir, precision, verify, not compile, device, quantize)
        return cls(model, seed, torch.compile(next_logits, dynamic=True) if compile else next_logits)

    @contextlib.contextmanager
    def adapter(self, path: Path | None, lora_config, state) -> Iterator[Callable]:
        # One generator per adapter, so each adapter's output matches a run of its own with the same seed.
        device = self.model.embed_tokens.weight.device  # sampling draws where the logits are
        generator = torch.Generator(device).manual_seed(self.seed) if self.seed is not None else None
        with self.adapted(lora_config, state):
            yield lambda tokenizer, prompts, stops, sampling, live: complete(
                self.model, tokenizer, prompts, stops, sampling, generator, live, self.forward)

    @contextlib.contextmanager
    def adapted(self, lora_config, state) -> Iterator[None]:
        """The model with the adapter (None: the base): merged into full-precision or int8 weights, then the
        originals restored; beside NF4 weights as in training (merging into 4-bit weights would round it away)."""
        if lora_config is not None and quantization(self.model) == "nf4":
            with lora_applied(self.model, lora_config, state):
                yield
            return
        originals = merge_adapter(self.model, lora_config, state) if lora_config else {}
        repack(self.model)
        try:
            yield
        finally:
            restore_weights(self.model, originals)
