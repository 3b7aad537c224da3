"""Render conversations with a checkpoint's own chat template, exactly as Hugging Face does, and mask the loss.

Why: a chat model was trained on its template's exact text (markers, newlines, BOS), so fine-tuning data must be
rendered the same way, token for token, or the adapter learns a format the model never sees at inference. The
template (`chat_template` in tokenizer_config.json, or transformers 5's `chat_template.jinja`) comes from the
checkpoint and is untrusted code, so it runs in Jinja's immutable sandbox, configured as transformers configures
it (trim_blocks, lstrip_blocks, `raise_exception`, HF's `tojson`, `strftime_now`, the special tokens as variables).
As in `apply_chat_template`, the rendered text is tokenised with no special tokens added: the template writes BOS.

The loss mask is decided by position. We render once more with every assistant content replaced by a unique
sentinel, find the sentinels, and check that putting the real contents back (as the template may have transformed
them, e.g. `| trim`) gives the real rendering exactly; if it does not, we refuse rather than guess. Each turn's
target span is its content plus the special token the template writes right after it (`<|im_end|>`, `<|eot_id|>`,
`<end_of_turn>`, `</s>`...). Character spans become token positions through the tokenizer's offsets.
"""
from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lit_lora.checkpoint import CHAT_TEMPLATE_FILE
from lit_lora.errors import UserError
from lit_lora.tokenizer import token_content

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# The named special tokens transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TRAIN_ON = ("assistant", "last", "all")
MAX_RENDER_CHARS = 10_000_000

# Templates for checkpoints that carry none (base models), written as transformers-style Jinja so they take the same
# path as a checkpoint's own: (source, special tokens the tokenizer must have as single tokens).
BUILTIN_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        ("<|im_start|>", "<|im_end|>")),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
        "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    # Stanford Alpaca's wording, one "### Instruction / ### Response" block per exchange; EOS closes each answer.
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% set rest = messages[1:] %}"
        "{% else %}{{ 'Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n' }}{% set rest = messages %}{% endif %}"
        "{% for m in rest %}{% if m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}"
        "{% else %}{{ raise_exception('the alpaca template takes a system turn only first') }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}",
        ()),
    # No markup: each turn on its own line, EOS after each answer. For base models and continuation tasks.
    "plain": (
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
        "{{ '\n' }}{% endfor %}",
        ()),
}


class TemplateRaised(jinja2.exceptions.TemplateError):
    """The template's own `raise_exception(...)`: its message is meant for the user, so it is shown verbatim."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & for HTML; chat templates expect plain JSON, as transformers renders it.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """`dict(...)` in a template without handing it the `dict` type itself (whose attributes reach Python internals)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names: `{% set ns.__x = ... %}` is a known route toward internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature, so `namespace(self=1)` still works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed (leading underscore)")


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) and render its body as is.

    We find assistant spans with sentinels instead, but templates that carry the tag must still compile."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    return env


def _plain(value: Any) -> Any:
    """Only JSON-like data reaches the template: rich objects carry methods the sandbox cannot judge."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (str enums...) become their plain base type
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):  # kept a tuple: Jinja prints (1, 2), not [1, 2]
        return tuple(_plain(v) for v in value)
    raise UserError(f"chat data must be JSON-like (str, number, bool, list, dict), got {type(value).__name__}")


def special_tokens(tokenizer: Any) -> dict[str, str | None]:
    """The named special tokens a template sees, as transformers' special_tokens_map: tokenizer_config.json's,
    then the legacy special_tokens_map.json's."""
    legacy = Path(tokenizer.path).parent / "special_tokens_map.json"
    try:
        legacy_map = json.loads(legacy.read_text(encoding="utf-8")) if legacy.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{legacy} is not valid JSON: {e}") from None
    return {key: token_content(tokenizer.config.get(key)) or token_content(legacy_map.get(key))
            for key in SPECIAL_TOKEN_KEYS}


def _bounded(pieces: Any, name: str) -> Iterator[str]:
    """The rendering's pieces, stopped once they pass MAX_RENDER_CHARS: an untrusted template may loop for ever
    (nested loops each within the sandbox's range limit), and one that writes this much is not a chat format."""
    size = 0
    for piece in pieces:
        size += len(piece)
        if size > MAX_RENDER_CHARS:
            raise UserError(f"{name} wrote more than {MAX_RENDER_CHARS:,} characters for one conversation and was "
                            "stopped; check the template for runaway loops")
        yield piece


class ChatTemplate:
    """A compiled chat template plus the special tokens it may use, rendering as transformers does."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, name: str = "chat template") -> None:
        self.source = source
        self.name = name
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"{name} does not compile: {e.message} (template line {e.lineno})") from None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTemplate:
        """The checkpoint's own template: `chat_template.jinja` (transformers 5) or tokenizer_config.json's."""
        directory = Path(tokenizer.path).parent
        source = cls.source_of(tokenizer)
        if source is None:
            raise UserError(f"the tokenizer in {directory} has no chat template; pass --template "
                            f"{' or '.join(BUILTIN_TEMPLATES)} (or a .jinja file)")
        return cls(source, special_tokens(tokenizer), name=f"the chat template of {directory}")

    @staticmethod
    def source_of(tokenizer: Any) -> str | None:
        """The checkpoint's own template source: `chat_template.jinja` (transformers 5) or tokenizer_config.json's."""
        source: Any = tokenizer.chat_template
        jinja_file = Path(tokenizer.path).parent / CHAT_TEMPLATE_FILE
        if jinja_file.is_file():  # transformers lets this file win over tokenizer_config.json, so do we
            source = jinja_file.read_text(encoding="utf-8")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        return source if isinstance(source, str) and source.strip() else None

    @classmethod
    def load(cls, name: str, tokenizer: Any) -> ChatTemplate:
        """`auto`: the checkpoint's own template; a built-in (BUILTIN_TEMPLATES); or a path to a .jinja file."""
        require_huggingface(tokenizer)
        if name == "auto":
            return cls.from_tokenizer(tokenizer)
        if name in BUILTIN_TEMPLATES:
            source, needed = BUILTIN_TEMPLATES[name]
            missing = [t for t in needed if tokenizer.token_to_id(t) is None]
            if missing:
                raise UserError(f"the {name} template needs the special tokens {', '.join(missing)}, which the "
                                f"tokenizer of {Path(tokenizer.path).parent} lacks; choose another --template")
            return cls(source, special_tokens(tokenizer), name=f"the {name} template")
        if name.endswith(".jinja"):
            try:
                source = Path(name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read the template {name}: {e}") from None
            return cls(source, special_tokens(tokenizer), name=f"the template {name}")
        raise UserError(f"unknown chat template {name!r}; use auto (the checkpoint's own), "
                        f"{', '.join(BUILTIN_TEMPLATES)}, or a .jinja file")

    def record(self) -> dict[str, str]:
        """What prepared data and adapters keep, so generation renders with exactly this template."""
        return {"name": self.name, "source": self.source}

    @classmethod
    def from_record(cls, record: dict[str, str], tokenizer: Any) -> ChatTemplate:
        return cls(record["source"], special_tokens(tokenizer), name=record.get("name", "the recorded chat template"))

    def end_markers(self, tokenizer: Any) -> tuple[str, ...]:
        """The special tokens this template closes an assistant turn with (to stop generation at), found by
        rendering a one-exchange probe; empty if the template writes none or refuses the probe. A SentencePiece-only
        tokenizer is a UserError."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        require_huggingface(tokenizer)  # outside the try: a tokenizer that cannot render chats is the user's to fix
        try:
            return tuple(m for m in assistant_spans(self, probe, _special_texts(tokenizer))[2] if m)
        except UserError:
            return ()

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, **extra: Any) -> str:
        """The conversation as text. `extra` become template variables and override the special tokens."""
        # Like apply_chat_template: keys whose value is None are dropped (templates test for presence, not None).
        messages = _plain(list(messages))
        if not all(isinstance(m, dict) for m in messages):
            raise UserError("chat messages must be objects with a role and a content")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **_plain(extra)}
        try:
            pieces = self._template.generate(messages=messages, tools=variables.pop("tools", None),
                                             documents=variables.pop("documents", None),
                                             add_generation_prompt=add_generation_prompt, **variables)
            return "".join(_bounded(pieces, self.name))
        except UserError:
            raise
        except TemplateRaised as e:
            raise UserError(f"{self.name} refused the conversation: {e.message}") from None
        except jinja2.exceptions.SecurityError as e:
            raise UserError(f"{self.name} tried an unsafe operation and was stopped by the sandbox: {e}") from None
        except Exception as e:  # noqa: BLE001 - the template is input, not our code: its failures are the user's
            raise UserError(f"{self.name} failed to render: {type(e).__name__}: {e}") from None


def normalize_conversation(record: Any) -> list[dict[str, str]]:
    """[{"role", "content"}] from {"messages": [{"role", "content"}]}, ShareGPT's
    {"conversations": [{"from", "value"}]}, or a bare list of either kind.

    Roles are system/user/assistant (ShareGPT's human/gpt map to user/assistant); an assistant turn is required."""
    turns = record
    if isinstance(record, dict):
        if "messages" in record and "conversations" in record:  # which one was meant is not ours to guess
            raise UserError('the record has both "messages" and "conversations"; keep one of the two keys')
        turns = record.get("messages", record.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise UserError('a conversation must be {"messages": [...]} or {"conversations": [...]} with at least one turn')
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"turn {i} of the conversation is not an object: {turn!r:.80}")
        sharegpt = "role" not in turn and "from" in turn
        role = SHAREGPT_ROLES.get(turn.get("from")) if sharegpt else turn.get("role")
        content = turn.get("value") if sharegpt else turn.get("content")
        if role not in ROLES:
            given = turn.get("from") if sharegpt else turn.get("role")
            raise UserError(f"turn {i} has role {given!r}; expected one of system, user, assistant "
                            "(ShareGPT: system, human, gpt)")
        if isinstance(content, list):
            raise UserError(f"turn {i} ({role}) has a list of content parts; lit-lora trains on text: give the "
                            "content as one string")
        if not isinstance(content, str):
            raise UserError(f"turn {i} ({role}) has no text content")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("the conversation has no assistant turn, so there is nothing to train on")
    return messages


def instruction_turns(instruction: str, input: str = "") -> dict[str, str]:
    """The user turn an instruction record becomes: the instruction, then its input after a blank line."""
    return {"role": "user", "content": f"{instruction}\n\n{input}" if input and input.strip() else instruction}


class EncodedChat(NamedTuple):
    ids: list[int]
    targets: list[bool]  # per token: counts in the loss
    # Per assistant turn, the special token that closes it; None where the template writes none (the caller should
    # warn: the model will not learn to stop). Empty with train_on="all", which does not locate the turns.
    end_markers: tuple[str | None, ...]
    # Tokens before the last assistant turn's first target token: the prompt evaluate gives the model (0 with "all").
    prompt_length: int = 0


def _special_texts(tokenizer: Any) -> list[str]:
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


def require_huggingface(tokenizer: Any) -> None:
    if tokenizer.backend != "huggingface":
        # SentencePiece alone neither matches special-token strings in text (as transformers does first) nor
        # reports offsets, so rendering through it would not be token-for-token the model's own format.
        raise UserError(f"chat templates need a tokenizer.json next to {tokenizer.path}; create it with "
                        "transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")


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
            _, spans, _ = assistant_spans(template, messages, _special_texts(tokenizer))
        except UserError:
            spans = []
        ids, offsets = _offsets(tokenizer, text)
        return EncodedChat(ids, [True] * len(ids), (), _first_token_at(offsets, spans[-1][0]) if spans else 0)
    text, spans, markers = assistant_spans(template, messages, _special_texts(tokenizer))
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
