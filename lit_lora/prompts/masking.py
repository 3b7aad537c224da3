"""The loss mask of a rendered conversation: which tokens are an assistant's, decided by position.

We render once more with every assistant content replaced by a unique sentinel, find the sentinels, and check that
putting the real contents back (as the template may have transformed them, e.g. `| trim`) gives the real rendering
exactly; if it does not, we refuse rather than guess. Each turn's target span is its content plus the special token
the template writes right after it (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`...). Character spans become
token positions through the tokenizer's offsets.
"""
from __future__ import annotations

import uuid
from typing import Any, NamedTuple

from lit_lora.errors import UserError
from lit_lora.prompts.chat_template import ChatTemplate, require_huggingface
from lit_lora.tokenizer import token_content

TRAIN_ON = ("assistant", "last", "all")


class EncodedChat(NamedTuple):
    ids: list[int]
    targets: list[bool]  # per token: counts in the loss
    # Per assistant turn, the special token that closes it; None where the template writes none (the caller should
    # warn: the model will not learn to stop). Empty with train_on="all", which does not locate the turns.
    end_markers: tuple[str | None, ...]
    # Tokens before the last assistant turn's first target token: the prompt evaluate gives the model (0 with "all").
    prompt_length: int = 0


def special_texts(tokenizer: Any) -> list[str]:
    """Strings that can be an end-of-turn marker: the tokenizer's added tokens (not bare whitespace, which some
    vocabularies add as tokens) and the EOS text. Longest first, so the longest match wins."""
    require_huggingface(tokenizer)
    texts = {t.content for t in tokenizer.processor.get_added_tokens_decoder().values() if t.content.strip()}
    eos = token_content(tokenizer.config.get("eos_token"))
    if eos:
        texts.add(eos)
    return sorted(texts, key=len, reverse=True)


def _content_forms(content: str) -> list[str]:
    """What a template may have made of an assistant content: as is first, then the ways `trim`/`strip` change it."""
    forms = [content, content.strip(), content.lstrip(), content.rstrip()]
    return list(dict.fromkeys(forms))


def assistant_spans(template: ChatTemplate, messages: list[dict[str, Any]], markers: list[str]
                    ) -> tuple[str, list[tuple[int, int]], tuple[str | None, ...]]:
    """The rendering, and per assistant turn the character span of its content plus its end marker, if any."""
    text = template.render(messages)
    nonce = uuid.uuid4().hex[:12]
    sentinels, probe = [], []
    for m in messages:
        if m.get("role") == "assistant":
            sentinels.append(f"LITLORA{nonce}TURN{len(sentinels)}END")
            m = {**m, "content": sentinels[-1]}
        probe.append(m)
    probed = template.render(probe)

    # Split the probe rendering into the template's own text around the sentinels: literal[0] S0 literal[1] S1 ...
    literals, rest = [], probed
    for i, sentinel in enumerate(sentinels):
        if rest.count(sentinel) != 1:
            raise UserError(f"{template.name}: assistant turn {i} appears {rest.count(sentinel)} times in the "
                            "rendering instead of once, so its loss mask cannot be located; "
                            "use another --template or --train_on all")
        before, rest = rest.split(sentinel)
        literals.append(before)
    literals.append(rest)

    contents = [m["content"] for m in messages if m.get("role") == "assistant"]
    if not all(isinstance(c, str) for c in contents):
        raise UserError("assistant turns must have text content to be masked")
    placed = _place_contents(text, literals, contents)
    if placed is None:
        raise UserError(f"{template.name} changes assistant contents in a way lit-lora cannot map back to the "
                        "rendering, so the loss mask cannot be verified; use another --template or --train_on all")
    spans, found_markers = [], []
    for start, end in placed:
        marker = next((s for s in markers if text.startswith(s, end)), None)
        spans.append((start, end + len(marker or "")))
        found_markers.append(marker)
    return text, spans, tuple(found_markers)


def _place_contents(text: str, literals: list[str], contents: list[str]) -> list[tuple[int, int]] | None:
    """Character spans of the contents in `text` = literals[0] + form(contents[0]) + literals[1] + ..., where each
    form is the content as is or trimmed (the first that fits wins); None when no such reading of `text` exists."""
    if not text.startswith(literals[0]):
        return None
    spans, pos = [], len(literals[0])
    for i, (content, after) in enumerate(zip(contents, literals[1:])):
        last = i == len(contents) - 1
        for form in _content_forms(content):
            end = pos + len(form)
            # The template's own text must follow, up to the next turn, or exactly to the end after the last one.
            if text.startswith(form, pos) and (text[end:] == after if last else text.startswith(after, end)):
                break
        else:
            return None
        spans.append((pos, end))
        pos = end + len(after)
    return spans


def _offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    require_huggingface(tokenizer)
    encoding = tokenizer.processor.encode(text, add_special_tokens=False)
    return encoding.ids, encoding.offsets


def encode_conversation(tokenizer: Any, template: ChatTemplate, messages: list[dict[str, Any]],
                        train_on: str = "assistant") -> EncodedChat:
    """Token ids of the rendered conversation and which of them are loss targets.

    train_on: "assistant" = every assistant turn's content and end marker; "last" = the final assistant turn only;
    "all" = every token (end_markers is then empty, and prompt_length 0 where the turns cannot be located). No
    BOS is added: the template writes it, as transformers
    assumes (so never two BOS, and none when the template writes none, exactly as apply_chat_template)."""
    if train_on not in TRAIN_ON:
        raise UserError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
    if not any(m.get("role") == "assistant" for m in messages):
        raise UserError("the conversation has no assistant turn, so there is nothing to train on")
    if train_on == "all":  # spans only for the prompt length, so this also serves templates whose turns hide
        text = template.render(messages)
        try:
            _, spans, _ = assistant_spans(template, messages, special_texts(tokenizer))
        except UserError:
            spans = []
        ids, offsets = _offsets(tokenizer, text)
        return EncodedChat(ids, [True] * len(ids), (), _first_token_at(offsets, spans[-1][0]) if spans else 0)
    text, spans, markers = assistant_spans(template, messages, special_texts(tokenizer))
    ids, offsets = _offsets(tokenizer, text)
    if train_on == "last":
        spans = spans[-1:]
    # A token is a target when any of its characters is: a token that straddles the start of a content (a word
    # merged with the template's space before it) must be learnt, or the turn's first word never would be.
    targets = [any(start < span_end and end > span_start for span_start, span_end in spans)
               for start, end in offsets]
    return EncodedChat(ids, targets, markers, _first_token_at(offsets, spans[-1][0]))


def _first_token_at(offsets: list[tuple[int, int]], char: int) -> int:
    """The first token that covers or follows character `char` (the last one if none does)."""
    return next((i for i, (start, end) in enumerate(offsets) if end > char or start >= char), len(offsets) - 1)


def end_markers(template: ChatTemplate, tokenizer: Any) -> tuple[str, ...]:
    """The special tokens `template` closes an assistant turn with (to stop generation at), found by rendering a
    one-exchange probe; empty if the template writes none or refuses the probe. A SentencePiece-only tokenizer is a
    UserError."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    require_huggingface(tokenizer)  # outside the try: a tokenizer that cannot render chats is the user's to fix
    try:
        return tuple(m for m in assistant_spans(template, probe, special_texts(tokenizer))[2] if m)
    except UserError:
        return ()
