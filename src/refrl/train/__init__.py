"""Training: SFT and GRPO trainers, losses, checkpoints."""
