"""Likelihood-free algorithms (DiffusionNFT, AWM) against hand-derived gradients, limits and mappings."""

from functools import partial

import pytest
import torch
from torch import Tensor

from flowdppo.algorithms.awm import AWM, matching_log_prob
from flowdppo.algorithms.diffusion_nft import DiffusionNFT, nft_loss, optimality_weight, x0_error
from flowdppo.algorithms.likelihood_free import SlowWeights, mean_squared, noise_levels, noised_elements
from flowdppo.config import load_config
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
    """d/dtheta of c (r L(v+) + (1 - r) L(v-)) / b with v+- linear in theta and the weights held constant."""
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
        expected += c * (weight * 2 * error * (-s * sign * b * u) / w).flatten(1).mean(1).sum() / b
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_nft_small_b_limit_is_the_advantage_weighted_matching_gradient():
    """As b -> 0 (on-policy, v = v_old) the gradient becomes c (2r - 1) * grad L(v): descend on good samples,
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
    torch.testing.assert_close(grad, 5.0 * ((2 * r - 1) * plain).sum(), rtol=1e-5, atol=1e-9)


def test_nft_with_the_best_advantage_and_b_one_is_plain_x0_matching():
    u, x0, _, sigma, noised = linear_toy(2)
    v = 0.8 * u
    loss, r = nft_loss(v, 0.2 * u, noised, sigma, x0, torch.full((E,), 5.0, dtype=torch.float64), 1.0, 5.0)
    assert torch.equal(r, torch.ones(E, dtype=torch.float64))
    torch.testing.assert_close(loss, 5.0 * x0_error(noised, sigma, v, x0))


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
    # AWM's public recipe: 14 steps, 6 levels, timestep_fraction 0.9 -> strata of linspace(1, 12, 7).long()
    fourteen = torch.linspace(1, 0, 15)
    public = noise_levels("stratified", fourteen, 6, 400, gen, fraction=0.9)
    for row, (lo, hi) in zip(public, [(1, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)], strict=True):
        assert set(row.tolist()) == set(fourteen[lo:hi].tolist())
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


def test_nft_loss_is_c_times_the_weighted_x0_errors_over_b():
    """The public code's ``(ori_policy_loss * adv_clip_max).mean()``: the factor c, by hand."""
    u, x0, _, sigma, noised = linear_toy(6)
    v, v_old = 0.9 * u, 0.4 * u - 0.2
    adv = torch.tensor([2.0, -1.0, 0.0, 6.0, -3.0, 0.5], dtype=torch.float64)
    b, c = 0.5, 2.0
    loss, _ = nft_loss(v, v_old, noised, sigma, x0, adv, b, c)
    s = sigma.view(-1, 1, 1, 1)

    def error(w):
        e = (noised - s * w - x0).flatten(1)
        return e.pow(2).mean(1) / e.abs().mean(1)

    r = adv.clamp(-c, c) / (2 * c) + 0.5
    expected = c * (r * error(b * v + (1 - b) * v_old) + (1 - r) * error((1 + b) * v_old - b * v)) / b
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


class ToyVelocity(torch.nn.Module):
    """v = theta * x + 0.1 * cond: one trainable parameter, called as a policy (with ``guidance_scale``)."""

    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta))

    def forward(self, x, sigma, cond, guidance_scale=1.0):
        return self.theta * x + 0.1 * cond.view(-1, 1, 1, 1).to(x.dtype)


def toy_trajectory(batch: int, num_steps: int) -> Trajectory:
    empty = torch.zeros(0)
    return Trajectory(
        cond=torch.arange(batch) % 3,
        final=torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(7)),
        step_index=empty,
        step_sigma=empty,
        step_sigma_next=empty,
        latents=empty,
        next_latents=empty,
        means=empty,
        stds=empty,
        log_probs=torch.zeros(0, batch),
        sigmas=torch.linspace(1, 0, num_steps + 1),
    )


def algorithm_on_toy(cls, method: str, overrides: list[str], batch: int = 8, moved: float = 0.0):
    """``cls`` set up on a ToyVelocity at theta 0.7, then moved by ``moved`` (its slow copy stays at 0.7), with
    the elements of a toy rollout; (algorithm, policy, trajectory, elements)."""
    cfg = load_config(method, overrides=overrides)
    algorithm, policy = cls(cfg), ToyVelocity(0.7)
    algorithm.setup(policy)
    with torch.no_grad():
        policy.theta.add_(moved)
    traj = toy_trajectory(batch, cfg.sampler.num_steps)
    adv = torch.linspace(-6, 6, batch)
    elements = algorithm.elements(traj, adv, policy, torch.Generator().manual_seed(0), Distributed())
    return algorithm, policy, traj, elements


def test_nft_loss_weighs_the_base_kl_by_beta_against_c_times_the_policy_term():
    algorithm, policy, traj, elements = algorithm_on_toy(DiffusionNFT, "diffusion_nft", ["loss.beta=0.01"])
    mb = elements.data
    cond = traj.cond[mb["sample"]]
    base = ToyVelocity(0.2)
    loss, metrics = algorithm.loss(partial(policy), partial(base), mb, cond, True, Distributed())
    v = policy(mb["noised"], mb["sigma"], cond)
    per_element, _ = nft_loss(v, mb["v_old"], mb["noised"], mb["sigma"], mb["x0"], mb["advantages"], 1.0, 1.0)
    v_ref = base(mb["noised"], mb["sigma"], cond).detach()
    expected = 5.0 * per_element.mean() + 0.01 * mean_squared(v, v_ref).mean()  # c = nft.adv_clip_max = 5
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["policy_loss"], 5.0 * per_element.mean().detach())


def awm_hand_loss(theta: Tensor, mb: dict, cond, beta: float, ema_kl: float, base_theta: float) -> Tensor:
    """AWM's preset loss by hand: the PPO clip of the ghuber matching ratio, A / 5, plus the KL terms."""
    v = theta * mb["noised"] + 0.1 * cond.view(-1, 1, 1, 1)
    target = mb["eps"] - mb["x0"]
    log_ratio = matching_log_prob(v, target, mb["sigma"]) - mb["log_probs"]
    policy_term = ppo_clip(log_ratio, mb["advantages"].double().clamp(-5, 5) / 5, 1.0)[0].mean().float()
    v_ref = base_theta * mb["noised"] + 0.1 * cond.view(-1, 1, 1, 1)
    ema = ema_kl * mean_squared(v, mb["v_ema"]).mean() if ema_kl else 0.0
    return policy_term + beta * mean_squared(v, v_ref).mean() + ema


@pytest.mark.parametrize("beta", [0.0, 1e-4])
def test_awm_adds_the_ema_kl_only_with_the_base_kl_as_the_public_code(beta):
    """``loss.beta=0`` trains the policy term alone (no EMA forward either); ``beta > 0`` adds both KL terms."""
    algorithm, policy, traj, elements = algorithm_on_toy(AWM, "awm", [f"loss.beta={beta}"], moved=0.3)
    mb = elements.data
    assert ("v_ema" in mb) == (beta > 0)
    cond = traj.cond[mb["sample"]]
    loss, metrics = algorithm.loss(partial(policy), partial(ToyVelocity(0.2)), mb, cond, True, Distributed())
    assert ("ema_kl" in metrics) == (beta > 0)
    (grad,) = torch.autograd.grad(loss, policy.theta)
    theta = policy.theta.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(awm_hand_loss(theta, mb, cond, beta, 1.0 if beta else 0.0, 0.2), theta)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-8)
    if beta:  # the EMA term is there: the policy term's gradient alone is another one
        (alone,) = torch.autograd.grad(awm_hand_loss(theta, mb, cond, 0.0, 0.0, 0.2), theta)
        assert not torch.allclose(grad, alone, rtol=1e-3)


def test_awm_never_trains_the_steps_from_int_k_times_the_timestep_fraction():
    """10 steps at the public 0.9: indices 1..8, never 0 or 9; with fraction 1 index 9 is trained too."""
    sigmas = torch.linspace(1, 0, 11)
    _, _, _, elements = algorithm_on_toy(AWM, "awm", [], batch=64)
    assert set(elements.data["sigma"].tolist()) == set(sigmas[1:9].tolist())
    _, _, _, every = algorithm_on_toy(AWM, "awm", ["awm.timestep_fraction=1"], batch=64)
    assert set(every.data["sigma"].tolist()) == set(sigmas[1:10].tolist())
