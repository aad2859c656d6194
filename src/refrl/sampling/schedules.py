"""Sigma schedules for rectified-flow sampling (sigma = 1 is noise, 0 the image)."""

from __future__ import annotations

import torch


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Time shift of SD3 / FLUX: ``s' = shift·s / (1 + (shift − 1)·s)``.

    Source: Esser et al. 2024 (SD3), "resolution-dependent shifting of timestep
    schedules"; the same map as diffusers' ``FlowMatchEulerDiscreteScheduler``.
    It keeps 0 and 1 fixed and, for shift > 1, spends more steps at high noise.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sigma_schedule(
    num_steps: int,
    shift: float = 1.0,
    sigma_min: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``num_steps + 1`` sigmas from 1 down to exactly 0, shifted with :func:`shift_sigmas`.

    Unshifted grid: ``linspace(1, sigma_end, num_steps)`` followed by 0, where
    ``sigma_end = sigma_min`` (the last non-zero sigma) or, when ``sigma_min`` is 0,
    ``1/num_steps``; the default is thus the uniform grid ``linspace(1, 0, num_steps + 1)``
    of the diffusers FLUX / SD3 pipelines (``linspace(1, 1/N, N)`` plus a final 0).
    The shift is applied after, so ``sigma_min`` is an unshifted value.
    Step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 <= sigma_min < 1.0:
        raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
    sigma_end = sigma_min if sigma_min > 0 else 1.0 / num_steps
    grid = torch.linspace(1.0, sigma_end, num_steps, dtype=torch.float64)
    sigmas = torch.cat([shift_sigmas(grid, shift), grid.new_zeros(1)])
    return sigmas.to(dtype)
