"""The built-in prompt formats, one entry each: for base models, and for data their own template does not fit.

An entry has up to two forms of the same format. The single-turn form turns one instruction (and an optional input)
into the prompt that prepare-alpaca/-dolly/-json train on and `generate` asks with; the response is tokenised on
its own after it, followed by EOS. The chat form is transformers-style Jinja, rendered by `ChatTemplate` exactly like
a checkpoint's own template, for prepare-chat and `chat`. The two differ by design in small ways (Alpaca's single
turn ends at "### Response:", its chat form starts each answer on a new line): an adapter is asked in the form it was
trained in, so each stays as released.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_lora.errors import UserError

ALPACA_PREAMBLE = "Below is an instruction that describes a task"
ALPACA_WITH_INPUT = (
    f"{ALPACA_PREAMBLE}, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    f"{ALPACA_PREAMBLE}. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


@dataclass(frozen=True)
class SingleTurn:
    with_input: str
    no_input: str

    def prompt(self, instruction: str, input: str = "") -> str:
        if input and input.strip():
            return self.with_input.format(instruction=instruction, input=input)
        return self.no_input.format(instruction=instruction)


@dataclass(frozen=True)
class Builtin:
    name: str
    chat_source: str  # the multi-turn form: transformers-style Jinja
    single_turn: SingleTurn | None = None  # None: a chat format only
    special_tokens: tuple[str, ...] = ()  # each must be one token, or the model would read the markers as plain text
    stop_strings: tuple[str, ...] = ()  # generation stops at these too (besides EOS and the template's end marker)

    def check_tokens(self, tokenizer: Any) -> None:
        missing = [t for t in self.special_tokens if tokenizer.token_to_id(t) is None]
        if missing:
            raise UserError(f"the {self.name} template needs the special tokens {', '.join(missing)}, which the "
                            f"tokenizer of {Path(tokenizer.path).parent} lacks; choose another --template")

    def fits(self, tokenizer: Any) -> bool:
        return all(tokenizer.token_to_id(t) is not None for t in self.special_tokens)


CHATML = ("<|im_start|>", "<|im_end|>")

BUILTINS = {b.name: b for b in (
    # ChatML, as SmolLM2-Instruct (and Qwen) were tuned: a single turn's input joins the user turn after a blank line.
    Builtin(
        "chatml",
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        SingleTurn("<|im_start|>user\n{instruction}\n\n{input}<|im_end|>\n<|im_start|>assistant\n",
                   "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"),
        special_tokens=CHATML, stop_strings=("<|im_end|>",)),
    Builtin(
        "llama3",
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
        "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    # Exactly the Stanford Alpaca release's prompts; its chat form has one "### Instruction / ### Response" block per
    # exchange, EOS closing each answer.
    Builtin(
        "alpaca",
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% set rest = messages[1:] %}"
        "{% else %}{{ '" + ALPACA_PREAMBLE + ". Write a response that appropriately completes "
        "the request.\n\n' }}{% set rest = messages %}{% endif %}"
        "{% for m in rest %}{% if m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}"
        "{% else %}{{ raise_exception('the alpaca template takes a system turn only first') }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}",
        SingleTurn(ALPACA_WITH_INPUT, ALPACA_NO_INPUT),
        stop_strings=("### Instruction:",)),
    # No markup: each turn on its own line, EOS after each answer. For base models and continuation tasks.
    Builtin(
        "plain",
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
        "{{ '\n' }}{% endfor %}",
        SingleTurn("{instruction}\n\n{input}\n", "{instruction}\n")),
)}
INSTRUCTION_TEMPLATES = tuple(name for name, b in BUILTINS.items() if b.single_turn)


def instruction_template(name: str) -> Builtin:
    """A built-in with a single-turn form, for instruction data."""
    if name not in INSTRUCTION_TEMPLATES:
        hint = f"; {name} is a chat format: use prepare-chat" if name in BUILTINS else ""
        raise UserError(f"unknown template {name!r}; choose one of {', '.join(INSTRUCTION_TEMPLATES)}{hint}")
    return BUILTINS[name]
