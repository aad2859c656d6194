"""The tiny DiT's architecture: one pydantic model, the single source of its fields and defaults.

`TinyDiTArch` holds what a user chooses (sizes, depth, prediction target); the
``model:`` section of a config with ``kind: tiny-dit`` inherits it, so every field
and default is declared here once. `TinyDiTConfig` adds what the tokenizer and the
data schema decide (vocabulary size, number of reference types, index word ids)
and is what `TinyDiT` is built from and ``save_pretrained`` writes as ``config.json``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from refrl.config import StrictModel
from refrl.data.schema import REFERENCE_TYPES
from refrl.limits import MAX_DEPTH, MAX_IMAGE_SIZE, MAX_TOKENS, MAX_WIDTH

# Sinusoidal sigma features of the network (also needed to count its parameters).
SIGMA_FREQ_DIM = 256


class TinyDiTArch(StrictModel):
    """The architecture choices of the tiny DiT (the ``model:`` keys of kind ``tiny-dit``)."""

    image_size: int = Field(32, ge=1, le=MAX_IMAGE_SIZE, description="generated image size (square)")
    patch: int = Field(4, ge=1, le=MAX_IMAGE_SIZE, description="image patch size")
    ref_size: int = Field(32, ge=1, le=MAX_IMAGE_SIZE, description="references are resized to this square size")
    ref_patch: int = Field(8, ge=1, le=MAX_IMAGE_SIZE, description="reference patch size")
    width: int = Field(256, ge=1, le=MAX_WIDTH, description="token width")
    depth: int = Field(6, ge=1, le=MAX_DEPTH, description="transformer blocks")
    heads: int = Field(4, ge=1, le=MAX_DEPTH, description="attention heads")
    mlp_ratio: int = Field(4, ge=1, le=MAX_DEPTH, description="MLP hidden width / width")
    max_refs: int = Field(8, ge=0, le=MAX_TOKENS, description="reference slots (index embeddings)")
    max_text_len: int = Field(48, ge=0, le=MAX_TOKENS, description="prompt tokens kept")
    use_ref_cache: bool = Field(True, description="compute the condition's keys/values once per sample")
    # "x0": the head predicts the clean image and v = (x - x0_hat) / max(sigma, floor).
    # Pixel-space denoisers learn x-prediction much faster than v-prediction (Li & He
    # 2025, "Back to Basics: Let Denoising Generative Models Denoise", JiT): the clean
    # image is low-dimensional, the noise is not. "v": the head predicts v directly.
    prediction: Literal["v", "x0"] = Field("x0", description="what the network's head predicts (x0: JiT-style)")
    x0_sigma_floor: float = Field(0.05, gt=0, le=1, description="x0 prediction: v = (x - x0_hat) / max(sigma, floor)")

    @model_validator(mode="after")
    def _check_shapes(self) -> TinyDiTArch:
        if self.image_size % self.patch or self.ref_size % self.ref_patch:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch ({self.patch}) and "
                f"ref_size ({self.ref_size}) of ref_patch ({self.ref_patch})"
            )
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width ({self.width}) must split into heads ({self.heads}) of even size")
        if self.width % 4:
            raise ValueError(f"width ({self.width}) must be a multiple of 4 (2D sin/cos positions)")
        return self


class TinyDiTConfig(TinyDiTArch):
    """Architecture of `TinyDiT`. ``vocab_size`` comes from the tokenizer."""

    vocab_size: int | None = None
    n_ref_types: int = Field(len(REFERENCE_TYPES), ge=1)
    # Word ids of "1", "2", ... (-1 where the vocabulary has none): reference i also carries the embedding of the word that
    # names it in prompts ("image 3"), so text and references share a key from step 0
    # instead of the model having to learn which index embedding "3" means.
    index_word_ids: list[int] | None = None

    @model_validator(mode="after")
    def _check_index_words(self) -> TinyDiTConfig:
        if self.index_word_ids is not None and len(self.index_word_ids) < self.max_refs:
            raise ValueError(f"index_word_ids needs one word id per reference ({self.max_refs}), got {len(self.index_word_ids)}")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> TinyDiTConfig:
        """A saved ``config.json``; unknown keys are an error (pydantic's ``ValidationError``, a ``ValueError``)."""
        return cls.model_validate(data)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def tokens_per_ref(self) -> int:
        return (self.ref_size // self.ref_patch) ** 2

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch**2

    @property
    def ref_patch_dim(self) -> int:
        return 3 * self.ref_patch**2

    @property
    def hidden(self) -> int:
        return self.width * self.mlp_ratio

    def condition_tokens(self, n_refs: int, n_text: int) -> int:
        """Condition stream length: register + words + reference patches."""
        return 1 + n_text + n_refs * self.tokens_per_ref

    def param_count(self) -> int:
        """Number of parameters of `TinyDiT` with this config (analytic)."""
        if self.vocab_size is None:
            raise ValueError("TinyDiTConfig.vocab_size is not set (take it from the tokenizer)")
        w, h, d = self.width, self.hidden, self.depth
        linear = lambda i, o: i * o + o  # noqa: E731
        mlp = linear(w, h) + linear(h, w)
        attn = linear(w, 3 * w) + linear(w, w)
        embeds = (self.vocab_size + self.max_text_len + 1 + self.n_ref_types + self.max_refs) * w
        embeds += linear(self.ref_patch_dim, w) + linear(self.patch_dim, w)
        sigma_mlp = linear(SIGMA_FREQ_DIM, w) + linear(w, w)
        cond_blocks = (d - 1) * (2 * w + attn + 2 * w + mlp) + (2 * w + linear(w, 2 * w))
        image_blocks = d * (attn + mlp + linear(w, 6 * w))
        final = linear(w, 2 * w) + linear(w, self.patch_dim)
        return embeds + sigma_mlp + cond_blocks + image_blocks + final

    def flops_per_sample(self, n_refs: int, n_text: int, include_condition: bool = True) -> int:
        """Forward matmul FLOPs (2 per multiply-add) of one sample's velocity.

        ``include_condition=False`` counts a cached step: the image stream only (its
        attention over the cached condition keys included). Elementwise ops, norms
        and softmax are not counted.
        """
        w, h, d = self.width, self.hidden, self.depth
        n, lc = self.image_tokens, self.condition_tokens(n_refs, n_text)
        block = lambda t, keys: 2 * t * w * (4 * w + 2 * h) + 4 * t * keys * w  # noqa: E731
        flops = 2 * n * self.patch_dim * w * 2  # patch embedding + output head
        flops += 2 * (SIGMA_FREQ_DIM * w + w * w) + 2 * w * (6 * d + 2) * w  # sigma MLP + adaLN
        flops += d * block(n, lc + n)
        if include_condition:
            flops += 2 * n_refs * self.tokens_per_ref * self.ref_patch_dim * w
            flops += (d - 1) * block(lc, lc) + 2 * lc * w * 2 * w
        return flops
