"""Sampler kernels, log-densities and the exact divergence against independent computations."""

import math

import pytest
import torch

from flowdppo.samplers import get_sampler
from flowdppo.sde import (
    cps_step,
    dance_sde_step,
    flow_sde_step,
    gaussian_kl,
    log_prob,
    ode_step,
    shifted_sigmas,
)

# Closed-form toy: x0 ~ N(M, C^2) per element, eps ~ N(0, 1), x_sigma = (1 - sigma) x0 + sigma eps.
M, C = 1.5, 0.5


def marginal_var(sigma):
    return (1 - sigma) ** 2 * C**2 + sigma**2


def exact_velocity(x, sigma):
    """E[eps - x0 | x_sigma = x] for the Gaussian toy (Gaussian conditioning, float64)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    r = x - (1 - sigma) * M
    x0_hat = M + (1 - sigma) * C**2 / marginal_var(sigma) * r
    eps_hat = sigma / marginal_var(sigma) * r
    return eps_hat - x0_hat


def sample_toy(kind, num_steps, eta, n=1_000_000, stop_at=None, seed=0):
    """Run the sampler from pure noise with the exact velocity; returns samples (n,) at the stop sigma."""
    sigmas = shifted_sigmas(num_steps).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    sampler = get_sampler(kind)
    for i in range(stop_at or num_steps):
        step = sampler.step(x, exact_velocity(x, sigmas[i]), sigmas[i], sigmas[i + 1], eta, sigmas[1])
        x = step.mean + step.std * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x.squeeze(1), float(sigmas[stop_at or num_steps])


def moment_errors(samples, sigma):
    """|mean error| and |variance error| against the exact marginal at sigma."""
    return abs(samples.mean().item() - (1 - sigma) * M), abs(samples.var().item() - marginal_var(sigma))


def mc_tolerance(sigma, n, z=5.0):
    """z standard errors of the sample mean and the sample variance of a Gaussian marginal."""
    var = marginal_var(sigma)
    return z * math.sqrt(var / n), z * var * math.sqrt(2 / n)


@pytest.mark.parametrize("kind,eta", [("ode", 0.0), ("flow_sde", 0.7), ("cps", 0.0), ("dance_sde", 0.3)])
def test_sampler_reproduces_data_and_converges(kind, eta):
    """Errors vs the exact data moments shrink when the step count doubles, and end within MC error + bias."""
    n = 1_000_000
    errors = []
    for k in (5, 10, 20):
        samples, sigma = sample_toy(kind, k, eta, n)
        errors.append(moment_errors(samples, sigma))
    mean_tol, var_tol = mc_tolerance(0.0, n)
    var_errors = [e[1] for e in errors]
    assert var_errors[0] > 4 * var_tol, "the coarse discretisation error must be visible above MC noise"
    assert var_errors[1] < 0.7 * var_errors[0] and var_errors[2] < 0.7 * var_errors[1], var_errors
    assert all(e[0] < mean_tol + 0.01 for e in errors), errors
    assert var_errors[2] < 0.04, var_errors


@pytest.mark.parametrize("kind,eta", [("ode", 0.0), ("flow_sde", 0.7), ("dance_sde", 0.3)])
def test_intermediate_marginal_converges(kind, eta):
    """Half way through the schedule (sigma = 0.5), x approaches N((1 - s) M, (1 - s)^2 C^2 + s^2)."""
    n = 500_000
    var_errors = []
    for k in (10, 20, 40):
        samples, sigma = sample_toy(kind, k, eta, n, stop_at=k // 2)
        mean_err, var_err = moment_errors(samples, sigma)
        assert mean_err < mc_tolerance(sigma, n)[0] + 0.01
        var_errors.append(var_err)
    assert var_errors[1] < 0.7 * var_errors[0] and var_errors[2] < 0.7 * var_errors[1], var_errors
    assert var_errors[2] < 0.03


def test_cps_matches_independent_moment_propagation():
    """CPS with eta 0.8 against a float64 propagation of the exact law of the discrete sampler.

    For the toy, CPS is ``r' = k r + s z`` on ``r = x - (1 - sigma) M``, with ``k`` from the posterior
    means; the propagation below never calls the library. CPS at a fixed eta keeps a variance bias
    that does not vanish with more steps (it re-noises a fixed fraction of a posterior-mean guess), so
    the reference is the sampler's own law, not the data.
    """
    eta, n, steps = 0.8, 1_000_000, 10
    theta = eta * math.pi / 2
    sigmas = shifted_sigmas(steps).double().tolist()
    var_r = 1.0  # r = x - (1 - 1) * M = x at sigma = 1
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        a = (1 - s) * C**2 / marginal_var(s)  # x0_hat = M + a r
        b = s / marginal_var(s)  # eps_hat = b r
        k = (1 - s_next) * a + math.sqrt(s_next**2 - (s_next * math.sin(theta)) ** 2) * b
        var_r = k**2 * var_r + (s_next * math.sin(theta)) ** 2
    samples, _ = sample_toy("cps", steps, eta, n)
    mean_tol, var_tol = mc_tolerance(0.0, n)
    assert abs(samples.mean().item() - M) < mean_tol
    assert abs(samples.var().item() - var_r) < var_tol
    assert var_r < C**2 - 0.05  # the bias is real and visible: the sampler is not the data law


def test_flow_sde_step_matches_reverse_sde_with_exact_score():
    """Flow-SDE mean == x + dt * (v - g^2/2 * score), score = -(x - (1 - s) M) / V from the Gaussian directly."""
    x = torch.randn(64, 1, 4, 4, dtype=torch.float64)
    sigmas = shifted_sigmas(10).double()
    for i in range(10):
        s, s_next = sigmas[i], sigmas[i + 1]
        step = flow_sde_step(x, exact_velocity(x, s), s, s_next, eta=0.7, sigma_stand_in=sigmas[1])
        s_for_g = sigmas[1] if i == 0 else s
        g2 = 0.49 * s / (1 - s_for_g)
        score = -(x - (1 - s) * M) / marginal_var(s)
        expected = x + (s_next - s) * (exact_velocity(x, s) - g2 / 2 * score)
        torch.testing.assert_close(step.mean, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(step.std, torch.sqrt(g2 * (s - s_next)), rtol=1e-10, atol=0)


def test_dance_sde_step_matches_reverse_sde_with_exact_score():
    """Dance-SDE mean == x + dt * (v - eta^2/2 * score), std = eta sqrt(-dt): the reverse SDE with g = eta."""
    x = torch.randn(64, 1, 4, 4, dtype=torch.float64)
    sigmas = shifted_sigmas(10).double()
    for i in range(10):
        s, s_next = sigmas[i], sigmas[i + 1]
        step = dance_sde_step(x, exact_velocity(x, s), s, s_next, eta=0.3)
        score = -(x - (1 - s) * M) / marginal_var(s)  # the exact score; the kernel uses the model's x0 estimate
        expected = x + (s_next - s) * (exact_velocity(x, s) - 0.09 / 2 * score)
        torch.testing.assert_close(step.mean, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(step.std, 0.3 * torch.sqrt(s - s_next), rtol=1e-10, atol=0)


def test_python_float_sigma_keeps_the_latent_dtype():
    """A float sigma near 1 is not rounded through float32 on the way to a float64 latent."""
    x, v = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigma, sigma_next = 1 - 3e-8, 0.9  # 1 - 3e-8 rounds to 1.0 in float32
    as_tensors = (torch.tensor(sigma, dtype=torch.float64), torch.tensor(sigma_next, dtype=torch.float64))
    for step_fn in (
        lambda a, b: flow_sde_step(x, v, a, b, sigma_stand_in=0.95),
        lambda a, b: dance_sde_step(x, v, a, b),
        lambda a, b: cps_step(x, v, a, b),
        lambda a, b: ode_step(x, v, a, b),
    ):
        from_floats, from_tensors = step_fn(sigma, sigma_next), step_fn(*as_tensors)
        assert torch.equal(from_floats.mean, from_tensors.mean) and torch.equal(from_floats.std, from_tensors.std)
    step = flow_sde_step(x, v, sigma, sigma_next, sigma_stand_in=0.95)  # sigma < 1: g uses sigma itself
    torch.testing.assert_close(step.std, 0.7 * math.sqrt(sigma / (1 - sigma) * (sigma - sigma_next)) + 0 * step.std)


def test_first_step_std_uses_sigmas_1():
    """At sigma = 1 the Flow-SDE std is eta * sqrt(1 / (1 - sigmas[1])) * sqrt(-dt), finite."""
    sigmas = shifted_sigmas(10, shift=3.0)
    x = torch.zeros(2, 1, 8, 8)
    step = flow_sde_step(x, x, sigmas[0], sigmas[1], eta=0.7, sigma_stand_in=sigmas[1])
    expected = 0.7 * math.sqrt(1 / (1 - sigmas[1].item())) * math.sqrt(1 - sigmas[1].item())
    assert torch.isfinite(step.std).all()
    assert step.std.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="sigma_stand_in"):
        flow_sde_step(x, x, 1.0, sigmas[1].item(), eta=0.7)


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 4, 3, 8, 8)])
def test_steps_broadcast_per_sample_sigma_any_rank(shape):
    """A (B,) sigma gives a (B, 1, ..., 1) std, and sample b equals the step with the float sigma_b."""
    x, v = torch.randn(shape), torch.randn(shape)
    sigma = torch.tensor([0.9, 0.5, 0.3])[: shape[0]]
    sigma_next = sigma - 0.1
    for fn in (lambda *a: flow_sde_step(*a, eta=0.7), lambda *a: cps_step(*a, eta=0.8), ode_step):
        step = fn(x, v, sigma, sigma_next)
        assert step.mean.shape == shape and step.std.shape == (shape[0],) + (1,) * (len(shape) - 1)
        for b in range(shape[0]):
            single = fn(x[b : b + 1], v[b : b + 1], sigma[b].item(), sigma_next[b].item())
            torch.testing.assert_close(step.mean[b : b + 1], single.mean)


def test_cps_std_and_last_step():
    x, v = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    step = cps_step(x, v, 0.5, 0.4, eta=0.8)
    assert step.std.item() == pytest.approx(0.4 * math.sin(0.4 * math.pi))
    last = cps_step(x, v, 0.1, 0.0, eta=0.8)  # to data: x0_hat, no noise
    torch.testing.assert_close(last.mean, x - 0.1 * v)
    assert last.std.item() == 0.0


def test_bf16_inputs_are_upcast():
    x = torch.randn(2, 1, 8, 8).bfloat16()
    step = flow_sde_step(x, x, 0.5, 0.4, eta=0.7)
    assert step.mean.dtype == torch.bfloat16 and step.std.dtype == torch.float32
    assert log_prob(x, step.mean, step.std).dtype == torch.float32
    assert gaussian_kl(step.mean, x, step.std).dtype == torch.float32


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_matches_torch_normal(reduce):
    mean, x = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randn(5, 2, 3, 3, dtype=torch.float64)
    std = torch.rand(5, 1, 1, 1, dtype=torch.float64) + 0.1
    expected = torch.distributions.Normal(mean, std).log_prob(x).flatten(1)
    expected = expected.mean(1) if reduce == "mean" else expected.sum(1)
    torch.testing.assert_close(log_prob(x, mean, std, reduce=reduce), expected)
    cps_expected = -((x - mean) ** 2).flatten(1)
    cps_expected = cps_expected.mean(1) if reduce == "mean" else cps_expected.sum(1)
    torch.testing.assert_close(log_prob(x, mean, std, reduce=reduce, convention="cps"), cps_expected)


def test_divergence_matches_monte_carlo_kl_and_is_symmetric():
    """Sum-reduced D vs the MC estimate E_a[log N(x; mu_a, s) - log N(x; mu_b, s)], tolerance 5 MC std errors."""
    gen = torch.Generator().manual_seed(0)
    mu_a = torch.randn(1, 16, dtype=torch.float64, generator=gen)
    mu_b = mu_a + 0.3 * torch.randn(1, 16, dtype=torch.float64, generator=gen)
    s = torch.tensor(0.5, dtype=torch.float64)
    n = 200_000
    x = mu_a + s * torch.randn(n, 16, dtype=torch.float64, generator=gen)
    log_ratio = torch.distributions.Normal(mu_a, s).log_prob(x).sum(1) - torch.distributions.Normal(mu_b, s).log_prob(
        x
    ).sum(1)
    d_sum = gaussian_kl(mu_a, mu_b, s, reduce="sum").item()
    assert abs(log_ratio.mean().item() - d_sum) < 5 * log_ratio.std().item() / math.sqrt(n)
    assert gaussian_kl(mu_b, mu_a, s, reduce="sum").item() == pytest.approx(d_sum, rel=1e-12)
    assert gaussian_kl(mu_a, mu_b, s).item() == pytest.approx(d_sum / 16, rel=1e-12)
    unscaled = gaussian_kl(mu_a, mu_b, s, add_kl_coefficient=False).item()
    assert unscaled == pytest.approx(((mu_a - mu_b) ** 2).mean().item() / 2, rel=1e-12)


def test_log_ratio_decomposition_and_negative_kl_mean():
    """x = mu_old + s eps: log rho = eps.d / s - |d|^2 / (2 s^2) (sum form), and E[log rho] = -KL."""
    gen = torch.Generator().manual_seed(1)
    mu_old = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=gen)
    d = 0.05 * torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=gen)
    s = torch.tensor(0.3, dtype=torch.float64)
    eps = torch.randn(100_000, 1, 4, 4, dtype=torch.float64, generator=gen)
    x = mu_old + s * eps
    log_rho = log_prob(x, mu_old + d, s, reduce="sum") - log_prob(x, mu_old, s, reduce="sum")
    expected = (eps * d).flatten(1).sum(1) / s - (d**2).sum() / (2 * s**2)
    torch.testing.assert_close(log_rho, expected, rtol=1e-9, atol=1e-9)
    kl = gaussian_kl(mu_old + d, mu_old, s, reduce="sum").item()
    assert abs(log_rho.mean().item() + kl) < 5 * log_rho.std().item() / math.sqrt(len(log_rho))


def test_public_bug_first_step_std():
    """D uses the sampler's own first-step std; 1 - min(sigma, 0.99) would be off by ~3.5x here."""
    sigmas = shifted_sigmas(10, shift=3.0)
    x, v = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    step = flow_sde_step(x, v, sigmas[0], sigmas[1], eta=0.7, sigma_stand_in=sigmas[1])
    wrong_std = 0.7 * math.sqrt(1 / (1 - 0.99)) * math.sqrt(1 - sigmas[1].item())
    mu_b = step.mean + 0.01
    ratio = (gaussian_kl(step.mean, mu_b, step.std) / gaussian_kl(step.mean, mu_b, torch.tensor(wrong_std))).mean()
    assert ratio.item() > 3.0  # (wrong_std / std)^2


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="sampler must be one of"):
        get_sampler("euler")
    with pytest.raises(ValueError, match="reduce must be one of"):
        gaussian_kl(x, x, torch.tensor(1.0), reduce="max")
    with pytest.raises(ValueError, match="convention must be one of"):
        log_prob(x, x, torch.tensor(1.0), convention="other")
    with pytest.raises(ValueError, match="std must be > 0"):
        log_prob(x, x, torch.tensor(0.0))
    with pytest.raises(ValueError, match="sigma has 3 entries"):
        ode_step(x, x, torch.ones(3) * 0.5, 0.4)
    with pytest.raises(ValueError, match="num_steps"):
        shifted_sigmas(0)
