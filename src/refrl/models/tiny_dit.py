"""TinyDiT: the embedded reference-conditioned rectified-flow transformer.

Two streams share every layer's attention, as in MMDiT (SD3/Flux) with in-context
references (Flux Kontext, FLUX.2 [klein]):

* the **condition stream** holds a register token, the prompt's word tokens and
  the patch tokens of every reference (each with a reference-type embedding and an
  index embedding: "image 1" is index 0). It is plain pre-LayerNorm, has no
  timestep modulation and attends only to itself, so it depends neither on the
  noisy image nor on sigma;
* the **image stream** holds the noisy image patches, is modulated by sigma
  (adaLN-Zero, DiT) and its queries attend to [condition K/V ; image K/V].

Hence the condition's per-layer keys/values can be computed once per sample and
reused at every denoising step (the reference KV cache of diffusers'
Flux2KleinKVPipeline). ``use_ref_cache=False`` recomputes them in every
``velocity`` call instead: same maths, for benchmarks and tests.

The last layer's condition tokens are only ever read as keys/values, so that
layer of the condition stream is a bare LayerNorm + K/V projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from refrl.models.tiny_dit_config import SIGMA_FREQ_DIM, TinyDiTConfig

# Sinusoidal sigma features: sigma is scaled to SD3-style timesteps (0..1000).
SIGMA_SCALE = 1000.0
SIGMA_MAX_PERIOD = 10_000.0
# 2D sin/cos positions are in units of image patches (at most image_size/patch = 8),
# so a short maximum period keeps most frequencies informative.
POS_MAX_PERIOD = 100.0
# Word, type, index and register embeddings start at the scale of the sin/cos
# position features (rms 0.71), so the first LayerNorm sees them from step 0.
EMBED_INIT_STD = 0.5


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = SIGMA_MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal features [cos(t w_k), sin(t w_k)], w_k = max_period^(-k/(dim/2)) (DDPM / DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(ys: torch.Tensor, xs: torch.Tensor, dim: int, max_period: float = POS_MAX_PERIOD) -> torch.Tensor:
    """2D sin/cos position features (MAE / DiT): half the channels encode y, half x."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(max_period) * torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for pos in (ys, xs):
        args = pos.float()[:, None] * freqs[None]
        parts += [torch.sin(args), torch.cos(args)]
    return torch.cat(parts, dim=-1)


def grid_positions(size: int, patch: int, frame_size: int, frame_patch: int, dim: int) -> torch.Tensor:
    """Position features (tokens, dim) of a size×size image cut into patch×patch tokens.

    Coordinates are patch centres in units of the *output image's* patches, so a
    reference token and the image tokens covering the same relative spot share
    nearby positions (references are aligned to the output frame, as layout maps are).
    """
    g = size // patch
    centres = (torch.arange(g, dtype=torch.float32) + 0.5) * patch / size * (frame_size / frame_patch)
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return sincos_2d(ys.reshape(-1), xs.reshape(-1), dim)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p), tokens in row-major order."""
    b, c, hgt, wid = images.shape
    x = images.reshape(b, c, hgt // patch, patch, wid // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (hgt // patch) * (wid // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`."""
    b = tokens.shape[0]
    x = tokens.reshape(b, height // patch, width // patch, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, height, width)


def _split_heads(t: torch.Tensor, parts: int, heads: int) -> list[torch.Tensor]:
    """(B, L, parts*W) -> parts tensors (B, heads, L, W/heads)."""
    b, length, _ = t.shape
    t = t.reshape(b, length, parts, heads, -1).permute(2, 0, 3, 1, 4)
    return list(t.unbind(0))


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, heads, length, hd = t.shape
    return t.transpose(1, 2).reshape(b, length, heads * hd)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # exact (erf) GELU: on CPU it is about twice as fast as the tanh approximation
        return self.fc2(F.gelu(self.fc1(x)))


class ConditionBlock(nn.Module):
    """Pre-LN self-attention block of the condition stream; also returns its K/V."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, hidden)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = _split_heads(self.qkv(self.norm1(x)), 3, self.heads)
        x = x + self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)))
        x = x + self.mlp(self.norm2(x))
        return x, k, v


class ConditionKV(nn.Module):
    """Last condition layer: its tokens are only read as keys/values."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.kv = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = _split_heads(self.kv(self.norm1(x)), 2, self.heads)
        return k, v


class ImageBlock(nn.Module):
    """adaLN-Zero DiT block whose queries attend to [condition K/V ; image K/V]."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = MLP(width, hidden)
        self.ada = nn.Linear(width, 6 * width)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, cond_k: torch.Tensor, cond_v: torch.Tensor, attn_mask: torch.Tensor
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        q, k, v = _split_heads(self.qkv(torch.addcmul(shift1, self.norm(x), 1 + scale1)), 3, self.heads)
        k, v = torch.cat([cond_k, k], dim=2), torch.cat([cond_v, v], dim=2)
        x = x + gate1 * self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)))
        return x + gate2 * self.mlp(torch.addcmul(shift2, self.norm(x), 1 + scale2))


@dataclass
class ConditionInputs:
    """Raw condition of a batch: words and references, padded and masked.

    ``ref_pixels`` (B, R, 3, ref_size, ref_size) in [-1, 1]; ``ref_types`` (B, R)
    indices into REFERENCE_TYPES; ``ref_mask`` (B, R) marks real references (a
    sample's references come first, in prompt order).
    """

    text_ids: torch.Tensor
    text_mask: torch.Tensor
    ref_pixels: torch.Tensor
    ref_types: torch.Tensor
    ref_mask: torch.Tensor

    def select(self, index: torch.Tensor) -> ConditionInputs:
        return ConditionInputs(*(getattr(self, f.name).index_select(0, index) for f in fields(self)))


@dataclass
class TinyDiTCondition:
    """What `TinyDiT.velocity` needs: the raw inputs, and with the cache on, the
    per-layer condition keys/values (each (B, heads, Lc, head_dim)) and their mask (B, Lc).

    Cached K/V keep the autograd graph of the pass that made them: encode under
    ``torch.no_grad()`` for rollouts, with grad for training.
    """

    inputs: ConditionInputs
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.inputs.text_ids.shape[0]

    def select(self, index: torch.Tensor) -> TinyDiTCondition:
        """The condition of samples ``index`` (a subset, reorder or repetition)."""
        index = index.to(self.inputs.text_ids.device)
        kv = None if self.kv is None else [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.kv]
        mask = None if self.mask is None else self.mask.index_select(0, index)
        return TinyDiTCondition(self.inputs.select(index), kv, mask)


class TinyDiT(nn.Module):
    """The network; `refrl.models.tiny_dit_policy.TinyDiTPolicy` wraps it as a Policy."""

    def __init__(self, config: TinyDiTConfig):
        super().__init__()
        if config.vocab_size is None or config.vocab_size < 2:
            raise ValueError(f"TinyDiTConfig.vocab_size must be set from the tokenizer (>= 2), got {config.vocab_size}")
        self.config = config
        self.use_ref_cache = config.use_ref_cache
        w, heads, hidden = config.width, config.heads, config.hidden
        self.register_token = nn.Parameter(torch.empty(1, 1, w))
        self.text_embed = nn.Embedding(config.vocab_size, w)
        self.text_pos = nn.Parameter(torch.empty(config.max_text_len, w))
        self.ref_embed = nn.Linear(config.ref_patch_dim, w)
        self.type_embed = nn.Embedding(config.n_ref_types, w)
        self.index_embed = nn.Embedding(max(config.max_refs, 1), w)
        self.image_embed = nn.Linear(config.patch_dim, w)
        self.sigma_mlp = nn.Sequential(nn.Linear(SIGMA_FREQ_DIM, w), nn.SiLU(), nn.Linear(w, w))
        self.cond_blocks = nn.ModuleList([ConditionBlock(w, heads, hidden) for _ in range(config.depth - 1)])
        self.cond_last = ConditionKV(w, heads)
        self.blocks = nn.ModuleList([ImageBlock(w, heads, hidden) for _ in range(config.depth)])
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False)
        self.final_ada = nn.Linear(w, 2 * w)
        self.head = nn.Linear(w, config.patch_dim)
        if config.index_word_ids is not None:
            self.register_buffer("index_word_ids", torch.tensor(config.index_word_ids, dtype=torch.long), persistent=False)
        else:
            self.index_word_ids = None
        frame = (config.image_size, config.patch)
        self.register_buffer("image_pos", grid_positions(*frame, *frame, w), persistent=False)
        self.register_buffer("ref_pos", grid_positions(config.ref_size, config.ref_patch, *frame, w), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT init: Xavier linears, zero biases; adaLN and the output head at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.register_token, self.text_embed.weight, self.type_embed.weight, self.index_embed.weight):
            nn.init.normal_(p, std=EMBED_INIT_STD)
        nn.init.normal_(self.text_pos, std=EMBED_INIT_STD)
        for m in [b.ada for b in self.blocks] + [self.final_ada, self.head]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # -- condition stream -------------------------------------------------------------

    def embed_condition(self, inputs: ConditionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition tokens (B, Lc, W) = [register ; words ; reference patches] and their mask (B, Lc)."""
        cfg = self.config
        b, n_text = inputs.text_ids.shape
        n_refs = inputs.ref_pixels.shape[1]
        if n_text > cfg.max_text_len or n_refs > cfg.max_refs:
            raise ValueError(f"{n_text} words / {n_refs} references exceed max_text_len={cfg.max_text_len} / max_refs={cfg.max_refs}")
        words = self.text_embed(inputs.text_ids) + self.text_pos[:n_text]
        t = cfg.tokens_per_ref
        patches = patchify(inputs.ref_pixels.flatten(0, 1), cfg.ref_patch).reshape(b, n_refs, t, cfg.ref_patch_dim)
        ref_id = self.type_embed(inputs.ref_types) + self.index_embed.weight[:n_refs]  # (B, R, W)
        if self.index_word_ids is not None:
            ids = self.index_word_ids[:n_refs]
            known = (ids >= 0).to(ref_id.dtype)[:, None]  # -1: the vocabulary has no word for this index
            ref_id = ref_id + self.text_embed(ids.clamp_min(0)) * known
        refs = (self.ref_embed(patches) + self.ref_pos + ref_id[:, :, None]).reshape(b, n_refs * t, cfg.width)
        tokens = torch.cat([self.register_token.expand(b, -1, -1), words, refs], dim=1)
        ones = torch.ones(b, 1, dtype=torch.bool, device=tokens.device)
        mask = torch.cat([ones, inputs.text_mask, inputs.ref_mask.repeat_interleave(t, dim=1)], dim=1)
        return tokens, mask

    def condition_kv(self, inputs: ConditionInputs) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Per-layer condition keys/values and the condition mask (the work the cache saves)."""
        h, mask = self.embed_condition(inputs)
        attn_mask = mask[:, None, None, :]
        kv = []
        for block in self.cond_blocks:
            h, k, v = block(h, attn_mask)
            kv.append((k, v))
        kv.append(self.cond_last(h))
        return kv, mask

    def encode_condition(self, inputs: ConditionInputs) -> TinyDiTCondition:
        if not self.use_ref_cache:
            return TinyDiTCondition(inputs)
        kv, mask = self.condition_kv(inputs)
        return TinyDiTCondition(inputs, kv, mask)

    # -- image stream -----------------------------------------------------------------

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: TinyDiTCondition) -> torch.Tensor:
        """Velocity v = noise - x0 at noisy images ``x`` (B, 3, H, W) in [-1, 1] scale and ``sigma`` (B,)."""
        cfg = self.config
        b, c, height, width = x.shape
        if c != 3 or height != width or height % cfg.patch:
            raise ValueError(f"x must be (B, 3, H, H) with H a multiple of patch={cfg.patch}, got {tuple(x.shape)}")
        if sigma.shape != (b,) or cond.batch_size != b:
            raise ValueError(f"batch mismatch: x {tuple(x.shape)}, sigma {tuple(sigma.shape)}, condition batch {cond.batch_size}")
        if self.use_ref_cache and cond.kv is not None:
            kv, cond_mask = cond.kv, cond.mask
        else:
            kv, cond_mask = self.condition_kv(cond.inputs)
        pos = self.image_pos
        if height != cfg.image_size:  # other sizes: positions on the same frame, finer or coarser grid
            pos = grid_positions(height, cfg.patch, cfg.image_size, cfg.patch, cfg.width).to(x.device)
        h = self.image_embed(patchify(x, cfg.patch)) + pos
        c = F.silu(self.sigma_mlp(timestep_embedding(sigma * SIGMA_SCALE, SIGMA_FREQ_DIM)))
        ones = torch.ones(b, h.shape[1], dtype=torch.bool, device=x.device)
        attn_mask = torch.cat([cond_mask, ones], dim=1)[:, None, None, :]
        for block, (k, v) in zip(self.blocks, kv, strict=True):
            h = block(h, c, k, v, attn_mask)
        shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)
        out = unpatchify(self.head(torch.addcmul(shift, self.final_norm(h), 1 + scale)), cfg.patch, height, width)
        if cfg.prediction == "x0":
            return (x - out) / sigma.clamp_min(cfg.x0_sigma_floor).view(b, 1, 1, 1)
        return out

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: TinyDiTCondition) -> torch.Tensor:
        return self.velocity(x, sigma, cond)
