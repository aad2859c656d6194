"""The `Policy` protocol: everything the SFT and GRPO trainers need from a generator.

Like TRL's old DDPO pipeline interface, the trainers talk to a model only through
these methods, so one trainer serves the embedded tiny DiT and every diffusers
adapter. The sampling math (`refrl.sampling`) knows nothing of the network; the
network knows nothing of sampling.

Conventions
-----------
* Flow matching with ``x_sigma = (1 - sigma) * x0 + sigma * noise``; the model
  predicts the velocity ``v = noise - x0``. sigma = 1 is pure noise.
* ``sigma`` is a float tensor of shape (B,) with values in [0, 1].
* Latents are what the sampler integrates; ``decode`` maps them to images in
  [0, 1], ``encode_images`` maps images in [0, 1] to latents (identity up to
  scaling for pixel-space policies, a VAE for latent ones).
* A condition is opaque to the trainers. Policies may cache per-sample work in it
  (reference keys/values, text embeddings); it is computed once per sample and
  reused at every denoising step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from refrl.data.schema import LoadedSample


@runtime_checkable
class Policy(Protocol):
    """A reference-conditioned flow-matching generator."""

    def encode_condition(
        self,
        samples: Sequence[LoadedSample],
        drop_text: torch.Tensor | None = None,
        drop_refs: torch.Tensor | None = None,
    ) -> Any:
        """Encode prompt + references of each sample once.

        ``drop_text`` / ``drop_refs`` are bool tensors (B,) that replace the prompt by
        the empty prompt / remove the references for those samples (classifier-free
        guidance training and the unconditional branch at sampling time).
        """
        ...

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, condition: Any) -> torch.Tensor:
        """Predicted velocity at noisy latents ``x`` (B, *latent_shape) and noise level ``sigma`` (B,)."""
        ...

    def select_condition(self, condition: Any, index: torch.Tensor) -> Any:
        """The condition of a subset (or repetition) of the batch, in ``index`` order."""
        ...

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one latent (no batch dim) for an image of the given size."""
        ...

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1]."""
        ...

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        """Parameters the optimizer updates (all weights, or only LoRA weights)."""
        ...

    def adapter_disabled(self) -> AbstractContextManager[None]:
        """Context in which the policy acts as the frozen reference policy (LoRA off).

        Policies without an adapter raise ``NotImplementedError``; the trainer then
        keeps a frozen copy for the KL term instead.
        """
        ...

    @property
    def image_size(self) -> int:
        """The side, in pixels, of the square images the policy generates natively."""
        ...

    def save_pretrained(self, path: str | Path) -> None:
        """Write the policy to folder ``path`` so that `refrl.models.build.load_policy` reads it back."""
        ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...
