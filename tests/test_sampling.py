"""Sigma schedules and ODE/SDE steps against hand-computed values."""

import math

import pytest
import torch

from refrl.sampling import ode_step, sde_step, sigma_schedule, x0_from_velocity

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _gauss_logp(xs, mus, std):
    """Average of the 1-D Gaussian log-densities, plain Python."""
    terms = [
        -((x - m) ** 2) / (2 * std**2) - math.log(std) - LOG_SQRT_2PI
        for x, m in zip(xs, mus, strict=True)
    ]
    return sum(terms) / len(terms)


# One sample with two elements, shared by the hand computations below.
X = [1.0, -2.0]
V = [0.5, 1.0]


def _xv():
    return torch.tensor([X]), torch.tensor([V])


def test_schedule_uniform_and_shift():
    assert torch.allclose(sigma_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # shift 3: s' = 3s / (1 + 2s): 0.75 -> 2.25/2.5, 0.5 -> 1.5/2, 0.25 -> 0.75/1.5
    assert torch.allclose(sigma_schedule(4, shift=3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    # sigma_min is the last non-zero unshifted sigma
    assert torch.allclose(sigma_schedule(3, sigma_min=0.1), torch.tensor([1.0, 0.55, 0.1, 0.0]))
    assert torch.equal(sigma_schedule(1), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 7.0])
def test_schedule_endpoints_monotonic(shift):
    s = sigma_schedule(10, shift=shift)
    assert s.shape == (11,)
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert bool((s[1:] < s[:-1]).all())


def test_schedule_shift_moves_steps_to_high_noise():
    plain, shifted = sigma_schedule(10), sigma_schedule(10, shift=3.0)
    assert bool((shifted[1:-1] > plain[1:-1]).all())


def test_schedule_errors():
    with pytest.raises(ValueError, match="num_steps"):
        sigma_schedule(0)
    with pytest.raises(ValueError, match="shift"):
        sigma_schedule(4, shift=0.0)
    with pytest.raises(ValueError, match="sigma_min"):
        sigma_schedule(4, sigma_min=1.0)


def test_ode_step_and_x0():
    x, v = _xv()
    assert torch.allclose(
        ode_step(x, v, 0.75, 0.5), torch.tensor([[1.0 - 0.25 * 0.5, -2.0 - 0.25 * 1.0]])
    )
    assert torch.allclose(x0_from_velocity(x, v, 0.5), torch.tensor([[0.75, -2.5]]))
    # x0 and ODE step agree with the flow convention: stepping to sigma=0 lands on x0
    assert torch.allclose(ode_step(x, v, 0.5, 0.0), x0_from_velocity(x, v, 0.5))


def test_flow_sde_hand_values():
    x, v = _xv()
    a, s, sn = 0.7, 0.5, 0.25
    dt = sn - s
    st = a * math.sqrt(s / (1 - s))
    mus = [
        xi * (1 + st**2 * dt / (2 * s)) + vi * (1 + st**2 * (1 - s) / (2 * s)) * dt
        for xi, vi in zip(X, V, strict=True)
    ]
    assert mus == pytest.approx([0.721875, -2.06625])  # literal hand values
    std = st * math.sqrt(-dt)
    prev = torch.tensor([[0.8, -2.0]])
    out, logp, mean, sd = sde_step("flow-sde", x, v, s, sn, a, prev_sample=prev)
    assert out is prev
    assert torch.allclose(mean, torch.tensor([mus]))
    assert sd.shape == (1, 1) and sd.item() == pytest.approx(0.35)
    assert logp.shape == (1,)
    assert logp.item() == pytest.approx(_gauss_logp([0.8, -2.0], mus, std), rel=1e-6)


def test_flow_sde_at_sigma_one_uses_first_sigma_below_one():
    x, v = _xv()
    a, sn = 0.7, 0.9
    # default: sigma in the (1 - sigma) denominator replaced by sigma_next (Flow-GRPO's sigmas[1])
    st = a * math.sqrt(1.0 / (1 - sn))
    _, _, mean, sd = sde_step("flow-sde", x, v, 1.0, sn, a, prev_sample=x)
    assert sd.item() == pytest.approx(st * math.sqrt(0.1), rel=1e-6)
    dt = sn - 1.0
    expect = [xi * (1 + st**2 * dt / 2) + vi * dt for xi, vi in zip(X, V, strict=True)]
    assert torch.allclose(mean, torch.tensor([expect]))
    _, _, _, sd2 = sde_step("flow-sde", x, v, 1.0, sn, a, prev_sample=x, sigma_max=0.95)
    assert sd2.item() == pytest.approx(a * math.sqrt(1 / 0.05) * math.sqrt(0.1), rel=1e-6)
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step("flow-sde", x, v, 1.0, sn, a, sigma_max=1.0)


def test_dance_sde_hand_values():
    x, v = _xv()
    eta, s, sn = 0.3, 0.5, 0.25
    # x0 = [0.75, -2.5]; score = -(x - x0*(1-s))/s^2 = [-2.5, 3.0]
    mus = [1.0 - 0.125 - 0.5 * 0.09 * (-2.5) * (-0.25), -2.0 - 0.25 - 0.5 * 0.09 * 3.0 * (-0.25)]
    assert mus == pytest.approx([0.846875, -2.21625])
    prev = torch.tensor([[0.9, -2.3]])
    _, logp, mean, sd = sde_step("dance-sde", x, v, s, sn, eta, prev_sample=prev)
    assert torch.allclose(mean, torch.tensor([mus]))
    assert sd.item() == pytest.approx(0.15)
    assert logp.item() == pytest.approx(_gauss_logp([0.9, -2.3], mus, 0.15), rel=1e-6)


def test_cps_hand_values():
    x, v = _xv()
    a, s, sn = 0.7, 0.5, 0.25
    std = sn * math.sin(a * math.pi / 2)
    x0, x1 = [0.75, -2.5], [1.25, -1.5]  # x - s v, x + (1 - s) v
    c = math.sqrt(sn**2 - std**2)
    mus = [p * (1 - sn) + q * c for p, q in zip(x0, x1, strict=True)]
    prev = torch.tensor([[0.5, -2.0]])
    _, logp, mean, sd = sde_step("cps", x, v, s, sn, a, prev_sample=prev)
    assert torch.allclose(mean, torch.tensor([mus]))
    assert sd.item() == pytest.approx(std, rel=1e-6)
    assert logp.item() == pytest.approx(_gauss_logp([0.5, -2.0], mus, std), rel=1e-6)


@pytest.mark.parametrize("kind", ["flow-sde", "dance-sde", "cps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rescoring_a_drawn_sample_gives_its_log_prob(kind, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g).to(dtype)
    v = torch.randn(3, 2, 4, 4, generator=g).to(dtype)
    prev, logp, mean, std = sde_step(
        kind, x, v, 0.6, 0.4, 0.7, generator=torch.Generator().manual_seed(1)
    )
    assert prev.dtype == dtype and logp.dtype == torch.float32 and mean.dtype == torch.float32
    _, logp2, _, _ = sde_step(kind, x, v, 0.6, 0.4, 0.7, prev_sample=prev)
    assert torch.equal(logp, logp2)
    if dtype == torch.float32:
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(prev, mean + std * noise, atol=1e-6)


@pytest.mark.parametrize("kind", ["flow-sde", "dance-sde", "cps"])
def test_per_sample_sigma_matches_float_sigma(kind):
    g = torch.Generator().manual_seed(2)
    x, v, prev = (torch.randn(3, 2, 3, generator=g) for _ in range(3))
    sig, sig_next = [1.0, 0.7, 0.4], [0.8, 0.5, 0.1]
    _, logp, mean, std = sde_step(
        kind, x, v, torch.tensor(sig), torch.tensor(sig_next), 0.5, prev_sample=prev
    )
    assert std.shape == (3, 1, 1)
    for i in range(3):
        _, lp_i, m_i, s_i = sde_step(
            kind, x[i : i + 1], v[i : i + 1], sig[i], sig_next[i], 0.5, prev_sample=prev[i : i + 1]
        )
        assert torch.allclose(logp[i : i + 1], lp_i)
        assert torch.allclose(mean[i : i + 1], m_i)
        assert torch.allclose(std[i], s_i[0])


def test_log_prob_is_a_mean_not_a_sum():
    # at the mean the average log-density is -log(std) - log(sqrt(2 pi)) whatever the size
    for shape in [(2, 1), (2, 3, 8, 8)]:
        x, v = torch.zeros(shape), torch.ones(shape)
        _, _, mean, std = sde_step("dance-sde", x, v, 0.5, 0.25, 0.3, prev_sample=x)
        _, logp, _, _ = sde_step("dance-sde", x, v, 0.5, 0.25, 0.3, prev_sample=mean)
        expect = -math.log(0.15) - LOG_SQRT_2PI
        assert torch.allclose(logp, torch.full((2,), expect))


def test_log_prob_has_gradient_through_velocity():
    x = torch.randn(2, 3)
    v = torch.randn(2, 3, requires_grad=True)
    prev = torch.randn(2, 3)
    _, logp, _, _ = sde_step("flow-sde", x, v, 0.5, 0.3, 0.7, prev_sample=prev)
    logp.sum().backward()
    assert v.grad is not None and bool((v.grad != 0).any())


def test_sde_errors():
    x, v = _xv()
    with pytest.raises(ValueError, match="allowed: flow-sde, dance-sde, cps"):
        sde_step("ddim", x, v, 0.5, 0.25, 0.7)
    with pytest.raises(ValueError, match="std <= 0"):
        sde_step("cps", x, v, 0.25, 0.0, 0.7)  # cps cannot make the final step stochastic
    with pytest.raises(ValueError, match="sigma must be"):
        sde_step("dance-sde", x, v, torch.tensor([0.5, 0.4]), 0.25, 0.3)
    with pytest.raises(ValueError, match="noise_level"):
        sde_step("dance-sde", x, v, 0.5, 0.25, 0.0)
