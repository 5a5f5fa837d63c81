"""Training D²-LoRA adapters (and PEFT LoRA / DoRA baselines) on a frozen base."""
