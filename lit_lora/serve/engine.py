"""Continuous batching: requests join and leave the running batch between decode steps.

One thread owns the model. Each turn of its loop:
  admit    the next waiting request takes the spare cache row, and its adapter a resident slot
  prefill  one chunk (at most `prefill_chunk` tokens) of that request's prompt: a long prompt delays the running
           requests by one chunk per step, never by its whole length; when its prompt is in, its keys move to
           the next running row and its first token is sampled
  decode   one token for every running request, in one forward pass, each row with its own adapter and position
A finished, cancelled or failed request leaves at once; the last running row moves into its place, so running
requests always hold rows 0..n-1. Consumers get `Event`s through the callback they submitted, called from this
thread (the server hands them over to its event loop).
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from lit_lora.errors import UserError
from lit_lora.generate import Sampling, next_logits, sample
from lit_lora.model import LLaMA, additive_mask, causal_mask
from lit_lora.serve.adapters import ResidentAdapters
from lit_lora.serve.batch import Rows, SlotCache, use_slots
from lit_lora.text_stream import TextStream, stop_ids_for
from lit_lora.tokenizer import Tokenizer


class Event(NamedTuple):
    kind: str  # "text" (a piece of the answer), "done" (finish reason), "error" (an HTTP status and a message)
    text: str = ""
    status: int = 0


@dataclass(eq=False)
class Request:
    prompt: list[int]
    sampling: Sampling  # max_new_tokens is the request's max_tokens
    stop_strings: tuple[str, ...]
    adapter: str | None  # a resident adapter's name; None: the base
    emit: Callable[[Event], None]
    seed: int | None = None
    cancelled: bool = False  # set by the consumer (its client went away): the request leaves at the next step
    # Set by the engine:
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    slot: int = 0  # the adapter's slot in the model's MultiLoRA layers
    length: int = 0  # tokens in the cache
    prefilled: int = 0
    last: int = 0  # the last sampled token, the input of the next step
    generated: int = 0


class Engine:
    """The model, its cache rows and resident adapters, and the thread that decodes for every request."""

    def __init__(self, model: LLaMA, tokenizer: Tokenizer, adapters: ResidentAdapters, rows: Rows, max_rows: int,
                 max_len: int, max_queue: int, prefill_chunk: int = 128) -> None:
        self.model, self.tokenizer, self.adapters, self.rows = model, tokenizer, adapters, rows
        self.max_rows, self.max_len, self.max_queue, self.prefill_chunk = max_rows, max_len, max_queue, prefill_chunk
        self.caches: list[SlotCache] = use_slots(model, rows, max_rows, max_len)
        self.device = model.embed_tokens.weight.device
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefilling: Request | None = None
        self.lock = threading.Condition()
        self.closing = False
        self.generated_tokens = 0  # over the server's life, for /metrics
        self.thread = threading.Thread(target=self._loop, name="lit-lora-engine", daemon=True)

    # ------------------------------------------------------------------ the consumers' side (any thread)
    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request; UserError when the queue is full (the server answers 429)."""
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise UserError(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
            self.waiting.append(request)
            self.lock.notify()

    def stop(self, cancel: bool = True) -> None:
        """End the loop; `cancel`: what is still queued or running ends with an error event."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.thread.join()
        if cancel:
            for request in [*self.waiting, *self.running, *([self.prefilling] if self.prefilling else [])]:
                request.emit(Event("error", "the server is shutting down", 503))

    def load(self) -> dict[str, int]:
        with self.lock:
            return {"waiting": len(self.waiting), "running": len(self.running) + (self.prefilling is not None)}

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        while True:
            with self.lock:
                while not (self.waiting or self.running or self.prefilling or self.closing):
                    self.lock.wait()
                if self.closing:
                    return
            try:
                with torch.inference_mode():
                    self._admit()
                    self._prefill()
                    self._decode()
            except Exception as e:  # noqa: BLE001 - a bug or out of memory: fail what runs, keep serving
                self._fail_all(f"internal error while decoding: {type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        failed = [*self.running, *([self.prefilling] if self.prefilling else [])]
        self.running, self.prefilling = [], None
        for request in failed:
            self.adapters.release(request.slot)
            request.emit(Event("error", message, 500))

    def _admit(self) -> None:
        while self.prefilling is None and len(self.running) < self.max_rows:
            with self.lock:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            if request.cancelled:
                continue
            try:
                slot = self.adapters.acquire(request.adapter)
            except UserError as e:  # its adapter went bad on disk since the request was checked
                request.emit(Event("error", str(e), 400))
                continue
            if slot is None:  # every adapter slot is held by running requests: wait for one to finish
                with self.lock:
                    self.waiting.appendleft(request)
                return
            request.slot = slot
            request.stream = TextStream(self.tokenizer, stop_ids_for(self.tokenizer, request.stop_strings),
                                        request.stop_strings)
            if request.seed is not None:
                request.generator = torch.Generator(self.device).manual_seed(request.seed)
            self.prefilling = request

    def _prefill(self) -> None:
        request = self.prefilling
        if request is None:
            return
        if request.cancelled:
            self.prefilling = None
            self.adapters.release(request.slot)
            return
        start = request.prefilled
        chunk = request.prompt[start : start + self.prefill_chunk]
        positions = torch.arange(start, start + len(chunk), device=self.device)
        mask = causal_mask(positions, start + len(chunk))[None, None]  # (1, 1, T, S)
        tokens = torch.tensor([chunk], device=self.device)
        logits = self._forward(self.max_rows, [request], tokens, positions[None], mask)
        request.prefilled = request.length = start + len(chunk)
        if request.prefilled < len(request.prompt):
            return
        self.prefilling = None
        row = len(self.running)
        for cache in self.caches:
            cache.move(self.max_rows, row, request.length)
        self.running.append(request)
        self._take([request], logits)

    def _decode(self) -> None:
        self._leave([r for r in self.running if r.cancelled], emit=False)
        rows = list(self.running)
        if not rows:
            return
        tokens = torch.tensor([[r.last] for r in rows], device=self.device)
        positions = torch.tensor([[r.length] for r in rows], device=self.device)
        keys = int(positions.max()) + 1
        valid = torch.arange(keys, device=self.device)[None, :] <= positions  # (B, S): each row its own length
        mask = additive_mask(valid[:, None, None, :], self.model.embed_tokens.weight.dtype)
        logits = self._forward(0, rows, tokens, positions, mask)
        for r in rows:
            r.length += 1
        self._take(rows, logits)

    def _forward(self, first_row: int, requests: list[Request], tokens, positions, mask) -> torch.Tensor:
        self.rows.start, self.rows.stop = first_row, first_row + len(requests)
        self.rows.adapters = torch.tensor([r.slot for r in requests], device=self.device)
        return next_logits(self.model, tokens, positions, mask)

    def _take(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Sample each row's next token, hand its text over, and let finished requests leave."""
        greedy = logits.argmax(dim=-1).tolist()
        finished = []
        for i, r in enumerate(requests):
            s = r.sampling
            token = greedy[i] if s.temperature == 0 else int(sample(logits[i : i + 1], s, r.generator))
            r.last, r.generated = token, r.generated + 1
            self.generated_tokens += 1
            piece = r.stream.add(token)
            if piece:
                r.emit(Event("text", piece))
            if r.stream.done or r.generated >= s.max_new_tokens or r.length + 1 >= self.max_len:
                finished.append(r)
        self._leave(finished, emit=True)

    def _leave(self, requests: list[Request], emit: bool) -> None:
        for r in requests:
            if emit:
                reason = "stop" if r.stream.done else "length"
                piece = r.stream.finish()
                if piece:
                    r.emit(Event("text", piece))
                r.emit(Event("done", reason))
            row = self.running.index(r)
            last = len(self.running) - 1
            if row != last:  # the last row moves into the freed one: running requests stay in rows 0..n-1
                for cache in self.caches:
                    cache.move(last, row, self.running[last].length)
                self.running[row] = self.running[last]
            self.running.pop()
            self.adapters.release(r.slot)
