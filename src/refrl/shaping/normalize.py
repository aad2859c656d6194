"""Group-relative advantages from one or several rewards (docs/reference/methods.md#advantages-group-normalization-gdpo-missing-rewards).

Missing rewards are NaN. :func:`fill_missing` applies the chosen rule:

* ``"mean"`` (DyRef's rule): a NaN is replaced by the mean of the valid values of that
  reward in the batch. If every value is NaN the reward is filled with 0, a constant,
  so it yields an all-zero advantage after any group normalization.
* ``"exclude"``: the NaN is kept. The normalizers (:func:`group_normalize`,
  :func:`gdpo_combine`) then leave it out of its group's mean and std and give that
  sample an advantage of exactly 0 **for that reward** (it carries no signal); the
  weights of the other rewards are not renormalized, so every sample's advantage is on
  the same scale. :func:`weighted_sum` cannot exclude and refuses NaN.

Missing rewards are never silently turned into a raw reward of 0.
"""

from __future__ import annotations

import torch

STD_MODES = ("group", "global")
MISSING_RULES = ("mean", "exclude")
FLOW_GRPO_EPS = 1e-4  # Flow-GRPO's PerPromptStatTracker: (r - mean) / (std + 1e-4)
GDPO_STD_FLOOR = 1e-6  # DyRef / GDPO: population std floored at 1e-6
ADVANTAGE_CLIP = 5.0  # Flow-GRPO, DyRef, Customized-GRPO clip advantages to +-5


def _check_group_ids(values: torch.Tensor, group_ids: torch.Tensor, name: str = "rewards") -> None:
    if values.dim() != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(values.shape)}")
    if group_ids.shape != values.shape:
        raise ValueError(
            f"group_ids shape {tuple(group_ids.shape)} != {name} shape {tuple(values.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")


def group_stats(
    values: torch.Tensor, group_ids: torch.Tensor, unbiased: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and std of the sample's group, over the group's non-NaN values.

    ``group_ids`` (B,) int: samples with equal ids form a group (need not be contiguous).
    Population std (``unbiased=False``, numpy's default) or the unbiased one (ddof 1;
    NaN for a group with a single valid value). A group with no valid value gets NaN.
    Computed in float64 so hand-checked values match to ~1e-12.
    """
    _check_group_ids(values, group_ids)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    v = values.double()
    valid = ~torch.isnan(v)
    zeros = v.new_zeros(num_groups)
    count = zeros.index_add(0, inverse, valid.double())
    total = zeros.index_add(0, inverse, torch.where(valid, v, 0.0))
    mean = total / count  # NaN where a group has no valid value
    dev2 = torch.where(valid, (v - mean[inverse]) ** 2, 0.0)
    var = zeros.index_add(0, inverse, dev2) / (count - (1.0 if unbiased else 0.0))
    return mean[inverse], var.sqrt()[inverse]


def group_normalize(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    std: str = "group",
    eps: float = FLOW_GRPO_EPS,
) -> torch.Tensor:
    """``A = (r − mean_g) / (std + eps)`` (Flow-GRPO / GRPO group-relative advantage).

    ``std="group"``: the population std of the sample's group; ``"global"``: the
    population std of all rewards in the (gathered) batch. ``eps`` defaults to
    Flow-GRPO's 1e-4. NaN rewards follow the ``"exclude"`` rule (module docstring):
    left out of the statistics, advantage 0. Returned in the dtype of ``rewards``.
    """
    if std not in STD_MODES:
        raise ValueError(f"unknown std mode {std!r}; allowed: {', '.join(STD_MODES)}")
    mean, group_std = group_stats(rewards, group_ids)
    v = rewards.double()
    if std == "global":
        valid = v[~torch.isnan(v)]
        denom = valid.std(correction=0) if valid.numel() else v.new_tensor(0.0)
    else:
        denom = group_std
    adv = (v - mean) / (denom + eps)
    return torch.nan_to_num(adv, nan=0.0).to(rewards.dtype)


def _check_keys(rewards: dict[str, torch.Tensor], weights: dict[str, float]) -> None:
    missing, extra = sorted(set(rewards) - set(weights)), sorted(set(weights) - set(rewards))
    if missing or extra:
        raise ValueError(
            f"reward weights do not match rewards: no weight for {missing}, weight without reward "
            f"for {extra}; rewards are {sorted(rewards)}"
        )
    if not rewards:
        raise ValueError("no rewards given")


def weighted_sum(rewards: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Naive multi-reward combination ``r = Σ_k w_k·r_k`` (then group-normalize it).

    Refuses NaN: a missing reward must be filled first (``fill_missing(rule="mean")``)
    or combined with :func:`gdpo_combine`, which can exclude it.
    """
    _check_keys(rewards, weights)
    total = None
    for key in sorted(rewards):
        r = rewards[key]
        if bool(torch.isnan(r).any()):
            raise ValueError(
                f"reward {key!r} has missing (NaN) values; weighted_sum cannot exclude them: "
                "use fill_missing(rule='mean') or gdpo_combine"
            )
        total = weights[key] * r if total is None else total + weights[key] * r
    return total


def fill_missing(r: torch.Tensor, rule: str = "mean") -> tuple[torch.Tensor, int]:
    """Apply a missing-reward rule (module docstring); returns ``(filled, n_missing)``.

    ``"mean"``: NaN → mean of the valid values of ``r`` in the batch (DyRef), or 0 when
    all are NaN. ``"exclude"``: NaN kept for the normalizers to exclude.
    ``n_missing`` is the number of NaN values in ``r`` (for metrics).
    """
    if rule not in MISSING_RULES:
        raise ValueError(
            f"unknown missing-reward rule {rule!r}; allowed: {', '.join(MISSING_RULES)}"
        )
    missing = torch.isnan(r)
    n_missing = int(missing.sum())
    if rule == "exclude" or n_missing == 0:
        return r.clone(), n_missing
    fill = r[~missing].mean() if n_missing < r.numel() else r.new_tensor(0.0)
    return torch.where(missing, fill, r), n_missing


def gdpo_combine(
    rewards: dict[str, torch.Tensor],
    weights: dict[str, float],
    group_ids: torch.Tensor,
    eps_floor: float = GDPO_STD_FLOOR,
    clip: float = ADVANTAGE_CLIP,
) -> torch.Tensor:
    """GDPO aggregation as used by DyRef (docs/reference/methods.md#advantages-group-normalization-gdpo-missing-rewards).

    Per reward k: ``A_k = (r_k − mean_g) / max(std_g, eps_floor)`` with the group's
    population std; ``A = Σ_k w_k·A_k``; then over the whole (gathered) batch
    ``A ← (A − mean(A)) / max(std(A), eps_floor)`` (population std, same floor);
    finally ``clip(A, −clip, clip)``. NaN rewards are excluded (advantage 0 for that
    reward, module docstring). Returns float32 (B,).
    """
    _check_keys(rewards, weights)
    combined = None
    for key in sorted(rewards):
        r = rewards[key]
        mean, std = group_stats(r, group_ids)
        a_k = torch.nan_to_num((r.double() - mean) / std.clamp_min(eps_floor), nan=0.0)
        combined = weights[key] * a_k if combined is None else combined + weights[key] * a_k
    adv = (combined - combined.mean()) / combined.std(correction=0).clamp_min(eps_floor)
    return adv.clamp(-clip, clip).float()
