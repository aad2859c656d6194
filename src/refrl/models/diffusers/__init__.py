"""Real generator backends over diffusers: FLUX.2 [klein], Qwen-Image-Edit-Plus, FLUX.1 Kontext.

Each adapter drives a diffusers pipeline's own components (transformer, VAE, text
encoders, image processors) behind the `refrl.models.policy.Policy` protocol. Importing
this package is cheap (torch, no diffusers); diffusers/transformers load when a backend
is built. A new backend is one file plus one `register_backend` line below (see
`refrl.models.diffusers.registry`).
"""

from refrl.models.diffusers.flux2_klein import Flux2KleinPolicy
from refrl.models.diffusers.kontext import KontextPolicy
from refrl.models.diffusers.options import DiffusersModelConfig, DiffusersOptions
from refrl.models.diffusers.qwen_edit_plus import QwenEditPlusPolicy
from refrl.models.diffusers.registry import BACKENDS, backend, register_backend

register_backend(Flux2KleinPolicy)
register_backend(QwenEditPlusPolicy)
register_backend(KontextPolicy)

DIFFUSERS_KINDS: tuple[str, ...] = tuple(BACKENDS)

__all__ = ["BACKENDS", "DIFFUSERS_KINDS", "DiffusersModelConfig", "DiffusersOptions", "backend",
           "build_diffusers_policy", "load_diffusers_policy", "register_backend"]


def build_diffusers_policy(cfg):
    """A diffusers adapter from a model config whose kind is one of `DIFFUSERS_KINDS`."""
    from refrl.models.diffusers.persistence import build_diffusers_policy as build

    return build(cfg)


def load_diffusers_policy(folder):
    """A saved diffusers adapter (``config.json`` with a diffusers kind + LoRA weights)."""
    from refrl.models.diffusers.persistence import load_diffusers_policy as load

    return load(folder)
