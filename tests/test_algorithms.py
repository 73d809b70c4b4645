"""Likelihood-free algorithms (DiffusionNFT, AWM) against hand-derived gradients, limits and mappings."""

import pytest
import torch

from flowdppo.algorithms.awm import matching_log_prob
from flowdppo.algorithms.diffusion_nft import nft_loss, optimality_weight, x0_error
from flowdppo.algorithms.likelihood_free import SlowWeights, noise_levels, noised_elements
from flowdppo.distributed import Distributed
from flowdppo.losses import ppo_clip
from flowdppo.rollout import Trajectory

E, SHAPE = 6, (1, 3, 3)


def linear_toy(seed=0):
    """v = theta * u, a one-parameter velocity model; noised samples, targets and a rollout velocity."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(E, *SHAPE, generator=gen, dtype=torch.float64)
    x0 = torch.randn(E, *SHAPE, generator=gen, dtype=torch.float64)
    eps = torch.randn(E, *SHAPE, generator=gen, dtype=torch.float64)
    sigma = torch.rand(E, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    noised = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    return u, x0, eps, sigma, noised


def test_optimality_weight_maps_advantages_to_unit_interval():
    a = torch.tensor([-9.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0])
    torch.testing.assert_close(optimality_weight(a, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


def test_nft_gradient_matches_hand_derivation_on_a_linear_model():
    """d/dtheta of (r L(v+) + (1 - r) L(v-)) / b with v+- linear in theta and the weights held constant."""
    u, x0, _, sigma, noised = linear_toy()
    v_old = 0.3 * u + 0.1
    adv = torch.tensor([3.0, -1.0, 0.0, 5.0, -7.0, 1.5], dtype=torch.float64)
    b, c = 0.4, 5.0
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    loss, r = nft_loss(theta * u, v_old, noised, sigma, x0, adv, b, c)
    (grad,) = torch.autograd.grad(loss.sum(), theta)
    s = sigma.view(-1, 1, 1, 1)
    expected = torch.zeros((), dtype=torch.float64)
    r = (adv.clamp(-c, c) / (2 * c) + 0.5).view(-1, 1, 1, 1)
    for sign, weight, v in ((1.0, r, b * 0.7 * u + (1 - b) * v_old), (-1.0, 1 - r, (1 + b) * v_old - b * 0.7 * u)):
        error = noised - s * v - x0
        w = error.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
        # dL/dtheta = mean(2 e * de/dtheta) / w, de/dtheta = -s * (+-b) u
        expected += (weight * 2 * error * (-s * sign * b * u) / w).flatten(1).mean(1).sum() / b
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_nft_small_b_limit_is_the_advantage_weighted_matching_gradient():
    """As b -> 0 (on-policy, v = v_old) the gradient becomes (2r - 1) * grad L(v): descend on good samples,
    ascend on bad ones."""
    u, x0, _, sigma, noised = linear_toy(1)
    adv = torch.tensor([5.0, -5.0, 2.0, 0.0, -1.0, 4.0], dtype=torch.float64)
    theta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    loss, r = nft_loss(theta * u, (0.5 * u).detach(), noised, sigma, x0, adv, 1e-7, 5.0)
    (grad,) = torch.autograd.grad(loss, theta, torch.ones(E, dtype=torch.float64))
    plain = torch.stack(
        [
            torch.autograd.grad(
                x0_error(noised[i : i + 1], sigma[i : i + 1], theta * u[i : i + 1], x0[i : i + 1]).sum(), theta
            )[0]
            for i in range(E)
        ]
    )
    torch.testing.assert_close(grad, ((2 * r - 1) * plain).sum(), rtol=1e-5, atol=1e-9)


def test_nft_with_the_best_advantage_and_b_one_is_plain_x0_matching():
    u, x0, _, sigma, noised = linear_toy(2)
    v = 0.8 * u
    loss, r = nft_loss(v, 0.2 * u, noised, sigma, x0, torch.full((E,), 5.0, dtype=torch.float64), 1.0, 5.0)
    assert torch.equal(r, torch.ones(E, dtype=torch.float64))
    torch.testing.assert_close(loss, x0_error(noised, sigma, v, x0))


def test_x0_error_is_normalised_by_its_detached_mean_absolute_value():
    u, x0, _, sigma, noised = linear_toy(3)
    error = (noised - sigma.view(-1, 1, 1, 1) * u - x0).flatten(1)
    expected = error.pow(2).mean(1) / error.abs().mean(1)
    torch.testing.assert_close(x0_error(noised, sigma, u, x0), expected)


def test_awm_log_prob_weightings():
    u, x0, eps, sigma, _ = linear_toy(4)
    target = eps - x0
    mse = ((u - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(matching_log_prob(u, target, sigma, "uniform"), -mse)
    torch.testing.assert_close(matching_log_prob(u, target, sigma, "t"), -sigma * mse)
    expected = -sigma * ((mse + 1e-10) ** 0.25 - 1e-10**0.25) / 0.25
    torch.testing.assert_close(matching_log_prob(u, target, sigma, "ghuber", 0.25), expected)
    with pytest.raises(ValueError, match="weighting must be one of"):
        matching_log_prob(u, target, sigma, "l1")


def test_awm_gradient_at_ratio_one_is_advantage_weighted_flow_matching():
    """At theta = theta_old the clipped loss -A rho has gradient -A d lp / dtheta; with uniform weighting
    d lp / dtheta = -mean(2 (theta u - (eps - x0)) u)."""
    u, x0, eps, sigma, _ = linear_toy(5)
    target = eps - x0
    adv = torch.tensor([1.0, -0.5, 0.2, -1.0, 0.0, 0.7], dtype=torch.float64)
    theta = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    log_prob_old = matching_log_prob((0.6 * u).detach(), target, sigma, "uniform")
    log_ratio = matching_log_prob(theta * u, target, sigma, "uniform") - log_prob_old
    loss, clipped = ppo_clip(log_ratio, adv, 1.0)
    assert not clipped.any() and torch.equal(log_ratio.detach(), torch.zeros(E, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss.sum(), theta)
    d_lp = -(2 * (0.6 * u - target) * u).flatten(1).mean(1)
    torch.testing.assert_close(grad, (-adv * d_lp).sum(), rtol=1e-10, atol=1e-12)


def test_slow_weights_decay_swap_and_restore():
    model = torch.nn.Linear(2, 2)
    slow = SlowWeights(model, decay_rate=0.1, decay_max=0.3)
    start = [p.detach().clone() for p in model.parameters()]
    assert slow.equals(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not slow.equals(model)
    slow.update(model, steps=2)  # d = 0.2: 0.2 * w_slow + 0.8 * w
    for s, w0, p in zip(slow.weights, start, model.parameters(), strict=True):
        torch.testing.assert_close(s, 0.2 * w0 + 0.8 * p.detach())
    assert slow.decay(100) == 0.3
    current = [p.detach().clone() for p in model.parameters()]
    with slow.swapped_in(model):
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), slow.weights, strict=True))
    assert all(torch.equal(p, c) for p, c in zip(model.parameters(), current, strict=True))
    state = slow.state_dict("old")
    other = SlowWeights(model, 0.1, 0.3)
    other.load_state_dict(state, "old")
    assert all(torch.equal(a, b) for a, b in zip(other.weights, slow.weights, strict=True))


def test_noise_levels_come_from_the_schedule():
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.0])
    gen = torch.Generator().manual_seed(0)
    levels = noise_levels("schedule", sigmas, 4, 50, gen)
    assert levels.shape == (4, 50)
    assert all(len(set(levels[:, b].tolist())) == 4 for b in range(50))  # distinct per sample
    assert set(levels.flatten().tolist()) <= set(sigmas[:-1].tolist())
    strata = noise_levels("stratified", sigmas, 2, 200, gen)  # indices 1..5 in strata {1, 2}, {3, 4, 5}
    assert set(strata[0].tolist()) == set(sigmas[[1, 2]].tolist())
    assert set(strata[1].tolist()) == set(sigmas[[3, 4, 5]].tolist())
    assert set(noise_levels("stratified", sigmas, 5, 20, gen).T[0].tolist()) == set(sigmas[1:6].tolist())
    uniform = noise_levels("uniform", sigmas, 3, 100, gen)
    assert uniform.min() >= 0.1 and uniform.max() <= 1.0 and len(set(uniform.flatten().tolist())) == 300


def test_noised_elements_are_forward_noised_and_split_across_processes_as_one():
    x0 = torch.randn(8, *SHAPE)
    traj = Trajectory(
        cond=torch.arange(8),
        final=x0,
        step_index=torch.zeros(0),
        step_sigma=torch.zeros(0),
        step_sigma_next=torch.zeros(0),
        latents=torch.zeros(0),
        next_latents=torch.zeros(0),
        means=torch.zeros(0),
        stds=torch.zeros(0),
        log_probs=torch.zeros(0, 8),
        sigmas=torch.linspace(1, 0, 6),
    )
    adv = torch.arange(8.0)
    whole = noised_elements(traj, adv, "schedule", 3, torch.Generator().manual_seed(1), Distributed())
    d = whole.data
    s = d["sigma"].view(-1, 1, 1, 1)
    torch.testing.assert_close(d["noised"], (1 - s) * d["x0"] + s * d["eps"])
    assert (whole.steps, whole.batch) == (3, 8) and d["sample"].tolist() == list(range(8)) * 3
    assert torch.equal(d["advantages"], adv[d["sample"]])
    for rank in (0, 1):  # process `rank` of 2 holds rows 4 * rank .. 4 * rank + 3 of the same draw
        rows = slice(4 * rank, 4 * rank + 4)
        half = Trajectory(**{**traj.__dict__, "cond": traj.cond[rows], "final": x0[rows]})
        part = noised_elements(
            half, adv[rows], "schedule", 3, torch.Generator().manual_seed(1), Distributed(rank=rank, world_size=2)
        ).data
        mine = torch.cat([torch.arange(4) + 8 * t + 4 * rank for t in range(3)])
        assert torch.equal(part["eps"], d["eps"][mine]) and torch.equal(part["sigma"], d["sigma"][mine])
