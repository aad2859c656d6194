"""Customized-GRPO's reward shaping: SARS and TDW (docs/reference/methods.md#customized-grpo-sars-and-tdw).

Two rewards per sample: prompt following ``h`` (HPS role) and identity ``d``
(DINO-Seg role), each normalized within its group; SARS adds a synergy bonus,
TDW weights the two by the denoising step of the trained SDE step.
"""

from __future__ import annotations

import torch

from refrl.shaping.normalize import ADVANTAGE_CLIP, group_stats

SARS_MODES = ("tanh", "tanh_only", "harmonic", "min", "max", "none")
SARS_GAMMA = 0.4
HARMONIC_EPS = 1e-6
CUSTOMIZED_GRPO_EPS = 1e-8  # (r - mean) / (unbiased std + 1e-8)

# TDW, defined by the paper for T = 25 denoising steps (step t = 0 is pure noise).
TDW_REFERENCE_STEPS = 25
TDW_EARLY_END = 6  # t < 6: prompt weight 0.7 (layout is decided early)
TDW_CENTER = 10  # centre of the sigmoid hand-over
TDW_SLOPE = 0.8
TDW_LATE_START = 22  # t >= 22: equal weights
TDW_EARLY_WEIGHT = 0.7
TDW_MID_FLOOR = 0.3
TDW_MID_RANGE = 0.4
TDW_LATE_WEIGHT = 0.5
NAIVE_WEIGHTS = (0.5, 0.5)  # (w_prompt, w_identity) when TDW is off: the 1:1 baseline


def sars_bonus(
    adv_prompt: torch.Tensor,
    adv_identity: torch.Tensor,
    gamma: float = SARS_GAMMA,
    mode: str = "tanh",
) -> torch.Tensor:
    """Synergy-aware reward shaping term B (Customized-GRPO), elementwise on (B,).

    * ``tanh``: ``B = +γ·tanh(A_h·A_d)`` if ``A_h > 0 or A_d > 0`` else ``−γ·tanh(A_h·A_d)``:
      both above the group mean → bonus; conflicted signs → penalty (the product is
      negative); both below → penalty.
    * ``tanh_only``: the same with γ = 1 (the ``gamma`` argument is ignored).
    * ``harmonic``: ``γ·A_h·A_d / (A_h + A_d + 1e-6)``.
    * ``min`` / ``max``: ablations that **replace** the whole combination: the returned
      value is the combined advantage ``min(A_h, A_d)`` / ``max(A_h, A_d)`` itself, not a
      bonus (:func:`customized_grpo_advantages` then uses it as A, without TDW).
    * ``none``: B = 0 (the naive fixed-weight baseline).
    """
    if mode not in SARS_MODES:
        raise ValueError(f"unknown SARS mode {mode!r}; allowed: {', '.join(SARS_MODES)}")
    if adv_prompt.shape != adv_identity.shape:
        raise ValueError(
            f"adv_prompt shape {tuple(adv_prompt.shape)} != adv_identity shape {tuple(adv_identity.shape)}"
        )
    product = adv_prompt * adv_identity
    if mode in ("tanh", "tanh_only"):
        g = 1.0 if mode == "tanh_only" else gamma
        any_positive = (adv_prompt > 0) | (adv_identity > 0)
        return torch.where(any_positive, g * torch.tanh(product), -g * torch.tanh(product))
    if mode == "harmonic":
        return gamma * product / (adv_prompt + adv_identity + HARMONIC_EPS)
    if mode == "min":
        return torch.minimum(adv_prompt, adv_identity)
    if mode == "max":
        return torch.maximum(adv_prompt, adv_identity)
    return torch.zeros_like(product)


def sars_categories(adv_prompt: torch.Tensor, adv_identity: torch.Tensor) -> dict[str, float]:
    """Shares of samples per SARS case, for metrics; they sum to 1.

    ``both_positive``: A_h > 0 and A_d > 0; ``both_negative``: A_h <= 0 and A_d <= 0 (the
    penalty branch of the tanh rule); ``conflicted``: exactly one is > 0.
    """
    pos_h, pos_d = adv_prompt > 0, adv_identity > 0
    n = max(adv_prompt.numel(), 1)
    return {
        "both_positive": float((pos_h & pos_d).sum()) / n,
        "conflicted": float((pos_h ^ pos_d).sum()) / n,
        "both_negative": float((~pos_h & ~pos_d).sum()) / n,
    }


def tdw_weights(
    step: int | torch.Tensor, num_steps: int
) -> tuple[float, float] | tuple[torch.Tensor, torch.Tensor]:
    """Time-aware dynamic weights ``(w_prompt, w_identity)`` of Customized-GRPO.

    For T = 25 steps: ``w_h(t) = 0.7`` for t < 6; ``0.3 + 0.4·(1 − sigmoid(0.8·(t − 10)))``
    for 6 <= t < 22; ``0.5`` for t >= 22; ``w_d = 1 − w_h``. For another T the curve is
    stretched: breakpoints 6 / 10 / 22 are multiplied by c = T/25 and the slope 0.8 divided
    by c, i.e. ``w_h(t; T) = w_h(t·25/T; 25)``, so the hand-over happens at the same
    fraction of the trajectory. ``step`` is the real denoising index (0 <= t < T), an int
    (floats returned) or a tensor (tensors returned, float32).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.as_tensor(step, dtype=torch.float64)
    if bool(((t < 0) | (t >= num_steps)).any()):
        raise ValueError(f"TDW step must be in [0, {num_steps}), got {step}")
    u = t * (TDW_REFERENCE_STEPS / num_steps)
    mid = TDW_MID_FLOOR + TDW_MID_RANGE * (1.0 - torch.sigmoid(TDW_SLOPE * (u - TDW_CENTER)))
    w_h = torch.where(
        u < TDW_EARLY_END,
        torch.full_like(u, TDW_EARLY_WEIGHT),
        torch.where(u < TDW_LATE_START, mid, torch.full_like(u, TDW_LATE_WEIGHT)),
    )
    if not isinstance(step, torch.Tensor):
        w = float(w_h)
        return w, 1.0 - w
    w_h = w_h.to(torch.float32)
    return w_h, 1.0 - w_h


def customized_grpo_advantages(
    r_prompt: torch.Tensor,
    r_identity: torch.Tensor,
    group_ids: torch.Tensor,
    step_index: int | torch.Tensor,
    num_steps: int,
    gamma: float = SARS_GAMMA,
    mode: str = "tanh",
    use_tdw: bool = True,
    clip: float = ADVANTAGE_CLIP,
    fixed_weights: tuple[float, float] = NAIVE_WEIGHTS,
) -> torch.Tensor:
    """Customized-GRPO advantage ``A(t) = w_h(t)·A_h + w_d(t)·A_d + B``, clipped to ±clip.

    ``A_h``, ``A_d``: each reward normalized within its group with the **unbiased** std,
    ``(r − mean_g) / (std_g + 1e-8)`` (groups need >= 2 samples). ``w`` from
    :func:`tdw_weights` at ``step_index`` (int, or (B,) tensor of the trained step of
    each sample) or ``fixed_weights`` when ``use_tdw`` is False; ``B`` from
    :func:`sars_bonus`. For ``mode`` min / max, ``A = min/max(A_h, A_d)`` (no weights).
    Returns float32 (B,).
    """
    if mode not in SARS_MODES:
        raise ValueError(f"unknown SARS mode {mode!r}; allowed: {', '.join(SARS_MODES)}")
    advs = []
    for name, r in (("r_prompt", r_prompt), ("r_identity", r_identity)):
        if bool(torch.isnan(r).any()):
            raise ValueError(f"{name} has missing (NaN) values; Customized-GRPO needs both rewards")
        mean, std = group_stats(r, group_ids, unbiased=True)
        if bool(torch.isnan(std).any()):
            raise ValueError("Customized-GRPO's unbiased std needs groups of >= 2 samples")
        advs.append(((r.double() - mean) / (std + CUSTOMIZED_GRPO_EPS)).float())
    adv_h, adv_d = advs
    if mode in ("min", "max"):
        return sars_bonus(adv_h, adv_d, gamma, mode).clamp(-clip, clip)
    if use_tdw:
        w_h, w_d = tdw_weights(
            step_index if isinstance(step_index, torch.Tensor) else torch.tensor(step_index),
            num_steps,
        )
        w_h, w_d = w_h.to(adv_h.device), w_d.to(adv_h.device)
    else:
        w_h, w_d = fixed_weights
    adv = w_h * adv_h + w_d * adv_d + sars_bonus(adv_h, adv_d, gamma, mode)
    return adv.clamp(-clip, clip)
