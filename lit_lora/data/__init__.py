"""Training data: readers (Alpaca, Dolly, any JSON, conversations), preparation, the tokenised on-disk format,
batching, and the built-in task. Prompt formats live in `lit_lora.prompts`."""
