"""Memory-light fine-tuning of a frozen pre-trained backbone: READ side network, LoRA, adapters, BitFit, head."""
