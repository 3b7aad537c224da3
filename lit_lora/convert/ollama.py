"""An Ollama Modelfile for an exported GGUF: FROM (and ADAPTER), TEMPLATE, stop parameters, SYSTEM.

Ollama's TEMPLATE is a Go template, not Jinja, so a chat template is translated only where its family is known: a
ChatML template (<|im_start|>role ... <|im_end|>) or a Llama 3 one (<|start_header_id|>role<|end_header_id|> ...
<|eot_id|>). For any other, TEMPLATE is left out and Ollama falls back on the GGUF's own Jinja template
(tokenizer.chat_template), which recent Ollama versions read. Every end-of-turn marker becomes a stop parameter,
so an answer ends where the adapter learnt to end it.
"""
from __future__ import annotations

from pathlib import Path

# The Go forms of the two families, for messages of any role; Ollama puts SYSTEM in as the first message.
CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
          '<|im_start|>assistant\n')
LLAMA3 = ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
          '{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n')
FAMILIES = {"<|im_start|>": CHATML, "<|start_header_id|>": LLAMA3}


def go_template(chat_template: str | None) -> str | None:
    """The Go TEMPLATE of a ChatML or Llama 3 style chat template; None for any other (Ollama then uses the GGUF's)."""
    return next((go for marker, go in FAMILIES.items() if chat_template and marker in chat_template), None)


def _quoted(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(base: Path | str, adapter: Path | str | None, chat_template: str | None, stops: tuple[str, ...],
              system: str | None) -> str:
    lines = [f"FROM {base}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    template = go_template(chat_template)
    if template is not None:
        lines.append(f"TEMPLATE {_quoted(template)}")
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    return "\n".join(lines) + "\n"
