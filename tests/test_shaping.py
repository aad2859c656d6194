"""Advantages and reward shaping (GDPO, SARS, TDW, DRS, DAR) against hand values."""

import math

import pytest
import torch

from refrl.shaping import (
    customized_grpo_advantages,
    dar_group_weights,
    drs_slope,
    drs_transform,
    fill_missing,
    gdpo_combine,
    group_normalize,
    sars_bonus,
    sars_categories,
    tdw_weights,
    weighted_sum,
)


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def approx(values, rel=1e-6, abs=1e-9):
    return pytest.approx(values, rel=rel, abs=abs)


# ---------------------------------------------------------------- group normalization
IDS = torch.tensor([0, 1, 0, 1, 0, 1])  # non-contiguous groups
R = torch.tensor([1.0, 5.0, 2.0, 7.0, 3.0, 9.0])


def test_group_normalize_group_std():
    a = group_normalize(R, IDS)
    s0, s1 = math.sqrt(2 / 3), math.sqrt(8 / 3)  # population stds of {1,2,3} and {5,7,9}
    expect = [-1 / (s0 + 1e-4), -2 / (s1 + 1e-4), 0.0, 0.0, 1 / (s0 + 1e-4), 2 / (s1 + 1e-4)]
    assert a.tolist() == approx(expect)


def test_group_normalize_global_std():
    a = group_normalize(R, IDS, std="global", eps=0.0)
    m = sum(R.tolist()) / 6
    g = math.sqrt(sum((r - m) ** 2 for r in R.tolist()) / 6)
    assert a.tolist() == approx([-1 / g, -2 / g, 0.0, 0.0, 1 / g, 2 / g])


def test_group_normalize_excludes_nan():
    r = torch.tensor([1.0, float("nan"), 3.0, 4.0])
    a = group_normalize(r, torch.tensor([0, 0, 0, 1]), eps=0.0)
    # group 0 valid {1, 3}: mean 2, std 1; the NaN sample gets 0; singleton group -> 0/0 -> 0
    assert a.tolist() == approx([-1.0, 0.0, 1.0, 0.0])


def test_group_normalize_errors():
    with pytest.raises(ValueError, match="allowed: group, global"):
        group_normalize(R, IDS, std="batch")
    with pytest.raises(ValueError, match="integer"):
        group_normalize(R, IDS.float())
    with pytest.raises(ValueError, match="group_ids shape"):
        group_normalize(R, IDS[:3])


# ---------------------------------------------------------------- weighted sum / missing
def test_weighted_sum():
    out = weighted_sum(
        {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])}, {"a": 1.0, "b": 0.5}
    )
    assert out.tolist() == approx([2.5, 4.0])
    with pytest.raises(ValueError, match=r"no weight for \['b'\]"):
        weighted_sum({"a": torch.ones(2), "b": torch.ones(2)}, {"a": 1.0})
    with pytest.raises(ValueError, match="reward 'b' has missing"):
        weighted_sum(
            {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, {"a": 1.0, "b": 1.0}
        )


def test_fill_missing_rules():
    nan = float("nan")
    r = torch.tensor([1.0, nan, 3.0, nan])
    filled, n = fill_missing(r, "mean")
    assert filled.tolist() == [1.0, 2.0, 3.0, 2.0] and n == 2
    kept, n = fill_missing(r, "exclude")
    assert n == 2 and torch.isnan(kept).tolist() == [False, True, False, True]
    all_nan, n = fill_missing(torch.full((3,), nan), "mean")
    assert all_nan.tolist() == [0.0, 0.0, 0.0] and n == 3
    assert group_normalize(all_nan, torch.tensor([0, 0, 1])).tolist() == [0.0, 0.0, 0.0]
    none_missing, n = fill_missing(torch.tensor([1.0, 2.0]), "mean")
    assert none_missing.tolist() == [1.0, 2.0] and n == 0
    with pytest.raises(ValueError, match="allowed: mean, exclude"):
        fill_missing(r, "zero")


# ---------------------------------------------------------------- GDPO
GIDS = torch.tensor([0, 0, 1, 1])


def test_gdpo_by_hand():
    rewards = {
        "fid": torch.tensor([1.0, 3.0, 2.0, 2.0]),
        "style": torch.tensor([0.0, 1.0, 4.0, 8.0]),
    }
    a = gdpo_combine(rewards, {"fid": 1.0, "style": 0.5}, GIDS)
    # fid: g0 mean 2 std 1 -> [-1, 1]; g1 constant -> std floored -> [0, 0]
    # style: g0 mean .5 std .5 -> [-1, 1]; g1 mean 6 std 2 -> [-1, 1]
    # A = [-1.5, 1.5, -0.5, 0.5]: batch mean 0, population std sqrt(1.25)
    s = math.sqrt(1.25)
    assert a.tolist() == approx([-1.5 / s, 1.5 / s, -0.5 / s, 0.5 / s])
    clipped = gdpo_combine(rewards, {"fid": 1.0, "style": 0.5}, GIDS, clip=1.0)
    assert clipped.tolist() == approx([-1.0, 1.0, -0.5 / s, 0.5 / s])


def test_gdpo_excludes_missing_reward():
    nan = float("nan")
    rewards = {
        "fid": torch.tensor([1.0, 3.0, 2.0, 4.0]),
        "style": torch.tensor([0.0, 1.0, nan, nan]),
    }
    a = gdpo_combine(rewards, {"fid": 1.0, "style": 0.8}, GIDS)
    # fid -> [-1, 1, -1, 1]; style -> [-1, 1, 0, 0]; A = [-1.8, 1.8, -1, 1]
    s = math.sqrt((2 * 1.8**2 + 2) / 4)
    assert a.tolist() == approx([-1.8 / s, 1.8 / s, -1 / s, 1 / s])


# ---------------------------------------------------------------- SARS / TDW
def test_sars_sign_cases():
    ah = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0])
    ad = torch.tensor([2.0, -2.0, -2.0, 0.5, 0.0])
    b = sars_bonus(ah, ad)
    g = 0.4
    assert b.tolist() == approx(
        [g * math.tanh(2), g * math.tanh(-2), -g * math.tanh(2), g * math.tanh(-0.5), 0.0]
    )
    # bonus, conflicted, both negative, conflicted
    assert b[0] > 0 and b[1] < 0 and b[2] < 0 and b[3] < 0
    assert sars_bonus(ah, ad, mode="tanh_only").tolist() == approx(
        [math.tanh(2), math.tanh(-2), -math.tanh(2), math.tanh(-0.5), 0.0]
    )
    assert sars_bonus(ah[:1], ad[:1], mode="harmonic").item() == pytest.approx(0.4 * 2 / (3 + 1e-6))
    assert sars_bonus(ah, ad, mode="min").tolist() == [1.0, -2.0, -2.0, -1.0, 0.0]
    assert sars_bonus(ah, ad, mode="max").tolist() == [2.0, 1.0, -1.0, 0.5, 0.0]
    assert sars_bonus(ah, ad, mode="none").tolist() == [0.0] * 5
    assert sars_categories(ah, ad) == approx(
        {"both_positive": 0.2, "conflicted": 0.4, "both_negative": 0.4}
    )
    with pytest.raises(ValueError, match="allowed: tanh"):
        sars_bonus(ah, ad, mode="sum")


def _mid(u):
    return 0.3 + 0.4 * (1 - sigmoid(0.8 * (u - 10)))


def test_tdw_at_25_steps():
    expect = {0: 0.7, 5: 0.7, 6: _mid(6), 10: 0.5, 21: _mid(21), 22: 0.5, 24: 0.5}
    for t, w in expect.items():
        wh, wd = tdw_weights(t, 25)
        assert (wh, wd) == approx((w, 1 - w)), t
    assert _mid(6) == pytest.approx(0.3 + 0.4 * (1 - sigmoid(-3.2)))  # ~0.684
    wh, wd = tdw_weights(torch.tensor([0, 10, 24]), 25)
    assert wh.tolist() == approx([0.7, 0.5, 0.5]) and wd.tolist() == approx([0.3, 0.5, 0.5])


def test_tdw_scales_with_num_steps():
    # T = 10: breakpoints 2.4 / 4 / 8.8, slope 0.8 * 25/10 = 2
    expect = {
        0: 0.7,
        2: 0.7,
        3: 0.3 + 0.4 * (1 - sigmoid(2 * (3 - 4))),
        4: 0.5,
        8: 0.3 + 0.4 * (1 - sigmoid(2 * (8 - 4))),
        9: 0.5,
    }
    for t, w in expect.items():
        assert tdw_weights(t, 10)[0] == pytest.approx(w), t
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        tdw_weights(10, 10)


def test_customized_grpo_advantages_by_hand():
    rp = torch.tensor([1.0, 3.0, 5.0, 5.5])
    rd = torch.tensor([2.0, 0.0, 1.0, 2.0])
    # unbiased std of a pair = |a - b| / sqrt(2): prompt stds sqrt(2), 0.5/sqrt(2); identity sqrt(2), 1/sqrt(2)
    k = 1 / math.sqrt(2)
    sh0, sh1, sd0, sd1 = math.sqrt(2) + 1e-8, 0.5 * k + 1e-8, math.sqrt(2) + 1e-8, k + 1e-8
    ah = [-1 / sh0, 1 / sh0, -0.25 / sh1, 0.25 / sh1]
    ad = [1 / sd0, -1 / sd0, -0.5 / sd1, 0.5 / sd1]
    assert ah == approx([-k, k, -k, k]) and ad == approx([k, -k, -k, k])

    def bonus(h, d):
        p = math.tanh(h * d)
        return 0.4 * p if (h > 0 or d > 0) else -0.4 * p

    a = customized_grpo_advantages(rp, rd, GIDS, step_index=0, num_steps=25)
    assert a.tolist() == approx(
        [0.7 * h + 0.3 * d + bonus(h, d) for h, d in zip(ah, ad, strict=True)], rel=1e-5
    )
    # per-sample step index: group 1 was trained at step 22 (weights 0.5 / 0.5)
    a = customized_grpo_advantages(
        rp, rd, GIDS, step_index=torch.tensor([0, 0, 22, 22]), num_steps=25
    )
    w = [0.7, 0.7, 0.5, 0.5]
    assert a.tolist() == approx(
        [wi * h + (1 - wi) * d + bonus(h, d) for wi, h, d in zip(w, ah, ad, strict=True)], rel=1e-5
    )
    naive = customized_grpo_advantages(rp, rd, GIDS, 0, 25, mode="none", use_tdw=False)
    assert naive.tolist() == approx(
        [0.5 * h + 0.5 * d for h, d in zip(ah, ad, strict=True)], rel=1e-5
    )
    assert customized_grpo_advantages(rp, rd, GIDS, 0, 25, mode="min").tolist() == approx(
        [-k, -k, -k, k], rel=1e-5
    )
    assert customized_grpo_advantages(
        rp, rd, GIDS, 0, 25, clip=0.1
    ).abs().max().item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match=">= 2 samples"):
        customized_grpo_advantages(rp, rd, torch.tensor([0, 0, 0, 1]), 0, 25)


# ---------------------------------------------------------------- DRS / DAR
def test_drs_slopes():
    n = torch.arange(2, 8)
    assert drs_slope(n, "increase").tolist() == [10, 13, 16, 19, 22, 25]
    assert drs_slope(n, "decrease").tolist() == [22, 19, 16, 13, 10, 7]
    assert drs_slope(n, "const").tolist() == [10] * 6
    assert drs_slope(4, "increase", k_base=5.0, k_per_ref=1.0).item() == 7.0
    with pytest.raises(ValueError, match="k must be > 0"):
        drs_slope(10, "decrease")
    with pytest.raises(ValueError, match="allowed: increase, decrease, const"):
        drs_slope(3, "linear")


def test_drs_transform():
    sim = torch.tensor([0.7, 0.6, 0.65])
    out = drs_transform(sim, torch.tensor([3, 7, 2]))
    assert out.tolist() == approx([sigmoid(13 * 0.05), sigmoid(25 * -0.05), 0.5])
    assert drs_transform(
        torch.tensor([0.75]), 4, k_mode="decrease", tau=0.5
    ).item() == pytest.approx(sigmoid(16 * 0.25))


def test_dar_two_groups_by_hand():
    ids = torch.tensor([0, 1, 0, 0])  # group 0 has three samples, group 1 one
    sim = torch.tensor([-0.5, 0.9, 0.1, 0.05])
    w = dar_group_weights(sim, ids)
    # g0: p = mean(0, 0.1, 0.05) = 0.05 -> (0.95 + 1e-6)^2; g1: p = 0.9 -> 0.01 -> clipped to 0.5
    w0, w1 = (0.95 + 1e-6) ** 2, 0.5
    m = (w0 + w1) / 2  # mean over groups, not samples
    assert w.tolist() == approx([w0 / m, w1 / m, w0 / m, w0 / m])
    # reference-count factor (n/3)^1: g0 has 6 refs (x2), g1 3 refs (x1); then w1/m < 0.5 -> 0.5
    wb = dar_group_weights(sim, ids, ref_count_beta=1.0, n_refs=torch.tensor([6, 3, 6, 6]))
    w0b = w0 * 2
    mb = (w0b + w1) / 2
    assert wb.tolist() == approx([w0b / mb, 0.5, w0b / mb, w0b / mb])
    with pytest.raises(ValueError, match="same for all samples of a group"):
        dar_group_weights(sim, ids, ref_count_beta=1.0, n_refs=torch.tensor([6, 3, 5, 6]))
    with pytest.raises(ValueError, match="n_refs is None"):
        dar_group_weights(sim, ids, ref_count_beta=1.0)
