"""DyRef's reward shaping for multi-reference generation: DRS and DAR (docs/reference/methods.md#dyref-drs-and-dar)."""

from __future__ import annotations

import torch

from refrl.shaping.normalize import group_stats

K_MODES = ("increase", "decrease", "const")
DRS_TAU = 0.65
DRS_K_BASE = 10.0
DRS_K_PER_REF = 3.0
# k = k_base + k_per_ref·(n − pivot) ("increase") or k_base + k_per_ref·(pivot − n) ("decrease")
DRS_PIVOT = {"increase": 2, "decrease": 6}

DAR_GAMMA = 2.0
DAR_W_MIN = 0.5
DAR_W_MAX = 5.0
DAR_EPS = 1e-6
DAR_REF_PIVOT = 3.0  # reference-count factor (n / 3)^β


def drs_slope(
    n_refs: int | torch.Tensor,
    k_mode: str = "increase",
    k_base: float = DRS_K_BASE,
    k_per_ref: float = DRS_K_PER_REF,
) -> torch.Tensor:
    """DRS slope k for ``n_refs`` references (DyRef).

    ``increase``: ``k = k_base + k_per_ref·(n − 2)``; ``decrease``: ``k = k_base + k_per_ref·(6 − n)``;
    ``const``: ``k = k_base``. Defaults k_base = 10, k_per_ref = 3. A non-positive k
    (e.g. ``decrease`` with n >= 10) would invert the reward and is refused.
    Returns float32, shape of ``n_refs``.
    """
    if k_mode not in K_MODES:
        raise ValueError(f"unknown DRS k_mode {k_mode!r}; allowed: {', '.join(K_MODES)}")
    n = torch.as_tensor(n_refs, dtype=torch.float32)
    if k_mode == "const":
        return torch.full_like(n, k_base)
    offset = n - DRS_PIVOT["increase"] if k_mode == "increase" else DRS_PIVOT["decrease"] - n
    k = k_base + k_per_ref * offset
    if bool((k <= 0).any()):
        raise ValueError(
            f"DRS slope k must be > 0; k_mode={k_mode!r} gives k={k.tolist()} for n_refs={n.tolist()}"
        )
    return k


def drs_transform(
    sim: torch.Tensor,
    n_refs: int | torch.Tensor,
    tau: float = DRS_TAU,
    k_mode: str = "increase",
    k_base: float = DRS_K_BASE,
    k_per_ref: float = DRS_K_PER_REF,
) -> torch.Tensor:
    """Discriminative reward scaling (DyRef): ``r = sigmoid(k·(s − τ))``, τ = 0.65.

    Stretches the small intra-group differences of the similarity ``s`` around τ.
    ``k`` from :func:`drs_slope`; ``n_refs`` an int or a (B,) tensor. NaN stays NaN.
    """
    k = drs_slope(n_refs, k_mode, k_base, k_per_ref).to(sim.device)
    return torch.sigmoid(k * (sim.float() - tau))


def dar_group_weights(
    sim: torch.Tensor,
    group_ids: torch.Tensor,
    gamma: float = DAR_GAMMA,
    w_min: float = DAR_W_MIN,
    w_max: float = DAR_W_MAX,
    ref_count_beta: float | None = None,
    n_refs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Difficulty-aware advantage reweighting (DyRef): per-sample loss weights (B,).

    Per group g (raw, pre-DRS similarity s):
    ``p̄_g = mean(clip(s, 0, 1))``; ``w_g = clip((1 − p̄_g + 1e-6)^γ · f_g, w_min, w_max)``
    with the optional reference-count factor ``f_g = (n_g / 3)^β`` (β = ``ref_count_beta``;
    off by default as in the released code; applied inside this first clip, i.e. before
    the mean normalization), else f_g = 1; then
    ``w_g ← clip(w_g / mean_over_groups(w), w_min, w_max)`` (each group counts once,
    whatever its size). Each sample gets its group's weight. Harder groups (low p̄) weigh more.
    """
    if bool(torch.isnan(sim).any()):
        raise ValueError(
            "DAR similarity has missing (NaN) values; it needs the fidelity of every sample"
        )
    mean_p, _ = group_stats(sim.clamp(0.0, 1.0), group_ids)
    w = (1.0 - mean_p + DAR_EPS) ** gamma
    if ref_count_beta is not None:
        if n_refs is None:
            raise ValueError("dar_group_weights: ref_count_beta is set but n_refs is None")
        n = torch.as_tensor(n_refs, dtype=torch.float64, device=sim.device).expand_as(mean_p)
        n_mean, n_std = group_stats(n, group_ids)
        if bool((n_std > 0).any()):
            raise ValueError(
                "dar_group_weights: n_refs must be the same for all samples of a group"
            )
        w = w * (n_mean / DAR_REF_PIVOT) ** ref_count_beta
    w = w.clamp(w_min, w_max)
    first = _first_of_group(group_ids)
    w = (w / w[first].mean()).clamp(w_min, w_max)
    return w.float()


def _first_of_group(group_ids: torch.Tensor) -> torch.Tensor:
    """Index of the first sample of each group (to average over groups, not samples)."""
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    index = torch.arange(group_ids.numel(), device=group_ids.device)
    first = torch.full(
        (unique.numel(),), group_ids.numel(), dtype=torch.long, device=group_ids.device
    )
    first = first.scatter_reduce(0, inverse, index, reduce="amin")
    return first
