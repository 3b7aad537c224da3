"""Instruction data: prompt templates, readers (Alpaca, Dolly, any JSON), tokenised on-disk format, batching."""
