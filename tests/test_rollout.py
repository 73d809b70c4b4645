"""Rollout: which steps are trained, what is recorded, and the path KL to the base."""

import torch

from flowdppo.rollout import in_chunks, initial_noise, rollout, sample, sample_with_path_kl
from flowdppo.samplers import SamplerConfig, get_sampler, trained_steps
from flowdppo.sde import flow_sde_step, gaussian_kl, log_prob, shifted_sigmas


def toy_velocity(x, sigma, cond):
    """Affine velocity with a per-sample offset from the condition."""
    return 0.8 * x - cond.view(-1, 1, 1, 1).float() * (1 - sigma.view(-1, 1, 1, 1))


def test_window_is_seeded_consecutive_and_in_range():
    cfg = SamplerConfig(window_mode="window", window_size=3, window_range=[1, 5])
    windows = [trained_steps(cfg, seed=0, epoch=e) for e in range(40)]
    assert windows[7] == trained_steps(cfg, seed=0, epoch=7)  # same on every process / on resume
    assert all(w == list(range(w[0], w[0] + 3)) and 1 <= w[0] < 5 for w in windows)
    assert len({w[0] for w in windows}) == 4  # every start in [1, 5) is drawn
    assert trained_steps(cfg, seed=1, epoch=7) != windows[7] or trained_steps(cfg, 1, 8) != windows[8]


def test_random_steps_and_all_steps():
    cfg = SamplerConfig(window_mode="random", window_size=3, window_range=[0, 5])
    for epoch in range(20):
        steps = trained_steps(cfg, seed=0, epoch=epoch)
        assert len(set(steps)) == 3 and steps == sorted(steps) and all(0 <= s < 5 for s in steps)
    assert trained_steps(SamplerConfig(window_mode="all", num_steps=6), 0, 0) == list(range(6))
    assert trained_steps(SamplerConfig(window_mode="all", num_steps=6, kind="cps"), 0, 0) == list(range(5))
    assert trained_steps(SamplerConfig(num_steps=6, kind="ode"), 0, 0) == []  # an ODE sampler has none


def test_progressive_window_slides_then_stays():
    """MixGRPO's schedule: W consecutive steps from lo, one step later every window_shift_every epochs."""
    cfg = SamplerConfig(window_mode="progressive", window_size=2, window_range=[1, 4], window_shift_every=3)
    starts = [trained_steps(cfg, seed=0, epoch=e)[0] for e in range(15)]
    assert starts == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3]
    assert all(trained_steps(cfg, 5, e) == [s, s + 1] for e, s in enumerate(starts))  # the seed plays no part


def test_group_shared_noise_repeats_one_draw_per_group_and_slices_rows():
    shape, gen = (1, 2, 2), torch.Generator()
    cfg = SamplerConfig(group_shared_noise=True)
    whole = initial_noise(gen.manual_seed(0), cfg, 3, 4, slice(None), shape, "cpu")
    assert whole.shape == (12, 1, 2, 2)
    for g in range(3):
        assert all(torch.equal(whole[4 * g], whole[4 * g + j]) for j in range(4))
    assert not torch.equal(whole[0], whole[4])
    assert torch.equal(initial_noise(gen.manual_seed(0), cfg, 3, 4, slice(4, 8), shape, "cpu"), whole[4:8])
    independent = initial_noise(gen.manual_seed(0), SamplerConfig(), 3, 4, slice(None), shape, "cpu")
    assert not torch.equal(independent[0], independent[1])


def test_rollout_records_the_sampler_transitions():
    cfg = SamplerConfig(kind="flow_sde", eta=0.7, num_steps=6)
    cond = torch.tensor([0, 1, 2, 3])
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    sigmas = shifted_sigmas(6)
    traj = rollout(toy_velocity, cond, x, sigmas, cfg, [1, 2], generator=torch.Generator().manual_seed(1))
    assert traj.latents.shape == (2, 4, 1, 3, 3) and traj.log_probs.shape == (2, 4)
    for t, i in enumerate([1, 2]):
        sigma = sigmas[i].expand(4)
        step = flow_sde_step(
            traj.latents[t], toy_velocity(traj.latents[t], sigma, cond), sigmas[i], sigmas[i + 1], 0.7, sigmas[1]
        )
        torch.testing.assert_close(traj.means[t], step.mean)
        torch.testing.assert_close(traj.stds[t], step.std.expand(4))
        torch.testing.assert_close(traj.log_probs[t], log_prob(traj.next_latents[t], step.mean, step.std))
    torch.testing.assert_close(traj.latents[1], traj.next_latents[0])  # consecutive window
    assert traj.step_index.tolist() == [1, 2]
    assert torch.equal(traj.step_sigma, sigmas[[1, 2]]) and torch.equal(traj.step_sigma_next, sigmas[[2, 3]])


def test_rollout_without_trained_steps_is_plain_euler():
    cfg = SamplerConfig(num_steps=8)
    cond = torch.tensor([1, 2])
    x = torch.randn(2, 1, 4, 4)
    sigmas = shifted_sigmas(8)
    traj = rollout(toy_velocity, cond, x, sigmas, cfg, [], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(traj.final, sample(toy_velocity, cond, x, sigmas))


def cps_kl_for_constant_velocity_gap(i, sigmas, gap=0.1, eta=0.8):
    """Per-step KL of CPS when the base velocity is the policy's plus ``gap``: the mean is linear in v,

    ``d mean / d v = -(1 - s') s + sqrt(s'^2 - std^2) (1 - s)``, so D = (coef * gap)^2 / (2 std^2)."""
    s, s_next = sigmas[i], sigmas[i + 1]
    std = s_next * torch.sin(torch.tensor(eta * torch.pi / 2))
    coef = -(1 - s_next) * s + torch.sqrt(s_next**2 - std**2) * (1 - s)
    return (coef * gap) ** 2 / (2 * std**2), std


def test_path_kl_to_base():
    """Zero for the same velocity; otherwise the sum over trained steps of mean (dmu)^2 / (2 std^2)."""
    cfg = SamplerConfig(kind="cps", eta=0.8, num_steps=6)
    cond = torch.tensor([1, 2, 3])
    x = torch.randn(3, 1, 4, 4)
    sigmas = shifted_sigmas(6)

    def base(x, sigma, cond):
        return toy_velocity(x, sigma, cond) + 0.1

    same = rollout(
        toy_velocity,
        cond,
        x,
        sigmas,
        cfg,
        [0, 3],
        generator=torch.Generator().manual_seed(0),
        base_velocity=toy_velocity,
    )
    assert torch.equal(same.kl_to_base, torch.zeros(3))
    traj = rollout(
        toy_velocity, cond, x, sigmas, cfg, [0, 3], generator=torch.Generator().manual_seed(0), base_velocity=base
    )
    for t, i in enumerate([0, 3]):
        torch.testing.assert_close(traj.stds[t], cps_kl_for_constant_velocity_gap(i, sigmas)[1].expand(3))
    expected = sum(cps_kl_for_constant_velocity_gap(i, sigmas)[0] for i in (0, 3))
    torch.testing.assert_close(traj.kl_to_base, expected.expand(3))
    # measured over every stochastic step (ODE steps included), not only the trained ones
    full = rollout(
        toy_velocity,
        cond,
        x,
        sigmas,
        cfg,
        [0, 3],
        generator=torch.Generator().manual_seed(0),
        base_velocity=base,
        kl_steps=range(5),
    )
    expected = sum(cps_kl_for_constant_velocity_gap(i, sigmas)[0] for i in range(5))
    torch.testing.assert_close(full.kl_to_base, expected.expand(3))


def test_path_kl_of_an_ode_rollout_is_measured_in_the_named_kernel():
    """An ODE rollout with kl_kernel=flow_sde: the Flow-SDE D at its default eta 0.7, along the ODE path."""
    cfg = SamplerConfig(kind="ode", kl_kernel="flow_sde", num_steps=5)
    cond, x, sigmas = torch.tensor([1, 2]), torch.randn(2, 1, 3, 3), shifted_sigmas(5)

    def base(x, sigma, cond):
        return toy_velocity(x, sigma, cond) + 0.1

    traj = rollout(toy_velocity, cond, x, sigmas, cfg, [], generator=None, base_velocity=base, kl_steps=range(5))
    assert traj.num_elements == 0
    expected, xi = torch.zeros(2), x
    for i in range(5):
        s = toy_velocity(xi, sigmas[i].expand(2), cond)
        ours = flow_sde_step(xi, s, sigmas[i], sigmas[i + 1], 0.7, sigmas[1])
        theirs = flow_sde_step(xi, s + 0.1, sigmas[i], sigmas[i + 1], 0.7, sigmas[1])
        expected += gaussian_kl(ours.mean, theirs.mean, ours.std)
        xi = get_sampler("ode").step(xi, s, sigmas[i], sigmas[i + 1], 0.0, sigmas[1]).mean
    torch.testing.assert_close(traj.kl_to_base, expected)
    torch.testing.assert_close(traj.final, xi)


def test_evaluation_path_kl_is_the_closed_form_flow_sde_kl_along_the_ode_samples():
    """A constant velocity gap c: each Flow-SDE step's D = c^2 k^2 (-dt) / (2 g^2), k = 1 + g^2 (1 - s) / (2 s),
    g = 0.7 sqrt(s / (1 - s')), over all 6 steps; the samples are plain Euler's."""
    cond, x, sigmas = torch.tensor([1, 2]), torch.randn(2, 1, 3, 3), shifted_sigmas(6, 3.0)

    def base(x, sigma, cond):
        return toy_velocity(x, sigma, cond) + 0.1

    samples, kl = sample_with_path_kl(toy_velocity, base, cond, x, sigmas)
    expected = 0.0
    for i in range(6):
        s, dt = sigmas[i].double(), (sigmas[i + 1] - sigmas[i]).double()
        g2 = 0.49 * s / (1 - (sigmas[1].double() if s >= 1 else s))
        expected += 0.01 * (1 + g2 * (1 - s) / (2 * s)) ** 2 * (-dt) / (2 * g2)
    torch.testing.assert_close(kl, expected.float().expand(2))
    torch.testing.assert_close(samples, sample(toy_velocity, cond, x, sigmas), rtol=0, atol=0)
    assert torch.equal(sample_with_path_kl(toy_velocity, toy_velocity, cond, x, sigmas)[1], torch.zeros(2))


def test_chunked_velocity_and_custom_schedule():
    """``in_chunks`` gives the same rollout in pieces; a given ``sigmas`` schedule is the one run and recorded."""
    cfg = SamplerConfig(num_steps=4)
    cond, x = torch.tensor([0, 1, 2, 3, 4]), torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([1.0, 0.9, 0.6, 0.2, 0.0])
    calls = []

    def counting(x, sigma, cond):
        calls.append(len(x))
        return toy_velocity(x, sigma, cond)

    whole = rollout(toy_velocity, cond, x, sigmas, cfg, [1, 2], generator=torch.Generator().manual_seed(1))
    parts = rollout(in_chunks(counting, 2), cond, x, sigmas, cfg, [1, 2], generator=torch.Generator().manual_seed(1))
    assert calls == [2, 2, 1] * 4
    torch.testing.assert_close(parts.final, whole.final, atol=0, rtol=0)
    assert torch.equal(whole.sigmas, sigmas) and torch.equal(whole.step_sigma, sigmas[[1, 2]])
    torch.testing.assert_close(
        sample(toy_velocity, cond, x, sigmas), rollout(toy_velocity, cond, x, sigmas, cfg, []).final
    )
