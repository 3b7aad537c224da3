"""Other tools' formats: Hugging Face names and directories (hf), GGUF files (gguf), PEFT adapters (peft).
The commands that write them (export-hf, export-peft) are `lit_lora.export`."""
