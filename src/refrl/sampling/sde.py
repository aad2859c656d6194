"""One rectified-flow step: deterministic (Euler ODE) or stochastic with a log-prob.

Convention (see ``refrl.models.policy``): ``x_sigma = (1 − sigma)·x0 + sigma·noise``
and the policy predicts ``v = noise − x0``; a step goes from ``sigma`` to
``sigma_next < sigma``. The SDE steps make the sampler a Gaussian policy
``x' ~ N(mean, std²)`` so GRPO can compute PPO ratios (docs/reference/methods.md#flow-grpo-sde-sampling-and-ppo-clip).

``sigma`` / ``sigma_next`` may be Python floats, 0-d tensors or per-sample
tensors of shape (B,); they are broadcast over the non-batch dimensions.
"""

from __future__ import annotations

import math

import torch

SDE_KINDS = ("flow-sde", "dance-sde", "cps")
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

SigmaLike = float | torch.Tensor


def _per_sample(value: SigmaLike, x: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` as a float32 tensor of shape (B, 1, ..., 1) on the device of ``x``."""
    batch, extra = x.shape[0], (1,) * (x.dim() - 1)
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if t.dim() == 0:
        return t.expand(batch).reshape(batch, *extra)
    if t.shape != (batch,):
        raise ValueError(
            f"{name} must be a float or a tensor of shape ({batch},), got shape {tuple(t.shape)}"
        )
    return t.reshape(batch, *extra)


def ode_step(
    x: torch.Tensor, v: torch.Tensor, sigma: SigmaLike, sigma_next: SigmaLike
) -> torch.Tensor:
    """Euler step of the flow ODE: ``x' = x + (sigma_next − sigma)·v``.

    Computed in float32 and returned in the dtype of ``x`` (as diffusers'
    ``FlowMatchEulerDiscreteScheduler.step`` does).
    """
    s, s_next = _per_sample(sigma, x, "sigma"), _per_sample(sigma_next, x, "sigma_next")
    return (x.float() + (s_next - s) * v.float()).to(x.dtype)


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
    """Predicted clean sample ``x̂0 = x − sigma·v`` (in the dtype of ``x``)."""
    return (x.float() - _per_sample(sigma, x, "sigma") * v.float()).to(x.dtype)


def _flow_sde(x, v, s, s_next, noise_level, sigma_max):
    """Flow-GRPO (Liu et al. 2025, ``sde_step_with_logprob``), dt = σ' − σ < 0:

    ``s_t = a·sqrt(σ / (1 − σ̃))`` with σ̃ = σ except where σ = 1 (there 1 − σ = 0):
    σ̃ = ``sigma_max`` if given, else σ' (the first sigma below 1 of the schedule,
    which is what Flow-GRPO's ``sigmas[1]`` is). Only the denominator is replaced.
    ``mean = x·(1 + s_t²·dt/(2σ)) + v·(1 + s_t²·(1 − σ)/(2σ))·dt``, ``std = s_t·sqrt(−dt)``.
    """
    if sigma_max is None:
        sigma_tilde = torch.where(s >= 1.0, s_next, s)
    else:
        if not 0.0 < float(sigma_max) < 1.0:
            raise ValueError(f"sigma_max must be in (0, 1), got {sigma_max}")
        sigma_tilde = torch.where(s >= 1.0, torch.full_like(s, float(sigma_max)), s)
    dt = s_next - s
    s_t = noise_level * torch.sqrt(s / (1.0 - sigma_tilde))
    mean = x * (1.0 + s_t**2 * dt / (2.0 * s)) + v * (1.0 + s_t**2 * (1.0 - s) / (2.0 * s)) * dt
    return mean, s_t * torch.sqrt(-dt)


def _dance_sde(x, v, s, s_next, noise_level):
    """DanceGRPO (Xue et al. 2025, ``flux_step``) as used by Customized-GRPO, dσ = σ' − σ:

    ``x̂0 = x − σ·v``, ``score = −(x − x̂0·(1 − σ))/σ²``,
    ``mean = x + dσ·v − ½·η²·score·dσ``, ``std = η·sqrt(σ − σ')``.
    """
    dsigma = s_next - s
    x0 = x - s * v
    score = -(x - x0 * (1.0 - s)) / s**2
    mean = x + dsigma * v - 0.5 * noise_level**2 * score * dsigma
    return mean, noise_level * torch.sqrt(-dsigma)


def _cps(x, v, s, s_next, noise_level):
    """Coefficients-preserving sampling (Wang & Yu 2025; Flow-GRPO ``sde_type='cps'``):

    ``std = σ'·sin(a·π/2)``, ``x̂0 = x − σ·v``, ``x̂1 = x + (1 − σ)·v`` (predicted noise),
    ``mean = x̂0·(1 − σ') + x̂1·sqrt(σ'² − std²)``.
    """
    std = s_next * math.sin(noise_level * math.pi / 2.0)
    x0 = x - s * v
    x1 = x + (1.0 - s) * v
    mean = x0 * (1.0 - s_next) + x1 * torch.sqrt((s_next**2 - std**2).clamp_min(0.0))
    return mean, std


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample log N(sample; mean, std²) **averaged** over the non-batch dims, float32.

    ``log p = −(x − μ)²/(2·std²) − log(std) − log(sqrt(2π))``; the average (not the
    sum) is Flow-GRPO's convention and is why PPO clip ranges are ~1e-4.
    """
    sample, mean, std = sample.float(), mean.float(), std.float()
    log_prob = -((sample - mean) ** 2) / (2.0 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return log_prob.expand_as(sample).reshape(sample.shape[0], -1).mean(dim=1)


def sde_step(
    kind: str,
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sigma_max: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stochastic step from ``sigma`` to ``sigma_next``; returns ``(prev_sample, log_prob, mean, std)``.

    ``kind`` is one of ``SDE_KINDS`` (formulas in the private ``_flow_sde``, ``_dance_sde``,
    ``_cps`` docstrings; docs/reference/methods.md#flow-grpo-sde-sampling-and-ppo-clip). ``noise_level`` is a (flow-sde, cps) or
    η (dance-sde). ``sigma_max`` only matters for flow-sde at sigma = 1.

    * ``mean`` (float32, shape of ``x``) and ``std`` (float32, shape (B, 1, ..., 1)) define
      the Gaussian of ``prev_sample``.
    * If ``prev_sample`` is None it is drawn as ``mean + std·ε`` with
      ``ε = torch.randn(..., generator=generator)`` in the dtype/device of ``x`` and
      returned in the dtype of ``x``; otherwise it is returned unchanged and scored
      (how training recomputes log-probs).
    * ``log_prob`` (B,) is :func:`gaussian_log_prob` of the returned ``prev_sample``
      (after the cast to ``x.dtype``, so rescoring the stored sample gives the same value);
      ``prev_sample`` is detached in it, gradients flow through ``mean`` (hence ``v``).
    """
    if kind not in SDE_KINDS:
        raise ValueError(f"unknown SDE kind {kind!r}; allowed: {', '.join(SDE_KINDS)}")
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 for an SDE step, got {noise_level}")
    s, s_next = _per_sample(sigma, x, "sigma"), _per_sample(sigma_next, x, "sigma_next")
    xf, vf = x.float(), v.float()
    if kind == "flow-sde":
        mean, std = _flow_sde(xf, vf, s, s_next, noise_level, sigma_max)
    elif kind == "dance-sde":
        mean, std = _dance_sde(xf, vf, s, s_next, noise_level)
    else:
        mean, std = _cps(xf, vf, s, s_next, noise_level)
    std = std.expand_as(s)
    if not bool((std > 0).all()):
        raise ValueError(
            f"{kind} step from sigma={sigma} to sigma_next={sigma_next} has std <= 0 "
            "(sigma_next must be < sigma, and > 0 for cps); make this step an ODE step"
        )
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        prev_sample = (mean + std * noise.float()).to(x.dtype)
    elif prev_sample.shape != x.shape:
        raise ValueError(
            f"prev_sample shape {tuple(prev_sample.shape)} != x shape {tuple(x.shape)}"
        )
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return prev_sample, log_prob, mean, std
