"""Prompt templates: how an (instruction, input) pair becomes the text the model continues.

Training and generation use the same `Template`, so the model is asked in the format it was tuned in.
The response is tokenised on its own and appended after the prompt, followed by EOS.
"""
from __future__ import annotations

from dataclasses import dataclass

from lit_lora.errors import UserError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


@dataclass(frozen=True)
class Template:
    name: str
    with_input: str
    no_input: str
    stop_strings: tuple[str, ...] = ()  # generation also stops at these (besides EOS)

    def prompt(self, instruction: str, input: str = "") -> str:
        if input and input.strip():
            return self.with_input.format(instruction=instruction, input=input)
        return self.no_input.format(instruction=instruction)


TEMPLATES = {
    # Exactly the Stanford Alpaca release's prompts.
    "alpaca": Template("alpaca", ALPACA_WITH_INPUT, ALPACA_NO_INPUT, stop_strings=("### Instruction:",)),
    # ChatML, as SmolLM2-Instruct (and Qwen) were tuned: the input joins the user turn after a blank line.
    "chatml": Template(
        "chatml",
        "<|im_start|>user\n{instruction}\n\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
        stop_strings=("<|im_end|>",),
    ),
    # No wrapping beyond a newline: for base models and continuation tasks.
    "plain": Template("plain", "{instruction}\n\n{input}\n", "{instruction}\n"),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
