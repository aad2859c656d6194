"""refrl: SFT + GRPO for reference-guided image generation (DyRef, Customized-GRPO, OmniRefiner)."""

__version__ = "0.1.0"
