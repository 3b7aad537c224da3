"""Chat templates rendered exactly as Hugging Face renders them: the checkpoint's own, a built-in's, or a .jinja file.

Why: a chat model was trained on its template's exact text (markers, newlines, BOS), so fine-tuning data must be
rendered the same way, token for token, or the adapter learns a format the model never sees at inference. The
template (`chat_template` in tokenizer_config.json, or transformers 5's `chat_template.jinja`) comes from the
checkpoint and is untrusted code, so it runs in Jinja's immutable sandbox, configured as transformers configures
it (trim_blocks, lstrip_blocks, `raise_exception`, HF's `tojson`, `strftime_now`, the special tokens as variables).
As in `apply_chat_template`, the rendered text is tokenised with no special tokens added: the template writes BOS.
Which tokens of a rendering are trained on is `masking`'s concern.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lit_lora.errors import UserError
from lit_lora.prompts.builtin import BUILTINS
from lit_lora.tokenizer import token_content

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 saves the template apart; it wins over tokenizer_config's
# The named special tokens transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
MAX_RENDER_CHARS = 10_000_000



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
                            f"{' or '.join(BUILTINS)} (or a .jinja file)")
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
        """`auto`: the checkpoint's own template; a built-in's chat form (prompts.builtin); or a .jinja file's."""
        require_huggingface(tokenizer)
        if name == "auto":
            return cls.from_tokenizer(tokenizer)
        if name in BUILTINS:
            BUILTINS[name].check_tokens(tokenizer)
            return cls(BUILTINS[name].chat_source, special_tokens(tokenizer), name=f"the {name} template")
        if name.endswith(".jinja"):
            try:
                source = Path(name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read the template {name}: {e}") from None
            return cls(source, special_tokens(tokenizer), name=f"the template {name}")
        raise UserError(f"unknown chat template {name!r}; use auto (the checkpoint's own), "
                        f"{', '.join(BUILTINS)}, or a .jinja file")

    def record(self) -> dict[str, str]:
        """What prepared data and adapters keep, so generation renders with exactly this template."""
        return {"name": self.name, "source": self.source}

    @classmethod
    def from_record(cls, record: dict[str, str], tokenizer: Any) -> ChatTemplate:
        return cls(record["source"], special_tokens(tokenizer), name=record.get("name", "the recorded chat template"))

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


def require_huggingface(tokenizer: Any) -> None:
    if tokenizer.backend != "huggingface":
        # SentencePiece alone neither matches special-token strings in text (as transformers does first) nor
        # reports offsets, so rendering through it would not be token-for-token the model's own format.
        raise UserError(f"chat templates need a tokenizer.json next to {tokenizer.path}; create it with "
                        "transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
