"""Policy losses: truth tables, invariants, Monte Carlo properties and gradients."""

import math

import pytest
import torch

from flowdppo.losses import (
    LOSSES,
    StepBatch,
    dppo_mask,
    flow_dppo_loss,
    flow_grpo_loss,
    get_loss,
    grpo_guard_loss,
    reference_kl,
    unconstrained_loss,
)
from flowdppo.sde import gaussian_kl, log_prob


def make_batch(mean_new, mean_old, x_next, std, advantages, convention="gaussian", step_index=None):
    """A StepBatch whose log-probs are computed from the means, so gradients flow to mean_new."""
    s = std.view(-1, *([1] * (mean_new.ndim - 1)))
    e = mean_new.shape[0]
    return StepBatch(
        logp_new=log_prob(x_next, mean_new, s, convention=convention),
        logp_old=log_prob(x_next, mean_old, s, convention=convention),
        advantages=advantages,
        mean_new=mean_new,
        mean_old=mean_old,
        std=std,
        dt=torch.full((e,), -0.1, dtype=mean_new.dtype),
        step_index=torch.zeros(e, dtype=torch.long) if step_index is None else step_index,
    )


def random_batch(e=8, shape=(1, 4, 4), drift=0.05, dtype=torch.float64, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    mean_old = torch.randn(e, *shape, dtype=dtype, generator=gen)
    std = 0.2 + torch.rand(e, dtype=dtype, generator=gen)
    x_next = mean_old + std.view(-1, 1, 1, 1) * torch.randn(e, *shape, dtype=dtype, generator=gen)
    mean_new = (mean_old + drift * torch.randn(e, *shape, dtype=dtype, generator=gen)).requires_grad_(requires_grad)
    advantages = torch.randn(e, dtype=dtype, generator=gen)
    return mean_new, mean_old, x_next, std, advantages


def test_dppo_mask_truth_table():
    """M = 0 iff D >= tau and ((A > 0 and rho > 1) or (A < 0 and rho < 1)); corrective updates pass."""
    tau = 1e-5
    cases = []  # (A, rho, D, dropped)
    for a in (1.0, -1.0):
        for rho in (1.5, 0.5):
            for d in (2e-5, 1e-5, 5e-6):
                moving_away = (a > 0 and rho > 1) or (a < 0 and rho < 1)
                cases.append((a, rho, d, moving_away and d >= tau))
    a, rho, d, expected = (torch.tensor(col) for col in zip(*cases, strict=True))
    assert torch.equal(dppo_mask(a, rho, d, tau), expected)
    assert int(expected.sum()) == 4  # 2 directions x 2 divergences at or over tau


def test_dppo_masked_elements_are_zero_with_zero_gradient_and_no_nan_on_overflow():
    e = 4
    mean_old = torch.zeros(e, 1, 2, 2, dtype=torch.float64)
    x_next = torch.zeros_like(mean_old)
    std = torch.ones(e, dtype=torch.float64)
    mean_new = torch.zeros_like(mean_old, requires_grad=True)
    # hand-made log-ratios: huge positive (overflow) and huge negative, with large divergence
    log_ratio_offsets = torch.tensor([1000.0, -1000.0, 1.0, -1000.0], dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    logp_new = log_prob(x_next, mean_new, std.view(-1, 1, 1, 1)) + log_ratio_offsets
    batch = StepBatch(
        logp_new=logp_new,
        logp_old=log_prob(x_next, mean_old, std.view(-1, 1, 1, 1)),
        advantages=advantages,
        mean_new=mean_new + 1.0,  # D = 0.5 per element, far over tau
        mean_old=mean_old,
        std=std,
        dt=-0.1 * std,
        step_index=torch.zeros(e, dtype=torch.long),
    )
    loss, metrics = flow_dppo_loss(batch, kl_mask_threshold=1e-5)
    # elements 0, 1 move away from the rollout policy: masked, exactly 0, even with rho = inf
    assert loss[0].item() == 0.0 and loss[1].item() == 0.0
    # elements 2, 3 are corrective: kept, -A * rho
    assert loss[2].item() == pytest.approx(math.e) and loss[3].item() == 0.0
    loss.sum().backward()
    assert torch.isfinite(mean_new.grad).all()
    assert metrics["masked_fraction"].item() == 0.5
    assert metrics["masked_fraction_pos_adv"].item() == 0.5 and metrics["masked_fraction_neg_adv"].item() == 0.5


def test_ppo_clip_equals_literal_max_form_and_has_no_nan_on_overflow():
    mean_new, mean_old, x_next, std, adv = random_batch(e=64, drift=0.0, requires_grad=False)
    batch = make_batch(mean_new, mean_old, x_next, std, adv)
    batch.logp_new = batch.logp_old + 3e-4 * torch.randn(64, dtype=torch.float64)
    eps = 1e-4
    loss, metrics = flow_grpo_loss(batch, clip_range=eps)
    a = torch.clamp(adv, -5, 5)
    rho = torch.exp(batch.logp_new - batch.logp_old)
    expected = torch.maximum(-a * rho, -a * torch.clamp(rho, 1 - eps, 1 + eps))
    torch.testing.assert_close(loss, expected)
    clipped = ((a > 0) & (rho > 1 + eps)) | ((a < 0) & (rho < 1 - eps))
    assert 0 < clipped.float().mean().item() < 1
    assert metrics["masked_fraction"].item() == pytest.approx(clipped.float().mean().item())
    # overflow: A > 0 with rho = inf is clipped; its gradient is exactly zero, not NaN
    log_ratio = torch.tensor([800.0, 0.0], dtype=torch.float64, requires_grad=True)
    small = StepBatch(
        logp_new=log_ratio,
        logp_old=torch.zeros(2, dtype=torch.float64),
        advantages=torch.tensor([1.0, 1.0], dtype=torch.float64),
        mean_new=torch.zeros(2, 1, 1, 1, dtype=torch.float64),
        mean_old=torch.zeros(2, 1, 1, 1, dtype=torch.float64),
        std=torch.ones(2, dtype=torch.float64),
        dt=-torch.ones(2, dtype=torch.float64),
        step_index=torch.zeros(2, dtype=torch.long),
    )
    out, _ = flow_grpo_loss(small, clip_range=eps)
    out.sum().backward()
    assert out[0].item() == pytest.approx(-(1 + eps))
    assert log_ratio.grad.tolist() == [0.0, -1.0]


def test_advantage_clamp_for_clip_methods_only():
    mean_new, mean_old, x_next, std, _ = random_batch(e=2, drift=0.0)
    adv = torch.tensor([20.0, -20.0], dtype=torch.float64)
    grpo, _ = flow_grpo_loss(make_batch(mean_new, mean_old, x_next, std, adv), adv_clip_max=5.0)
    dppo, _ = flow_dppo_loss(make_batch(mean_new, mean_old, x_next, std, adv))
    torch.testing.assert_close(grpo, torch.tensor([-5.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(dppo, torch.tensor([-20.0, 20.0], dtype=torch.float64))


@pytest.mark.parametrize("loss_mode", sorted(LOSSES))
def test_first_minibatch_invariant(loss_mode):
    """Same weights: rho == 1, D == 0; flow_dppo's loss is -A and its gradient the plain policy gradient."""
    mean_new, mean_old, x_next, std, adv = random_batch(drift=0.0)
    mean_old = mean_old.detach().clone()
    convention = "cps" if loss_mode == "flow_cps" else "gaussian"
    batch = make_batch(mean_new, mean_old, x_next, std, adv, convention=convention)
    loss, metrics = get_loss(loss_mode).fn(batch)
    assert metrics["ratio_min"].item() == 1.0 and metrics["ratio_max"].item() == 1.0
    assert metrics["kl_max"].item() == 0.0 and metrics["masked_fraction"].item() == 0.0
    if loss_mode != "flow_dppo":
        return
    torch.testing.assert_close(loss, -adv)
    (grad,) = torch.autograd.grad(loss.mean(), mean_new)
    logp_new = log_prob(x_next, mean_new, std.view(-1, 1, 1, 1))
    plain_pg = (-adv * torch.exp(logp_new - batch.logp_old.detach())).mean()
    (expected,) = torch.autograd.grad(plain_pg, mean_new)
    torch.testing.assert_close(grad, expected)


def test_unconstrained_control_is_plain_minus_a_rho_and_equals_dppo_with_an_infinite_threshold():
    """-A * rho on every element (no clamp, nothing dropped, even far from the rollout policy), the same values
    and gradient as Flow-DPPO whose threshold no element reaches."""
    mean_new, mean_old, x_next, std, _ = random_batch(drift=0.5)
    adv = torch.tensor([20.0, -20.0, 1.0, -1.0, 3.0, -3.0, 0.5, -0.5], dtype=torch.float64)
    batch = make_batch(mean_new, mean_old, x_next, std, adv)
    loss, metrics = unconstrained_loss(batch)
    torch.testing.assert_close(loss, -adv * torch.exp(batch.logp_new - batch.logp_old))
    assert metrics["masked_fraction"].item() == 0.0 and metrics["kl_max"].item() > 1e-3
    dppo, _ = flow_dppo_loss(batch, kl_mask_threshold=1e30)
    torch.testing.assert_close(loss, dppo)
    (g1,) = torch.autograd.grad(loss.mean(), mean_new, retain_graph=True)
    (g2,) = torch.autograd.grad(dppo.mean(), mean_new)
    torch.testing.assert_close(g1, g2)
    assert flow_dppo_loss(batch)[1]["masked_fraction"].item() > 0  # the default threshold does drop some


def test_grpo_guard_renormalised_log_ratio_has_zero_mean():
    """Over the sampling noise, mean(log rho) = -D while GRPO-Guard's log rho_g has mean 0 (5 MC std errors)."""
    n, shape = 100_000, (1, 4, 4)
    gen = torch.Generator().manual_seed(3)
    mean_old = torch.randn(1, *shape, dtype=torch.float64, generator=gen).expand(n, *shape)
    mean_new = mean_old + 0.3 * torch.randn(1, *shape, dtype=torch.float64, generator=gen)
    std = torch.full((n,), 0.4, dtype=torch.float64)
    x_next = mean_old + 0.4 * torch.randn(n, *shape, dtype=torch.float64, generator=gen)
    batch = make_batch(mean_new, mean_old, x_next, std, torch.ones(n, dtype=torch.float64))
    raw = batch.logp_new - batch.logp_old
    d = gaussian_kl(mean_new, mean_old, 0.4)[0].item()
    assert abs(raw.mean().item() + d) < 5 * raw.std().item() / math.sqrt(n)
    assert d > 10 * raw.std().item() / math.sqrt(n)  # the bias is far above the MC error
    _, metrics = grpo_guard_loss(batch, clip_range=1e9)
    # with a huge clip range nothing is clipped; recover log rho_g from the metrics of the renormalised ratio
    s = 0.4
    log_rho_g = s * raw + ((mean_new - mean_old) ** 2).flatten(1).mean(1) / (2 * s)
    eps = (x_next - mean_old) / s
    torch.testing.assert_close(log_rho_g, (eps * (mean_new - mean_old)).flatten(1).mean(1))
    assert abs(log_rho_g.mean().item()) < 5 * log_rho_g.std().item() / math.sqrt(n)
    assert metrics["log_ratio_mean"].item() == pytest.approx(log_rho_g.mean().item(), rel=1e-9)


def test_grpo_guard_scale_is_per_sample():
    """Each sample's renormalised ratio depends on its own std only (no (B,1,1,B) broadcast)."""
    mean_new, mean_old, x_next, std, adv = random_batch(e=5)
    std = torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64)
    full, metrics = grpo_guard_loss(make_batch(mean_new, mean_old, x_next, std, adv))
    assert full.shape == (5,)
    for b in range(5):
        one, _ = grpo_guard_loss(
            make_batch(mean_new[b : b + 1], mean_old[b : b + 1], x_next[b : b + 1], std[b : b + 1], adv[b : b + 1])
        )
        torch.testing.assert_close(full[b : b + 1], one)


def test_grpo_guard_divides_by_abs_dt():
    mean_new, mean_old, x_next, std, adv = random_batch(e=4, drift=0.0)
    batch = make_batch(mean_new, mean_old, x_next, std, adv)
    batch.dt = torch.tensor([-0.1, -0.2, -0.05, -0.5], dtype=torch.float64)
    loss, _ = grpo_guard_loss(batch)
    torch.testing.assert_close(loss, -adv / batch.dt.abs())


@pytest.mark.parametrize("loss_mode", ["flow_grpo", "grpo_guard", "flow_dppo"])
def test_gradcheck_wrt_new_mean(loss_mode):
    """float64 gradcheck away from the clip / mask boundaries."""
    _, mean_old, x_next, std, adv = random_batch(e=4, shape=(1, 2, 2))
    hparams = {"flow_grpo": {"clip_range": 10.0}, "grpo_guard": {"clip_range": 10.0}, "flow_dppo": {}}[loss_mode]
    if loss_mode == "flow_dppo":
        adv = torch.tensor([1.0, -1.0, 2.0, -0.5], dtype=torch.float64)
    mean_new = (mean_old + 0.05).clone().requires_grad_(True)

    def fn(m):
        loss, _ = get_loss(loss_mode).fn(make_batch(m, mean_old, x_next, std, adv), **hparams)
        return loss

    assert torch.autograd.gradcheck(fn, (mean_new,))
    if loss_mode == "flow_dppo":  # elements 0, 1 move away (masked), 2, 3 are corrective (kept)
        log_ratio = make_batch(mean_new, mean_old, x_next, std, adv).logp_new - log_prob(
            x_next, mean_old, std.view(-1, 1, 1, 1)
        )
        adv = torch.sign(log_ratio.detach()) * torch.tensor([1.0, 2.0, -1.0, -0.5], dtype=torch.float64)
        _, metrics = flow_dppo_loss(make_batch(mean_new, mean_old, x_next, std, adv))
        assert metrics["masked_fraction"].item() == 0.5
        assert torch.autograd.gradcheck(fn, (mean_new,))


def test_metrics_cover_every_listed_quantity_and_per_step_breakdown():
    mean_new, mean_old, x_next, std, adv = random_batch(e=6, drift=0.02)
    steps = torch.tensor([0, 0, 1, 1, 3, 3])
    batch = make_batch(mean_new, mean_old, x_next, std, adv, step_index=steps)
    _, metrics = flow_dppo_loss(batch, kl_mask_threshold=1e-9)
    for key in (
        "ratio_mean",
        "ratio_min",
        "ratio_max",
        "log_ratio_mean",
        "kl_mean",
        "kl_max",
        "masked_fraction",
        "masked_fraction_pos_adv",
        "masked_fraction_neg_adv",
    ):
        assert key in metrics
    d = batch.divergence()
    for step in (0, 1, 3):
        assert metrics[f"kl_mean/step_{step}"].item() == pytest.approx(d[steps == step].mean().item())
        assert f"masked_fraction/step_{step}" in metrics


def test_reference_kl_is_the_scaled_drift_to_the_base():
    mean_new, mean_ref, _, std, _ = random_batch(e=3)
    expected = ((mean_new - mean_ref) ** 2).flatten(1).mean(1) / (2 * std**2)
    torch.testing.assert_close(reference_kl(mean_new, mean_ref, std), expected)


def test_bad_inputs_name_the_argument():
    mean_new, mean_old, x_next, std, adv = random_batch(e=3)
    batch = make_batch(mean_new, mean_old, x_next, std, adv)
    with pytest.raises(ValueError, match="loss_mode must be one of"):
        get_loss("ppo")
    with pytest.raises(ValueError, match="kl_mask_threshold must be > 0"):
        flow_dppo_loss(batch, kl_mask_threshold=0.0)
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        flow_grpo_loss(batch, clip_range=-1.0)
    with pytest.raises(ValueError, match="StepBatch.logp_old must have shape"):
        StepBatch(batch.logp_new, batch.logp_old[:2], adv, mean_new, mean_old, std, batch.dt, batch.step_index)
    with pytest.raises(ValueError, match="mean_new .* and mean_old .* must have the same shape"):
        StepBatch(batch.logp_new, batch.logp_old, adv, mean_new, mean_old[:, :, :2], std, batch.dt, batch.step_index)
    with pytest.raises(ValueError, match="std must be > 0"):
        StepBatch(batch.logp_new, batch.logp_old, adv, mean_new, mean_old, std * 0, batch.dt, batch.step_index)


def test_mechanism_metrics_match_numpy():
    """dim * D quantiles and the log-ratio moments against numpy on the same values; the update's summary
    takes the quantiles over every moved mini-batch and the moments over the first one only."""
    import numpy as np

    from flowdppo.algorithms.base import ELEMENT_DIM_KL, ELEMENT_LOG_RATIO, mechanism_metrics
    from flowdppo.distributed import Distributed
    from flowdppo.losses import log_ratio_moments, scaled_divergence_quantiles

    gen = torch.Generator().manual_seed(0)
    dim_kl = torch.rand(1001, generator=gen) ** 3 * 5
    q = scaled_divergence_quantiles(dim_kl)
    assert set(q) == {"dim_kl_p50", "dim_kl_p90", "dim_kl_p99"}
    expected = np.quantile(dim_kl.double().numpy(), [0.5, 0.9, 0.99])
    assert [float(q[k]) for k in ("dim_kl_p50", "dim_kl_p90", "dim_kl_p99")] == pytest.approx(expected, rel=1e-12)
    log_ratio = torch.randn(64, generator=gen) * 0.1 - 0.02
    m = log_ratio_moments(log_ratio)
    values = log_ratio.double().numpy()
    assert float(m["first_moved_log_ratio_mean"]) == pytest.approx(values.mean(), rel=1e-12)
    assert float(m["first_moved_log_ratio_std"]) == pytest.approx(values.std(), rel=1e-12)  # ddof 0

    # the full KL of a step is dim * the mean-reduced D
    mean_new, mean_old, std = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0.3, 0.5, 0.7])
    d = gaussian_kl(mean_new, mean_old, std.view(-1, 1, 1, 1), "mean")
    full = gaussian_kl(mean_new, mean_old, std.view(-1, 1, 1, 1), "sum")
    assert torch.allclose(256 * d, full, rtol=1e-5)

    parts = [dim_kl[:500], dim_kl[500:]]
    moved = {ELEMENT_DIM_KL: parts, ELEMENT_LOG_RATIO: [log_ratio, torch.zeros(64)]}
    out = mechanism_metrics(moved, Distributed())
    assert out["dim_kl_p90"] == pytest.approx(expected[1], rel=1e-12)
    assert out["first_moved_log_ratio_std"] == pytest.approx(values.std(), rel=1e-12)
    assert mechanism_metrics({ELEMENT_DIM_KL: [], ELEMENT_LOG_RATIO: []}, Distributed()) == {}
    with pytest.raises(ValueError, match="no elements"):
        scaled_divergence_quantiles(torch.zeros(0))
