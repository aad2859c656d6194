"""Real generator backends over diffusers: FLUX.2 [klein], Qwen-Image-Edit-Plus, FLUX.1 Kontext.

Each adapter drives a diffusers pipeline's own components (transformer, VAE, text
encoders, image processors) behind the `refrl.models.policy.Policy` protocol. Importing
this package is cheap; diffusers/transformers load when a backend is built.
"""

from refrl.models.diffusers.options import DIFFUSERS_KINDS, DiffusersOptions

__all__ = ["DIFFUSERS_KINDS", "DiffusersOptions", "build_diffusers_policy", "load_diffusers_policy"]


def build_diffusers_policy(cfg):
    """A diffusers adapter from a `ModelConfig` whose kind is one of `DIFFUSERS_KINDS`."""
    from refrl.models.diffusers.persistence import build_diffusers_policy as build

    return build(cfg)


def load_diffusers_policy(folder):
    """A saved diffusers adapter (``config.json`` with a diffusers kind + LoRA weights)."""
    from refrl.models.diffusers.persistence import load_diffusers_policy as load

    return load(folder)
