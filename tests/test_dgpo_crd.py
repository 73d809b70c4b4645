"""DGPO and CRD: hand-derived gradients on a linear velocity model, their group statistics and noise, training on
digits through ``flowdppo train``, exact resume, and their one-line refusals.

The gradient tests run in float64 with a one-parameter model ``v = theta * x``: every formula is exact algebra in
``theta``, so the only difference between autograd of the loss and the hand derivation is rounding (~1e-15 relative);
``rtol=1e-10`` then catches any wrong factor, sign or detached term while never failing on rounding.
"""

import json
import shutil
from functools import partial

import pytest
import torch
from torch import nn

from flowdppo.algorithms.crd import CRD, ScheduledWeights, centering_weights, crd_loss, implicit_reward
from flowdppo.algorithms.dgpo import DGPO, dgpo_loss, preference_logits
from flowdppo.algorithms.grouped import by_group, group_noised_elements, per_member
from flowdppo.cli import main
from flowdppo.config import load_config
from flowdppo.distributed import Distributed
from flowdppo.rollout import Trajectory
from flowdppo.trainer import train

P, G, SHAPE = 2, 3, (1, 3, 3)  # two groups of three samples
SMALL = ["prompts_per_epoch=2", f"group_size={G}", "sampler.num_steps=5"]


class Linear(nn.Module):
    """``v = guidance_scale * theta * x``: one float64 parameter; the guidance shows which scale a loss ran at."""

    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, x, sigma, cond, guidance_scale=1.0):
        return guidance_scale * self.theta * x


def toy_trajectory(seed: int = 0, groups: int = P) -> Trajectory:
    gen = torch.Generator().manual_seed(seed)
    empty = torch.zeros(0)
    return Trajectory(
        cond=torch.arange(groups * G),
        final=torch.randn(groups * G, *SHAPE, generator=gen, dtype=torch.float64),
        step_index=empty,
        step_sigma=empty,
        step_sigma_next=empty,
        latents=empty,
        next_latents=empty,
        means=empty,
        stds=empty,
        log_probs=torch.zeros(0, groups * G),
        sigmas=torch.linspace(1, 0, 6, dtype=torch.float64),
    )


def base(x, sigma, cond):
    return 0.3 * x + 0.1


def prepared(algorithm, theta_old: float, advantages):
    """The algorithm on the linear model, its slow copy at ``theta_old``, and the rollout's elements."""
    policy = Linear(0.7)
    algorithm.setup(policy)
    algorithm.slow.weights[0].fill_(theta_old)
    algorithm.base_velocity = base
    traj = toy_trajectory()
    elements = algorithm.elements(traj, advantages, policy, torch.Generator().manual_seed(3), Distributed())
    return policy, traj, elements


def matching(theta, data):
    """Per element: ``x``, the target ``u``, ``e = theta x - u`` and ``de / dtheta = x``."""
    x, u = data["noised"], data["eps"] - data["x0"]
    return x, u, theta * x - u


def mean(t):
    return t.flatten(1).mean(1)


ADV = torch.tensor([1.5, -0.5, -1.0, 6.0, 0.0, -6.0], dtype=torch.float64)


def test_dgpo_surrogate_is_the_group_dpo_objective_over_beta():
    """grad of mean(sigmoid(S) A l) (sigmoid(S) detached) = grad of mean_g(-log sigmoid(-S_g)) / beta_dpo, and the
    hand derivation: (1 / E) sum_i sigmoid(S_g) A_i mean(2 (theta u_i - t_i) u_i)."""
    gen = torch.Generator().manual_seed(0)
    u, target = (torch.randn(P * G, *SHAPE, generator=gen, dtype=torch.float64) for _ in range(2))
    ref_error = mean((0.4 * u - target) ** 2)
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    error = mean((theta * u - target) ** 2)
    logits = preference_logits(by_group(error, G), by_group(ref_error, G), by_group(ADV, G), 2.0)
    weight = per_member(torch.sigmoid(logits), G)
    (grad,) = torch.autograd.grad(dgpo_loss(error, weight, ADV).mean(), theta, retain_graph=True)
    (objective,) = torch.autograd.grad(-torch.nn.functional.logsigmoid(-logits).mean() / 2.0, theta)
    hand = (weight.detach() * ADV * mean(2 * (0.7 * u - target) * u)).mean()
    torch.testing.assert_close(grad, objective, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, hand, rtol=1e-10, atol=1e-14)
    assert 0.05 < weight.min() and weight.max() < 0.95  # the sigmoid is in its working range, not saturated


def test_dgpo_logit_is_negative_when_the_preferred_samples_improved_more():
    """-S = R(G+) - R(G-): the preferred sample's error fell below the reference's, the rejected one's rose."""
    adv = torch.tensor([[1.0, -1.0]])
    ref = torch.tensor([[1.0, 1.0]])
    assert preference_logits(torch.tensor([[0.5, 1.5]]), ref, adv, 10.0) == -5.0
    assert preference_logits(torch.tensor([[1.5, 0.5]]), ref, adv, 10.0) == 5.0


@pytest.mark.parametrize("clip_dsm", [True, False])
def test_dgpo_gradient_matches_hand_derivation_on_a_linear_model(clip_dsm):
    """The algorithm end to end on a mini-batch of half the elements: group weights from all of them, the trained
    velocity at guidance 1 whatever the sampler's, the PPO-style clip against the EMA copy, the KL to the base."""
    over = [*SMALL, "sampler.guidance_scale=2", "dgpo.kl_cfg=2", "dgpo.trunc_steps=3", "dgpo.train_timesteps=2"]
    over += ["dgpo.beta_dpo=3", "dgpo.clip_range=0.05", "loss.beta=0.5", f"dgpo.clip_dsm={str(clip_dsm).lower()}"]
    algorithm = DGPO(load_config("dgpo", overrides=over))
    policy, traj, elements = prepared(algorithm, 0.5, ADV)
    data = elements.data
    assert torch.equal(data["sigma"].view(-1, G), data["sigma"].view(-1, G)[:, :1].expand(-1, G))  # a group's level
    assert torch.equal(data["eps"].view(-1, G, 9), data["eps"].view(-1, G, 9)[:, :1].expand(-1, G, 9))  # and noise
    index = torch.randperm(len(data["sample"]), generator=torch.Generator().manual_seed(1))[:6]
    mb = elements.select(index)
    loss, metrics = algorithm.loss(partial(policy, guidance_scale=2.0), base, mb, traj.cond[mb["sample"]], True, None)
    (grad,) = torch.autograd.grad(loss, policy.theta)

    x, u, e = matching(0.7, data)
    error, ref_error, old_error = mean(e**2), mean((base(x, 0, 0) - u) ** 2), mean((0.5 * x - u) ** 2)
    adv = data["advantages"].clamp(-5, 5)
    weight = torch.sigmoid(3.0 * (adv * (error - ref_error)).view(-1, G).mean(1)).repeat_interleave(G)
    ratio = torch.exp(old_error - error)
    clip = torch.where(adv > 0, ratio > 1.05, ratio < 0.95) & clip_dsm
    d_error = mean(2 * e * x)  # d mean((theta x - u)^2) / dtheta
    d_kl = mean(2 * (0.7 * x - base(x, 0, 0)) * x)
    hand = (weight * adv * d_error * ~clip + 0.5 * d_kl)[index].mean()
    torch.testing.assert_close(grad, hand, rtol=1e-10, atol=1e-14)
    assert clip[index].any() and not clip[index].all() if clip_dsm else not clip.any()
    if clip_dsm:  # the EMA copy exists only where something reads it
        binds = torch.where(adv > 0, ratio > 1.05, ratio < 0.95)[index]
        assert float(metrics["clipped_fraction"]) == pytest.approx(float(binds.double().mean()))
    else:
        assert "clipped_fraction" not in metrics and "v_old" not in data


@pytest.mark.parametrize("loss_type,temperature", [("mse", -1.0), ("bce", 0.5)])
def test_crd_gradient_matches_hand_derivation_on_a_linear_model(loss_type, temperature):
    """The algorithm end to end: implicit reward against the old model with adaptive weights, centering over the
    whole group (uniform, or both softmax directions), the c / beta scale, the reward-adaptive KL."""
    over = [*SMALL, "crd.train_timesteps=2", "crd.beta=2", "loss.beta=0.5", "crd.kl_min=0.05", "crd.kl_cfg=1"]
    over += [f"crd.loss_type={loss_type}", f"crd.weight_temp={temperature}"]
    algorithm = CRD(load_config("crd", overrides=over))
    policy, traj, elements = prepared(algorithm, 0.5, ADV)
    data = elements.data
    index = torch.randperm(len(data["sample"]), generator=torch.Generator().manual_seed(2))[:7]
    mb = elements.select(index)
    loss, _ = algorithm.loss(partial(policy, guidance_scale=1.0), base, mb, traj.cond[mb["sample"]], True, None)
    (grad,) = torch.autograd.grad(loss, policy.theta)

    x, u, e = matching(0.7, data)
    e_old = 0.5 * x - u
    w, w_old = mean(e.abs()), mean(e_old.abs())
    r = -(mean(e**2) / w - mean(e_old**2) / w_old)
    d_r = -mean(2 * e * x) / w
    p = data["advantages"].clamp(-5, 5) / 10 + 0.5
    if temperature < 0:
        directions = [torch.full((len(p) // G, G), 1 / G, dtype=torch.float64)]
    else:
        directions = [torch.softmax(s * p.view(-1, G) / temperature, dim=1) for s in (1, -1)]
    d_policy = 0
    for q in directions:
        r_c = r - (q * r.view(-1, G)).sum(1).repeat_interleave(G)
        p_c = p - (q * p.view(-1, G)).sum(1).repeat_interleave(G)
        # d/dz of (z - R)^2 is 2 (z - R); of BCE(z, sigmoid(R)) it is sigmoid(z) - sigmoid(R); z = beta r_c
        d_z = 2 * (2 * r_c - p_c) if loss_type == "mse" else torch.sigmoid(2 * r_c) - torch.sigmoid(p_c)
        d_policy = d_policy + d_z * 2 * d_r / len(directions)
    m = 0.05 / 0.5
    d_kl = (m + p * (1 - m)) * mean(2 * (0.7 * x - base(x, 0, 0)) * x)
    hand = (d_policy * 5 / 2 + 0.5 * d_kl)[index].mean()
    torch.testing.assert_close(grad, hand, rtol=1e-10, atol=1e-14)


def test_crd_pieces():
    """The implicit reward is 0 at the old model; centering weights sum to one; the loss at a matched reward is 0."""
    x = torch.randn(4, *SHAPE, dtype=torch.float64)
    assert torch.equal(implicit_reward(0.3 * x, 0.3 * x, x), torch.zeros(4, dtype=torch.float64))
    p = torch.rand(2, 5, dtype=torch.float64)
    for q in centering_weights(p, 0.3) + centering_weights(p, -1.0):
        torch.testing.assert_close(q.sum(1), torch.ones(2, dtype=torch.float64))
    assert centering_weights(p, -1.0)[0].unique().tolist() == [0.2]
    r = torch.tensor([0.1, 0.3])
    assert torch.equal(crd_loss(r, r.mean(), 2 * r, 2 * r.mean(), 2.0), torch.zeros(2))


def test_scheduled_snapshot_decay():
    weights = ScheduledWeights(nn.Linear(1, 1), [75, 0.0, 0.0075, 0.999])
    assert [weights.decay(s) for s in (0, 74, 75, 175, 10_000)] == [0.0, 0.0, 0.0, pytest.approx(0.75), 0.999]
    assert ScheduledWeights(nn.Linear(1, 1), [0, 0.25, 0.005, 0.999]).decay(10) == pytest.approx(0.3)


def test_group_noise_is_one_draw_split_across_processes_by_whole_groups():
    traj = toy_trajectory(groups=4)
    levels = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    adv = torch.arange(12.0)
    for shared in (True, False):
        whole = group_noised_elements(traj, adv, levels, G, shared, torch.Generator().manual_seed(1), Distributed())
        d = whole.data
        assert torch.equal(d["sigma"], levels.repeat_interleave(G, dim=1).flatten())
        torch.testing.assert_close(
            d["noised"], (1 - d["sigma"].view(-1, 1, 1, 1)) * d["x0"] + d["sigma"].view(-1, 1, 1, 1) * d["eps"]
        )
        same_in_group = torch.equal(d["eps"].view(-1, G, 9), d["eps"].view(-1, G, 9)[:, :1].expand(-1, G, 9))
        assert same_in_group == shared
        for rank in (0, 1):  # process `rank` of 2 holds groups 2 rank, 2 rank + 1 of the same draw
            rows = slice(6 * rank, 6 * rank + 6)
            half = Trajectory(**{**traj.__dict__, "cond": traj.cond[rows], "final": traj.final[rows]})
            part = group_noised_elements(
                half,
                adv[rows],
                levels,
                G,
                shared,
                torch.Generator().manual_seed(1),
                Distributed(rank=rank, world_size=2),
            ).data
            mine = torch.cat([torch.arange(6) + 12 * t + 6 * rank for t in range(2)])
            assert torch.equal(part["eps"], d["eps"][mine]) and torch.equal(part["sigma"], d["sigma"][mine])


FAST = ["prompts_per_epoch=10", "group_size=8", "eval_samples_per_class=10", "optim.lr=3e-3"]


@pytest.mark.parametrize("method", ["dgpo", "crd"])
def test_flowdppo_train_raises_the_digits_reward(tmp_path, method):
    """8 epochs from seed 0; the evaluation uses the same fixed noise for the base and the trained policy, so the
    gain is a paired difference. Measured here: dgpo 0.63 -> 0.76, crd 0.63 -> 0.87 (eval/reward); the 0.05 margin
    is under half the smaller gain and above the epoch-to-epoch wobble of an untrained policy."""
    out = tmp_path / method
    assert (
        main(["train", "--method", method, "--out", str(out), "--no-progress", "epochs=8", "eval_every=8", *FAST]) == 0
    )
    base_reward = json.loads((out / "base_eval.json").read_text())["eval/reward"]
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["eval/reward"]
    assert final > base_reward + 0.05, (base_reward, final)


RESUME = {
    # the rollouts run the slow copy after the first step, which then differs from the weights: a resume that lost
    # it would not reproduce the rows
    "dgpo": ["dgpo.ema_sampling_after=0", "dgpo.ema_decay_rate=0.2", "optim.minibatch_size=16"],
    "crd": ["crd.sampling_decay=[1,0.3,0.1,0.9]", "optim.minibatch_size=40"],
}


@pytest.mark.parametrize("method", ["dgpo", "crd"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, method):
    overrides = ["prompts_per_epoch=4", "group_size=4", "eval_samples_per_class=2", "epochs=4", "eval_every=4"]
    overrides += ["checkpoint_every=2", *RESUME[method]]
    whole = train(load_config(method, overrides=overrides), tmp_path / "whole", progress=False)
    assert (whole.path / "checkpoints" / "epoch_000002" / "algorithm.safetensors").is_file()
    copy = tmp_path / "resumed"
    shutil.copytree(whole.path, copy)
    shutil.rmtree(copy / "checkpoints" / "epoch_000004")
    shutil.rmtree(copy / "final")
    resumed = train(load_config(method, overrides=overrides), copy, resume=True, progress=False)
    rows = [{k: v for k, v in r.items() if k != "time_s"} for r in resumed.rows()]
    assert rows == [{k: v for k, v in r.items() if k != "time_s"} for r in whole.rows()]
    assert whole.rows()[-1]["grad_norm"] > 0


@pytest.mark.parametrize(
    "override,message",
    [
        (["--method", "dgpo", "dgpo.train_timesteps=9"], "dgpo.train_timesteps: at most dgpo.trunc_steps + 1 = 7"),
        (["--method", "dgpo", "sampler.num_steps=6"], "dgpo.trunc_steps: must be below sampler.num_steps (6), got 6"),
        (["--method", "dgpo", "dgpo.clip_kl=true", "loss.beta=0"], "dgpo.clip_kl: clips the KL term, which is off"),
        (["--method", "crd", "crd.kl_min=0.5"], "crd.kl_min: must not exceed loss.beta (0.1)"),
        (["--method", "crd", "crd.weight_temp=0"], "crd.weight_temp: 0 is not supported"),
        (["--method", "crd", "crd.old_decay=[0,1.5,0,1]"], "crd.old_decay: must be [start_step >= 0, start in [0, 1]"),
        (["--method", "crd", "optim.lora_rank=0", "optim.fsdp=true"], "optim.fsdp: not supported by crd"),
        (["--method", "dgpo", "crd.beta=2"], "crd.beta: the dgpo algorithm does not use it"),
    ],
)
def test_combinations_that_do_not_apply_are_refused_in_one_line(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists()
