"""lit-lora: LoRA fine-tuning of LLaMA-family models, in plain PyTorch under Lightning Fabric."""

__version__ = "0.1.0"
