"""FLUX.2 [klein] behind the `Policy` protocol (`Flux2KleinPipeline` components).

Latents are the pipeline's: VAE latents patchified 2x2 (4x the VAE channels) and
normalised by the VAE's batch-norm statistics; each latent cell is one token, with
4-D position ids (T, H, W, L). References are VAE-encoded the same way and get time
coordinates T = 10, 20, ... (the pipeline's ``_prepare_image_ids``); text is the
stack of Qwen3 hidden layers (``text_encoder_out_layers``), padded to
``max_text_tokens`` as the pipeline pads it.

Two reference attentions (``model.diffusers.ref_attention``):

* ``full`` -- `Flux2KleinPipeline`: tokens [noisy, references] attend to each other;
  references are modulated with the current timestep. For the klein base/distilled
  checkpoints.
* ``causal`` -- `Flux2KleinKVPipeline`: reference tokens attend only to reference
  tokens and are modulated with a fixed timestep (``ref_timestep``), so their
  keys/values do not change across denoising steps. With ``model.use_ref_cache`` they
  are computed once in ``encode_condition`` (``kv_cache_mode="extract"``) and injected
  at every step (``kv_cache_mode="cached"``); without it they are recomputed at every
  step, which gives the same velocity. For the klein-kv checkpoints.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from refrl.errors import RefrlError
from refrl.models.diffusers.common import DiffusersCondition, DiffusersPolicy, is_sharded
from refrl.models.diffusers.options import DiffusersModelConfig, DiffusersOptions
from refrl.models.diffusers.text_cache import text_key

DEFAULT_MAX_TEXT_TOKENS = 512  # Flux2KleinPipeline.__call__(max_sequence_length=512)


class Flux2KleinOptions(DiffusersOptions):
    """``model.diffusers`` of kind ``flux2-klein``."""

    text_encoder_out_layers: list[int] = Field([9, 18, 27], description="Qwen3 hidden layers stacked into the text embedding")
    ref_attention: Literal["full", "causal"] = Field(
        "full",
        description="full = Flux2KleinPipeline (reference tokens attend to all tokens); causal = "
        "Flux2KleinKVPipeline (references attend only to references, so their keys/values can be cached: "
        "model.use_ref_cache)",
    )
    ref_timestep: float = Field(0.0, ge=0, le=1, description="causal: fixed timestep of reference tokens")


class Flux2KleinConfig(DiffusersModelConfig):
    """``model:`` of kind ``flux2-klein`` (FLUX.2 [klein], DyRef)."""

    kind: Literal["flux2-klein"] = "flux2-klein"
    diffusers: Flux2KleinOptions = Flux2KleinOptions()


class Flux2KleinPolicy(DiffusersPolicy):
    config_class = Flux2KleinConfig
    pipeline_class_name = "Flux2KleinPipeline"
    text_components = ("text_encoder", "tokenizer")
    transformer_class_name = "Flux2Transformer2DModel"
    # Double-stream attention projections (both streams) and the fused single-stream
    # projections (qkv+mlp in, attention+mlp out).
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out", "to_qkv_mlp_proj", "to_out")

    def __init__(self, pipe: Any, cfg: Any):
        super().__init__(pipe, cfg)
        if self.opts.ref_attention == "causal":
            from diffusers.models.transformers.transformer_flux2 import (
                Flux2KVAttnProcessor,
                Flux2KVParallelSelfAttnProcessor,
            )

            # As Flux2KleinKVPipeline._set_kv_attn_processors; without KV arguments they act as the defaults.
            for block in self.transformer.transformer_blocks:
                block.attn.set_processor(Flux2KVAttnProcessor())
            for block in self.transformer.single_transformer_blocks:
                block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())

    @property
    def vae_factor(self) -> int:
        return self.pipe.vae_scale_factor * 2  # pixels per patchified latent cell

    @property
    def latent_multiple(self) -> int:
        return self.vae_factor

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def max_text_tokens(self) -> int:
        return self.opts.max_text_tokens or DEFAULT_MAX_TEXT_TOKENS

    @property
    def caches_references(self) -> bool:
        # Not under FSDP2 sharding: extraction runs once per reference count of a process's batch, and every
        # process must run the transformer equally often (the causal pass without the cache is the same attention)
        return self.opts.ref_attention == "causal" and self.cfg.use_ref_cache and not is_sharded(self.transformer)

    def _token_grid(self, h: int, w: int) -> tuple[int, int]:
        return h, w

    def _default_cfg_scale(self) -> float:
        """4 for klein base (the pipeline's ``guidance_scale``); 1 for a distilled checkpoint
        (``is_distilled`` in its ``model_index.json``), for which the pipeline ignores guidance."""
        if self.pipe.config.get("is_distilled", False):
            return 1.0
        return super()._default_cfg_scale()

    def _shift_mu(self, image_seq_len: int, steps: int) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=steps)

    def _vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.pipe._encode_vae_image(images, generator=None)  # patchified, batch-norm normalised

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(latents.device, latents.dtype)
        latents = self.pipe._unpatchify_latents(latents * std + mean)
        return self.vae.decode(latents, return_dict=False)[0]

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe._pack_latents(latents)

    def _unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return tokens.permute(0, 2, 1).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def _text_key(self, prompt: str, refs: list[torch.Tensor]) -> str:
        layers = ",".join(str(i) for i in self.opts.text_encoder_out_layers)
        return text_key(self.kind, str(self.max_text_tokens), layers, prompt)

    def _encode_text(self, prompts: list[str], refs: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        embeds = self.pipe._get_qwen3_prompt_embeds(
            self.pipe.text_encoder, self.pipe.tokenizer, prompts, dtype=self.dtype, device=self.device_,
            max_sequence_length=self.max_text_tokens, hidden_states_layers=tuple(self.opts.text_encoder_out_layers),
        )
        return [{"embeds": embeds[i]} for i in range(len(prompts))]

    # -- position ids --------------------------------------------------------------------
    def latent_ids(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, h*w, 4) ids of the noisy tokens: T=0."""
        return self.pipe._prepare_latent_ids(torch.empty(1, 1, *grid)).to(self.device_)

    def reference_ids(self, n_refs: int, grid: tuple[int, int]) -> torch.Tensor:
        """(1, n*T, 4) ids of n references: T = 10, 20, ... (the pipeline's scale 10)."""
        return self.pipe._prepare_image_ids([torch.empty(1, 1, *grid)] * n_refs).to(self.device_)

    def _guidance(self, b: int) -> torch.Tensor | None:
        if not self.transformer.config.guidance_embeds:
            return None
        if self.opts.guidance is None:
            raise RefrlError("this FLUX.2 transformer is guidance-distilled: set model.diffusers.guidance")
        return torch.full((b,), self.opts.guidance, device=self.device_, dtype=torch.float32)

    # -- reference key/value cache -------------------------------------------------------
    def _prepare_kv(self, cond: DiffusersCondition) -> None:
        """Extract the reference keys/values of every reference count once per condition.

        Reference tokens attend only to reference tokens, so their keys/values depend on
        nothing else: the extraction pass carries one zero text token and one zero image
        token instead of the real ones."""
        if not self.caches_references:
            return
        grid = cond.ref_grid
        for n in sorted(set(cond.n_refs.tolist()) - {0}):
            rows = (cond.n_refs == n).nonzero().flatten()
            b, tokens = rows.shape[0], n * grid[0] * grid[1]
            refs = cond.refs[rows.to(self.device_), :tokens]
            hidden = torch.cat([refs, refs.new_zeros(b, 1, refs.shape[-1])], dim=1)
            ids = torch.cat([self.reference_ids(n, grid), self.latent_ids((1, 1))], dim=1)
            text = refs.new_zeros(b, 1, self.transformer.config.joint_attention_dim)
            _, kv = self.transformer(
                hidden_states=hidden, encoder_hidden_states=text, timestep=torch.ones(b, device=self.device_),
                img_ids=ids, txt_ids=self.pipe._prepare_text_ids(text).to(self.device_), guidance=self._guidance(b),
                return_dict=False, kv_cache_mode="extract", num_ref_tokens=tokens,
                ref_fixed_timestep=self.opts.ref_timestep,
            )
            layers = [c.get() for c in kv.double_block_caches] + [c.get() for c in kv.single_block_caches]
            cond.kv[n] = (rows, layers)

    def _cache_for(self, cond: DiffusersCondition, rows: torch.Tensor, n: int):
        """A `Flux2KVCache` holding the cached keys/values of base ``rows`` (all with n refs)."""
        from diffusers.models.transformers.transformer_flux2 import Flux2KVCache

        base_rows, layers = cond.kv[n]
        lookup = torch.full((len(cond.n_refs),), -1, dtype=torch.long)
        lookup[base_rows] = torch.arange(len(base_rows))
        idx = lookup[rows].to(self.device_)
        n_double = len(self.transformer.transformer_blocks)
        cache = Flux2KVCache(n_double, len(self.transformer.single_transformer_blocks))
        for i, (k, v) in enumerate(layers):
            layer = cache.get_double(i) if i < n_double else cache.get_single(i - n_double)
            layer.store(k[idx], v[idx])
        cache.num_ref_tokens = layers[0][0].shape[1]
        return cache

    # -- transformer call ----------------------------------------------------------------
    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, grid: tuple[int, int], cond: DiffusersCondition,
                 rows: torch.Tensor, n_refs: int) -> torch.Tensor:
        b, dev_rows = x.shape[0], rows.to(self.device_)
        text = cond.text["embeds"][dev_rows]
        common = {"encoder_hidden_states": text, "timestep": sigma, "guidance": self._guidance(b),
                  "txt_ids": self.pipe._prepare_text_ids(text).to(self.device_), "return_dict": False}
        ids = self.latent_ids(grid)
        if n_refs == 0:
            return self.transformer(hidden_states=x, img_ids=ids, **common)[0]
        tokens = n_refs * cond.ref_grid[0] * cond.ref_grid[1]
        refs, ref_ids = cond.refs[dev_rows, :tokens], self.reference_ids(n_refs, cond.ref_grid)
        if self.opts.ref_attention == "full":
            out = self.transformer(hidden_states=torch.cat([x, refs], 1), img_ids=torch.cat([ids, ref_ids], 1), **common)[0]
            return out[:, : x.shape[1]]
        if n_refs in cond.kv:
            cache = self._cache_for(cond, rows, n_refs)
            return self.transformer(hidden_states=x, img_ids=ids, kv_cache=cache, kv_cache_mode="cached", **common)[0]
        out, _ = self.transformer(hidden_states=torch.cat([refs, x], 1), img_ids=torch.cat([ref_ids, ids], 1),
                                  kv_cache_mode="extract", num_ref_tokens=tokens,
                                  ref_fixed_timestep=self.opts.ref_timestep, **common)
        return out
