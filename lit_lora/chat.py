"""chat: a multi-turn conversation with a base model and its adapters, in the terminal or through a pipe.

Each message is rendered with the conversation so far in the active adapter's format (the chat template it was
trained with, else the checkpoint's own) and the answer streams as it is generated, ending at the template's
end-of-turn marker. When the conversation no longer fits the context window with room for an answer, the oldest
exchanges are dropped (the user is told once). With the torch engine, adapters are merged into the weights of the
one loaded base and swapped by restoring the base's own tensors, so switching costs a merge, not a reload; with
llama.cpp (`--engine`), every adapter's LoRA GGUF is loaded once over the one base and a switch sets the active one.

Commands: /reset, /system TEXT (no TEXT: none), /adapter NAME (an index, a path as given, or `base`), /help, /exit.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from lit_lora import llamacpp
from lit_lora.adapter import load_checked_adapter
from lit_lora.checkpoint import load_config, load_info
from lit_lora.device import GENERATE_PRECISIONS, check_precision, resolve_device
from lit_lora.errors import UserError
from lit_lora.generate import Sampling, TorchEngine, check_text
from lit_lora.quantize import decoding_quantize
from lit_lora.prompts.format import PromptFormat, prompt_format
from lit_lora.tokenizer import Tokenizer

HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt; /system alone clears it), "
        "/adapter NAME (switch: {names}), /help, /exit")


@dataclass
class Adapter:
    name: str  # the path as given on the command line, or "base"
    path: Path | None  # None for the base
    weights: tuple[Any, dict[str, torch.Tensor]] | None  # (LoRA config, tensors), None for the base
    format: PromptFormat


@dataclass
class ChatSession:
    engine: Any  # generate.TorchEngine or llamacpp.LlamaCppEngine
    max_seq_len: int
    tokenizer: Tokenizer
    adapters: list[Adapter]
    sampling: Sampling
    system: str | None = None  # None: the active adapter's default (its data's system prompt); "": none
    history: list[dict[str, str]] = field(default_factory=list)  # user and assistant turns, oldest first
    active: Adapter | None = None
    answer: Any = None  # the engine's answering function with the active adapter applied
    overflow_noted: bool = False
    applied: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # undoes the active adapter

    def switch(self, adapter: Adapter) -> None:
        self.applied.close()  # the base as it was (torch: its own tensors restored)
        weights = adapter.weights or (None, None)
        try:
            self.answer = self.applied.enter_context(self.engine.adapter(adapter.path, *weights))
        except BaseException:  # then answer with the base, never with what was just closed
            self.answer = self.applied.enter_context(self.engine.adapter(None, None, None))
            self.active = self.adapters[0]
            raise
        self.active = adapter

    def find(self, name: str) -> Adapter:
        def named(i: int, adapter: Adapter) -> bool:
            given = Path(adapter.name)
            return name in (str(i), adapter.name, given.name) or Path(name).resolve() == given.resolve()

        matches = [a for i, a in enumerate(self.adapters) if name and named(i, a)]
        if len(matches) != 1:
            raise UserError(f"{'no' if not matches else 'more than one'} adapter {name!r}; choose by number: "
                            f"{self.names()}")
        return matches[0]

    def names(self) -> str:
        return ", ".join(f"{i} = {a.name}" for i, a in enumerate(self.adapters))

    def prompt_ids(self, log: TextIO) -> list[int]:
        """The conversation rendered for the next answer, without its oldest exchanges if that is what fits."""
        room = self.max_seq_len - self.sampling.max_new_tokens
        turns = self.history
        while True:
            ids = self.active.format.conversation_ids(self.tokenizer, turns, self.system)
            if len(ids) <= room:
                break
            if len(turns) <= 1:
                raise UserError(f"this message needs {len(ids)} tokens, and the context window has room for {room} "
                                f"with {self.sampling.max_new_tokens} for the answer; send a shorter one")
            turns = turns[2:]  # the oldest exchange: a user turn and its answer
        if len(turns) < len(self.history):
            if not self.overflow_noted:
                print(f"(the conversation is longer than the context window of {self.max_seq_len} "
                      f"tokens: dropping the oldest turns to make room)", file=log, flush=True)
                self.overflow_noted = True
            self.history = turns
        return ids

    def ask(self, text: str, out: TextIO, log: TextIO) -> str:
        self.history.append({"role": "user", "content": check_text(text, "this message")})
        try:
            ids = self.prompt_ids(log)
        except UserError:  # the template refused it, or it is too long: the conversation stays as it was
            self.history = self.history[:-1]
            raise
        answer = self.answer(self.tokenizer, [ids], self.active.format.stop_strings, self.sampling, out).texts[0]
        print(file=out, flush=True)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def command(self, line: str, log: TextIO) -> bool:
        """Run a /command; False when the session should end."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("exit", "quit"):
            return False
        if name == "reset":
            self.history.clear()
            print("(conversation cleared)", file=log, flush=True)
        elif name == "system":
            self.system = arg
            print(f"(system prompt {'set' if arg else 'cleared'})", file=log, flush=True)
        elif name == "adapter":
            self.switch(self.find(arg))
            print(f"(now answering with {self.active.name})", file=log, flush=True)
        else:
            unknown = f"unknown command /{name}; " if name != "help" else ""
            print(unknown + HELP.format(names=self.names()), file=log, flush=True)
        return True


def run_chat(
    checkpoint_dir: Path, lora_paths: list[Path] = (), template: str = "auto", system: str | None = None,
    sampling: Sampling = Sampling(), seed: int | None = None, precision: str = "auto", verify: bool = True,
    input: TextIO | None = None, out: TextIO | None = None, log: TextIO | None = None, engine: str = "auto",
    device: str = "auto", quantize: str | None = None,
) -> ChatSession:
    """Read messages from `input` (a terminal or a pipe), one per line, until /exit or the end of the input.

    A refused message or command is an `error:` line on `log` and the session goes on; a pipe none of whose
    messages was answered ends in a UserError (exit code 2), so that a script notices."""
    input, out, log = input or sys.stdin, out or sys.stdout, log or sys.stderr
    check_precision(precision, GENERATE_PRECISIONS)
    where = resolve_device(device)
    # Everything that can be refused (templates, adapters, the token budget) is checked before the model loads.
    config, tokenizer = load_config(checkpoint_dir), Tokenizer(checkpoint_dir)
    if sampling.max_new_tokens >= config.max_seq_len:
        raise UserError(f"--max_new_tokens {sampling.max_new_tokens} leaves no room for the conversation in the "
                        f"context window of {config.max_seq_len} tokens")
    adapters = [Adapter("base", None, None, prompt_format(template, load_info(checkpoint_dir), tokenizer, True))]
    metas = []
    for path in lora_paths:
        lora_config, state, meta = load_checked_adapter(path, checkpoint_dir, config, verify)
        adapters.append(Adapter(str(path), path, (lora_config, state), prompt_format(template, meta, tokenizer, True)))
        metas.append((path, meta))
    # Seeded sampling starts again from the seed at each switch, so an adapter's answers can be reproduced.
    quantize = decoding_quantize(quantize, [meta for _, meta in metas], log)
    if llamacpp.choose_engine(engine, checkpoint_dir, metas, log, where, quantize) == "torch":
        answerer = TorchEngine.load(checkpoint_dir, precision, verify, False, seed, where, quantize)
    else:
        answerer = llamacpp.LlamaCppEngine(checkpoint_dir, precision, verify, seed)
        print(f"engine: llama.cpp ({answerer.model.name})", file=log)
    session = ChatSession(answerer, config.max_seq_len, tokenizer, adapters, sampling, system=system)
    session.switch(adapters[1] if len(adapters) > 1 else adapters[0])
    print(f"chatting with {session.active.name} ({session.active.format.name}); "
          f"{HELP.format(names=session.names())}", file=log, flush=True)
    with session.applied:
        asked, answered = converse(session, input, out, log)
    if asked and not answered and not input.isatty():  # a script sees its failure in the exit code, not only on stderr
        raise UserError(f"no message was answered ({asked} refused, each error is above); fix them and send them again")
    return session


def converse(session: ChatSession, input: TextIO, out: TextIO, log: TextIO) -> tuple[int, int]:
    """Answer the messages and run the commands of `input`, one per line, until /exit or the end of the input;
    returns (messages sent, messages answered)."""
    interactive = input.isatty()
    asked = answered = 0
    while True:
        if interactive:
            print("> ", end="", file=out, flush=True)
        line = input.readline()
        if not line:  # end of input
            break
        line = line.strip()
        try:
            if line.startswith("/"):
                if not session.command(line, log):
                    break
            elif line:
                asked += 1
                session.ask(line, out, log)
                answered += 1
        except UserError as e:  # a bad command or an over-long message ends nothing but itself
            print(f"error: {e}", file=log, flush=True)
    return asked, answered
