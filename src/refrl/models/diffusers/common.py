"""The shared base of the diffusers adapters.

`DiffusersPolicy` puts a diffusers pipeline's own components behind the `Policy`
protocol; a subclass per model family supplies the few model-specific pieces (VAE
latent normalisation, token packing, position ids, text encoding, the transformer
call), each by calling the pipeline's own helpers.

Conventions shared by all backends:

* Latents seen by the trainers are *spatial* ``(C, h, w)`` tensors, normalised as the
  pipeline normalises them (FLUX.1 shift/scale, Qwen mean/std, FLUX.2 batch-norm of
  patchified latents), in float32 on the caller's device. ``velocity`` packs them
  into tokens, runs the transformer (in ``model.dtype``) on ``model.device`` and
  returns float32 on the caller's device, so SDE log-probs are float32.
* Diffusers' flow transformers take ``timestep = sigma`` (the pipelines pass
  ``t / 1000`` and scale inside) and predict ``noise - x0``: the `Policy` velocity.
* The adapters generate at ``model.image_size`` and encode references at
  ``model.ref_size`` (square, bilinear resize), whatever size the data has.
* A sample's velocity never depends on the rest of the batch: the batch is split
  into groups with the same number of references (same token layout and position
  ids) and each group is one transformer call; text is padded to a fixed length or
  masked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.models.diffusers.finetune import FinetuneMixin, checkpoint_with_fresh_kwargs
from refrl.models.diffusers.options import DiffusersModelConfig
from refrl.models.diffusers.text_cache import TextEmbeddingCache
from refrl.models.inputs import drop_flags, resize_square
from refrl.models.sampler import GENERIC_SAMPLER, SamplerDefaults

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DiffusersCondition:
    """Encoded prompts + references of a batch; rows of ``index`` point into the base batch.

    ``select`` only composes ``index``, so repeating a condition G times (GRPO groups)
    copies nothing; tensors are gathered per transformer call.
    """

    text: dict[str, torch.Tensor]  # (B0, ...) each
    refs: torch.Tensor  # (B0, max_refs * tokens_per_ref, C) packed reference latents, zero-padded
    n_refs: torch.Tensor  # (B0,) long, on CPU
    ref_grid: tuple[int, int]  # token grid (h, w) of one reference
    index: torch.Tensor  # (B,) long, on CPU
    kv: dict[int, Any] = field(default_factory=dict)  # per reference count: cached reference keys/values

    def select(self, index: torch.Tensor) -> DiffusersCondition:
        return replace(self, index=self.index[torch.as_tensor(index, dtype=torch.long).cpu()])

    def __len__(self) -> int:
        return int(self.index.shape[0])


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under accelerate/torchrun) if there is one, else CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is sharded with FSDP2 (`refrl.train.sharding`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def sharded_calls(module: nn.Module, calls: int) -> int:
    """The most transformer calls any process makes when ``module`` is sharded with FSDP2, else ``calls``."""
    if not is_sharded(module):
        return calls
    t = torch.tensor([calls], device=next(module.parameters()).device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)


class DiffusersPolicy(FinetuneMixin, nn.Module):
    """Base adapter: a diffusers pipeline's components behind the `Policy` protocol (see module doc)."""

    kind: ClassVar[str]  # set from ``config_class``'s kind
    config_class: ClassVar[type[DiffusersModelConfig]]  # the ``model:`` config of this kind
    pipeline_class_name: ClassVar[str]  # the diffusers pipeline whose components the adapter drives
    text_components: ClassVar[tuple[str, ...]]  # pipeline parts used only to encode text
    skipped_components: ClassVar[tuple[str, ...]] = ()  # parts the adapter never uses
    default_lora_targets: ClassVar[tuple[str, ...]]
    transformer_class_name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__:  # the kind is declared once, on the config
            cls.kind = cls.config_class.model_fields["kind"].default

    def __init__(self, pipe: Any, cfg: Any):
        super().__init__()
        self.cfg = cfg
        self.opts = cfg.diffusers
        self.__dict__["pipe"] = pipe  # not a Module: keep it out of the module tree
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoders = nn.ModuleDict(
            {n: getattr(pipe, n) for n in self.text_components if isinstance(getattr(pipe, n, None), nn.Module)}
        )
        self.dtype = DTYPES[cfg.dtype]
        self.device_ = resolve_device(cfg.device)
        self.requires_grad_(False)
        self.to(self.device_, self.dtype)
        self.text_cache = TextEmbeddingCache(cfg.text_cache)
        self.text_encoded = 0  # text-encoder calls (cache misses), for tests and logs
        self.lora_config: dict[str, Any] | None = None
        self.merged_adapters: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []
        self.full_finetune = False
        multiple = self.latent_multiple
        for name, size in (("image_size", cfg.image_size), ("ref_size", cfg.ref_size)):
            if size % multiple:
                raise RefrlError(f"model.{name}={size} must be a multiple of {multiple} for {self.kind}")
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing(checkpoint_with_fresh_kwargs)
        self.eval()

    @classmethod
    def from_config(cls, cfg: Any, transformer_dir: str | Path | None = None) -> DiffusersPolicy:
        """Load the pipeline named by ``cfg.pretrained`` (only the parts the adapter uses)."""
        import diffusers

        from refrl.models.diffusers.loading import load_pipeline, resolve_pretrained

        text = list(cls.text_components) if cfg.diffusers.load_text_encoder else []
        skip = list(cls.skipped_components) + ([] if text else list(cls.text_components))
        needed = ["vae", "scheduler", *text] + ([] if transformer_dir is not None else ["transformer"])
        location = resolve_pretrained(cfg.pretrained, needed)
        extra = cls._ready_made_components(location, text)
        if transformer_dir is not None:
            transformer_cls = getattr(diffusers, cls.transformer_class_name)
            extra["transformer"] = transformer_cls.from_pretrained(transformer_dir, dtype=DTYPES[cfg.dtype])
        pipe = load_pipeline(getattr(diffusers, cls.pipeline_class_name), location, skip=skip, extra=extra,
                             torch_dtype=DTYPES[cfg.dtype], source=cfg.pretrained)
        return cls(pipe, cfg)

    @classmethod
    def _ready_made_components(cls, location: str, text: list[str]) -> dict[str, Any]:
        """Components the adapter builds itself instead of ``from_pretrained`` (none by default)."""
        return {}

    # -- model-specific hooks ----------------------------------------------------------
    vae_factor: int  # pixels per spatial latent cell

    @property
    def latent_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x 2x2 packing)."""
        return self.vae_factor * 2

    def _vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] (model dtype, device) -> normalised spatial latents."""
        raise NotImplementedError

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised spatial latents -> images in [-1, 1]."""
        raise NotImplementedError

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> tokens (B, N, C')."""
        raise NotImplementedError

    def _unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        raise NotImplementedError

    def _token_grid(self, h: int, w: int) -> tuple[int, int]:
        """Token grid of a spatial latent of size (h, w)."""
        return h // 2, w // 2

    def _text_key(self, prompt: str, refs: list[torch.Tensor]) -> str:
        raise NotImplementedError

    def _encode_text(self, prompts: list[str], refs: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """One dict of un-batched tensors per prompt (refs: each sample's kept references)."""
        raise NotImplementedError

    def _collate_text(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([it[k] for it in items]).to(self.device_, self.dtype) for k in items[0]}

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, grid: tuple[int, int], cond: DiffusersCondition,
                 rows: torch.Tensor, n_refs: int) -> torch.Tensor:
        """Velocity tokens of noisy tokens ``x`` (B, N, C) for base rows ``rows`` with ``n_refs`` references."""
        raise NotImplementedError

    def _in_context(self, x: torch.Tensor, cond: DiffusersCondition, rows: torch.Tensor, n_refs: int) -> torch.Tensor:
        """Noisy tokens followed by the rows' first ``n_refs`` references' latent tokens
        (the in-context layout of Kontext and Qwen-Image-Edit); ``rows`` on the device."""
        if not n_refs:
            return x
        tokens = n_refs * cond.ref_grid[0] * cond.ref_grid[1]
        return torch.cat([x, cond.refs[rows, :tokens]], dim=1)

    def _reference_order(self, sample: LoadedSample) -> list[int]:
        return list(range(sample.n_refs))

    def _prepare_kv(self, cond: DiffusersCondition) -> None:
        """Backends with cacheable reference keys/values fill ``cond.kv`` here."""

    # -- Policy: condition -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.device_

    @property
    def image_size(self) -> int:
        """The generation resolution, ``model.image_size``."""
        return self.cfg.image_size

    def encode_condition(self, samples: Sequence[LoadedSample], drop_text: torch.Tensor | None = None,
                         drop_refs: torch.Tensor | None = None) -> DiffusersCondition:
        b = len(samples)
        no_text, no_refs = drop_flags(drop_text, b, "drop_text"), drop_flags(drop_refs, b, "drop_refs")
        kept: list[list[torch.Tensor]] = []
        for s, dt, dr in zip(samples, no_text, no_refs, strict=True):
            if len(s.ref_types) != s.n_refs:
                raise RefrlError(f"sample {s.id!r} has {s.n_refs} reference images but {len(s.ref_types)} types")
            if dr and not (dt and self.opts.cfg_keep_refs):
                kept.append([])
                continue
            kept.append([resize_square(s.ref_images[j], self.cfg.ref_size, f"sample {s.id!r} reference {j + 1}")
                         for j in self._reference_order(s)])
        prompts = [self.opts.negative_prompt if dt else s.prompt for s, dt in zip(samples, no_text, strict=True)]
        text = self._collate_text(self._text_embeddings(prompts, kept))
        n_refs = torch.tensor([len(k) for k in kept], dtype=torch.long)
        grid = self._token_grid(*self._latent_hw(self.cfg.ref_size))
        tokens_per_ref = grid[0] * grid[1]
        flat = [im for k in kept for im in k]
        if flat:
            with torch.no_grad():
                lat = self._vae_encode(torch.stack(flat).to(self.device_, self.dtype) * 2 - 1)
            ref_tok = self._pack(lat)  # (sum n, T, C)
            width = ref_tok.shape[-1]
        else:
            ref_tok, width = None, self.transformer.config.in_channels
        refs = torch.zeros(b, int(n_refs.max()) * tokens_per_ref, width, device=self.device_, dtype=self.dtype)
        start = 0
        for i, n in enumerate(n_refs.tolist()):
            if n:
                refs[i, : n * tokens_per_ref] = ref_tok[start : start + n].reshape(n * tokens_per_ref, width)
                start += n
        cond = DiffusersCondition(text=text, refs=refs, n_refs=n_refs, ref_grid=grid, index=torch.arange(b))
        self._prepare_kv(cond)
        return cond

    def select_condition(self, condition: DiffusersCondition, index: torch.Tensor) -> DiffusersCondition:
        return condition.select(index)

    def _text_embeddings(self, prompts: list[str], refs: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        keys = [self._text_key(p, r) for p, r in zip(prompts, refs, strict=True)]
        found = [self.text_cache.get(k) for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:
            if not self.text_encoders:
                raise RefrlError(
                    f"no precomputed text embedding for prompt {prompts[todo[0]]!r} in model.text_cache="
                    f"{self.cfg.text_cache} and the text encoder is not loaded (model.diffusers.load_text_encoder="
                    "false); precompute with policy.precompute_text(samples) on a machine that loads it"
                )
            with torch.no_grad():
                new = self._encode_text([prompts[i] for i in todo], [refs[i] for i in todo])
            self.text_encoded += len(todo)
            for i, value in zip(todo, new, strict=True):
                self.text_cache.put(keys[i], value)
                found[i] = self.text_cache.get(keys[i])
        return found  # type: ignore[return-value]

    def precompute_text(self, samples: Sequence[LoadedSample], with_negative: bool = True) -> int:
        """Encode and store (in ``model.text_cache``) the text of ``samples`` and, with
        ``with_negative``, of their unconditional branch; returns how many were encoded."""
        before = self.text_encoded
        b = len(samples)
        self.encode_condition(samples)
        if with_negative:
            yes, no = torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)
            self.encode_condition(samples, drop_text=yes, drop_refs=no)
            self.encode_condition(samples, drop_text=yes, drop_refs=yes)
        return self.text_encoded - before

    # -- Policy: denoiser and latents --------------------------------------------------
    def _latent_hw(self, size: int) -> tuple[int, int]:
        side = size // self.vae_factor
        return side, side

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The latent of one image at ``model.image_size`` (the requested size is not used:
        the adapter generates at its configured resolution)."""
        h, w = self._latent_hw(self.cfg.image_size)
        return (self.latent_channels, h, w)

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    # the argument of the pipeline's ``__call__`` that is plain classifier-free guidance
    # (``true_cfg_scale`` where ``guidance_scale`` is the embedded guidance of a distilled model)
    cfg_argument: ClassVar[str] = "guidance_scale"
    ROLLOUT_STEPS: ClassVar[int] = 10  # Flow-GRPO's training rollouts (its evaluation uses the pipeline's steps)

    def _pipeline_default(self, argument: str) -> Any:
        """The default of ``argument`` in the pipeline's ``__call__`` (None when it has none)."""
        import inspect

        param = inspect.signature(type(self.pipe).__call__).parameters.get(argument)
        return None if param is None or param.default is inspect.Parameter.empty else param.default

    def _default_cfg_scale(self) -> float:
        value = self._pipeline_default(self.cfg_argument)
        return 1.0 if value is None else float(value)

    def sampler_defaults(self) -> SamplerDefaults:
        """This backend's sampler, in one place: the pipeline's ``__call__`` defaults
        (``num_inference_steps``, the CFG argument `cfg_argument`) and its scheduler config: a
        fixed ``shift``, or None under ``use_dynamic_shifting`` (then `pipeline_shift` of the
        chosen steps). RL rollouts take `ROLLOUT_STEPS` steps and the same guidance."""
        config = self.pipe.scheduler.config
        shift = None if config.get("use_dynamic_shifting", False) else float(config.get("shift", 1.0))
        steps = int(self._pipeline_default("num_inference_steps") or GENERIC_SAMPLER.steps)
        cfg_scale = self._default_cfg_scale()
        return SamplerDefaults(steps=steps, cfg_scale=cfg_scale, shift=shift, rollout_steps=self.ROLLOUT_STEPS,
                               rollout_cfg_scale=cfg_scale,
                               source=f"{type(self.pipe).__name__} defaults and its scheduler config")

    def pipeline_shift(self, steps: int) -> float:
        """The constant time shift (``sampling.shift``) that reproduces the pipeline's sigmas at
        ``model.image_size`` with ``steps`` steps: its resolution-dependent ``mu`` becomes
        ``exp(mu)`` (exponential time shift; ``mu`` for a linear one), since
        ``e^mu / (e^mu + 1/t - 1) = s t / (1 + (s - 1) t)`` with ``s = e^mu``; a scheduler without
        dynamic shifting gives its fixed ``shift``. (A ``shift_terminal`` stretch is not included.)"""
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        h, w = self._token_grid(*self._latent_hw(self.cfg.image_size))
        mu = self._shift_mu(h * w, steps)
        return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu

    def _shift_mu(self, image_seq_len: int, steps: int) -> float:
        """The pipeline's ``mu`` (FLUX.1 / Qwen: ``calculate_shift`` on the scheduler config)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.pipe.scheduler.config
        return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, condition: DiffusersCondition) -> torch.Tensor:
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        if len(condition) != b:
            raise ValueError(f"condition has {len(condition)} rows but x has batch {b}")
        tokens = self._pack(x.to(self.device_, self.dtype))
        sigma = sigma.to(self.device_, torch.float32).reshape(b)
        counts = condition.n_refs[condition.index]
        pieces, order = [], []
        groups = sorted(set(counts.tolist()))
        calls = sharded_calls(self.transformer, len(groups))  # agreed before any call: FSDP2 gathers in each
        for n in groups:
            pos = (counts == n).nonzero().flatten()
            rows = condition.index[pos]
            pos_dev = pos.to(self.device_)
            pieces.append(self._forward(tokens[pos_dev], sigma[pos_dev], self._token_grid(h, w), condition, rows, n))
            order.append(pos)
        v = torch.cat(pieces)[torch.argsort(torch.cat(order)).to(self.device_)]
        for _ in range(calls - len(pieces)):
            # each process runs the transformer equally often: a no-reference pass on one row, in the
            # graph with weight 0, pairs with another process's call
            extra = self._forward(tokens[:1], sigma[:1], self._token_grid(h, w), condition, condition.index[:1], 0)
            v = v + 0.0 * extra.sum()
        return self._unpack(v, h, w).to(x.device, torch.float32)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, condition: DiffusersCondition) -> torch.Tensor:
        return self.velocity(x, sigma, condition)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        size = self.cfg.image_size
        pix = torch.stack([resize_square(im, size, f"image {i}") for i, im in enumerate(images)])
        with torch.no_grad():
            lat = self._vae_encode(pix.to(self.device_, self.dtype) * 2 - 1)
        return lat.to(images.device, torch.float32)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            img = self._vae_decode(latents.to(self.device_, self.dtype))
        return ((img.float() + 1) / 2).clamp(0, 1).to(latents.device)

    def train(self, mode: bool = True) -> DiffusersPolicy:
        super().train(mode)
        self.vae.eval()  # frozen parts stay in eval mode (no dropout/BN updates)
        self.text_encoders.eval()
        return self

    def save_pretrained(self, directory: str | Path) -> None:
        """See `refrl.models.diffusers.saving` for the folder layout."""
        from refrl.models.diffusers.saving import save_policy

        save_policy(self, directory)

