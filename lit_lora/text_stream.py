"""Tokens into text as they come, for any decode engine: what is final to print, and where an answer stops."""
from __future__ import annotations

from typing import NamedTuple

from lit_lora.tokenizer import Tokenizer


class TextStream:
    """Decodes one row's tokens as they arrive and says when the row is finished.

    `add` returns only text that is final: a trailing incomplete UTF-8 character ("\\ufffd" when decoded)
    and any tail that could be the start of a stop string are held back until the next token settles them.
    """

    def __init__(self, tokenizer: Tokenizer, stop_ids: set[int], stop_strings: tuple[str, ...]) -> None:
        self.tokenizer, self.stop_ids, self.stop_strings = tokenizer, stop_ids, stop_strings
        self.ids: list[int] = []
        self.text = ""
        self.printed = 0
        self.done = False

    def add(self, token: int) -> str:
        if self.done:
            return ""
        if token in self.stop_ids:
            return self.finish()
        self.ids.append(token)
        # Decoding all ids each time keeps multi-byte characters and tokenizer-specific spacing right.
        self.text = self.tokenizer.decode(self.ids)
        hits = [i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self.finish()
        safe = len(self.text) - self._held_back()
        piece, self.printed = self.text[self.printed : safe], max(self.printed, safe)
        return piece

    def _held_back(self) -> int:
        held = len(self.text) - len(self.text.rstrip("\ufffd"))
        for stop in self.stop_strings:
            for k in range(len(stop) - 1, 0, -1):
                if self.text.endswith(stop[:k]):
                    held = max(held, k)
                    break
        return held

    def finish(self) -> str:
        self.done = True
        piece, self.printed = self.text[self.printed :], len(self.text)
        return piece


def stop_ids_for(tokenizer: Tokenizer, stop_strings: tuple[str, ...]) -> set[int]:
    """The tokenizer's end ids plus any stop string that is a single token (ChatML's <|im_end|>)."""
    ids = set(tokenizer.stop_ids)
    for s in stop_strings:
        token_id = tokenizer.token_to_id(s)
        if token_id is not None:
            ids.add(token_id)
    return ids


class Completion(NamedTuple):
    texts: list[str]
    n_generated: int  # tokens generated over all rows, each row's stop token included
    stopped: list[bool]  # per row: ended at a stop id or string (not cut by max_new_tokens or the context)
