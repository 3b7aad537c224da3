"""The format a model is asked in, and what an adapter records of the format it was trained in.

Prepared data records its format (`PROMPT_KEYS`); finetune-lora copies that into every adapter, merge-lora into the
merged checkpoint. `prompt_format` turns such a record, or a `--template` name, into a `PromptFormat`, through which
generate, chat, evaluate and the training loop's sample render their prompts and know where an answer ends.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from lit_lora.errors import UserError
from lit_lora.prompts.builtin import BUILTINS, Builtin
from lit_lora.prompts.chat_template import ChatTemplate
from lit_lora.prompts.masking import end_markers

# An instruction template's name, or for conversations the chat template ({"name", "source"}) and the system prompt
# given to all of them.
PROMPT_KEYS = ("template", "chat_template", "system")


def recorded_prompt(meta: dict[str, Any]) -> dict[str, Any]:
    """The PROMPT_KEYS of an adapter config, prepared data's meta.json or a checkpoint.json (None when absent)."""
    return {key: meta.get(key) for key in PROMPT_KEYS}


def instruction_turn(instruction: str, input: str = "") -> dict[str, str]:
    """The user turn an instruction record becomes: the instruction, then its input after a blank line."""
    return {"role": "user", "content": f"{instruction}\n\n{input}" if input and input.strip() else instruction}


class PromptFormat(NamedTuple):
    """How a question, or a conversation, becomes the prompt ids the model continues, and where its answer ends."""
    template: Builtin | ChatTemplate  # a built-in is asked in its single-turn form
    stop_strings: tuple[str, ...]
    system: str | None = None  # the system prompt the data was prepared with (prepare-chat --system): the default

    @property
    def name(self) -> str:
        return self.template.name

    def conversation_ids(self, tokenizer: Any, turns: list[dict[str, str]], system: str | None = None) -> list[int]:
        """The conversation so far (user and assistant turns, a user turn last), ready for the next answer.
        `system`: None takes the recorded default, "" none. A chat template writes BOS itself, as in training."""
        system = self.system if system is None else system
        messages = ([{"role": "system", "content": system}] if system else []) + list(turns)
        if isinstance(self.template, ChatTemplate):
            return tokenizer.encode(self.template.render(messages, add_generation_prompt=True), bos=False)
        if [m["role"] for m in messages] != ["user"]:
            raise UserError(f"the {self.name} template takes one instruction, without a system prompt or earlier "
                            f"turns; use a chat template (--template auto, chatml, llama3)")
        return tokenizer.encode(self.template.single_turn.prompt(messages[0]["content"]))

    def question_ids(self, tokenizer: Any, text: str, input: str = "", system: str | None = None) -> list[int]:
        """One question; an instruction template keeps its own form for an input (Alpaca's "### Input:")."""
        if isinstance(self.template, Builtin) and not system:
            return tokenizer.encode(self.template.single_turn.prompt(text, input))
        return self.conversation_ids(tokenizer, [instruction_turn(text, input)], system)


def chat_format(template: ChatTemplate, tokenizer: Any, system: str | None = None) -> PromptFormat:
    return PromptFormat(template, end_markers(template, tokenizer), system)


def prompt_format(name: str, recorded: dict[str, Any], tokenizer: Any, multi_turn: bool = False) -> PromptFormat:
    """The format to ask in. `auto`: what the adapter (or prepared data) `recorded`: its chat template or its
    instruction template; without one, the checkpoint's own chat template, else plain. A built-in's name: its
    single-turn form (as prepare-alpaca writes it), else its chat form; a .jinja file: that chat template.
    `multi_turn` (chat) takes a built-in's chat form, which also stops where its single-turn form stops."""
    if name == "auto" and recorded.get("chat_template"):
        return chat_format(ChatTemplate.from_record(recorded["chat_template"], tokenizer), tokenizer,
                           recorded.get("system"))
    if name == "auto":
        own = ChatTemplate.source_of(tokenizer) and tokenizer.backend == "huggingface"
        name = recorded.get("template") or ("auto" if own else "plain")
    builtin = BUILTINS.get(name)
    if builtin and builtin.single_turn and not multi_turn:
        return PromptFormat(builtin, builtin.stop_strings)
    chosen = chat_format(ChatTemplate.load(name, tokenizer), tokenizer)
    if builtin:
        return chosen._replace(stop_strings=tuple(dict.fromkeys(chosen.stop_strings + builtin.stop_strings)))
    return chosen
