"""Model import (Hugging Face directories, GGUF files) and export (HF directory, PEFT adapter)."""
