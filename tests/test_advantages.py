"""Group-relative advantages and multi-reward aggregation against hand and numpy computations."""

import numpy as np
import pytest
import torch

from flowdppo.advantages import aggregate_rewards, group_advantages
from flowdppo.config import load_config


def test_hand_computed_batch_std():
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    groups = torch.tensor([0, 0, 1, 1])
    # group means 2, 2, 12, 12; population std of the batch: sqrt(mean((r - 7)^2)) = sqrt(27.5)
    expected = torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (27.5**0.5 + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, groups), expected)


def test_hand_computed_group_std():
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    groups = torch.tensor([7, 7, 2, 2])  # any ids, any order
    expected = torch.tensor([-1.0 / (1 + 1e-4), 1.0 / (1 + 1e-4), -2.0 / (2 + 1e-4), 2.0 / (2 + 1e-4)])
    torch.testing.assert_close(group_advantages(rewards, groups, std_scope="group"), expected)


def test_population_std_matches_numpy():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=24)
    groups = np.repeat(np.arange(6), 4)
    rng.shuffle(groups)
    out = group_advantages(torch.tensor(rewards), torch.tensor(groups), std_scope="group").numpy()
    for g in range(6):
        r = rewards[groups == g]
        np.testing.assert_allclose(out[groups == g], (r - r.mean()) / (r.std() + 1e-4), rtol=1e-5)


@pytest.mark.parametrize("std_scope", ["batch", "group"])
def test_identical_rewards_give_zero_not_nan(std_scope):
    rewards = torch.tensor([0.5, 0.5, 0.5, 2.0, 2.0, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    out = group_advantages(rewards, groups, std_scope=std_scope)
    assert torch.equal(out, torch.zeros(6))
    single = group_advantages(torch.tensor([1.0]), torch.tensor([0]), std_scope=std_scope)
    assert torch.equal(single, torch.zeros(1))


@pytest.mark.parametrize("std_scope", ["batch", "group"])
def test_eps_zero_gives_zero_for_a_constant_or_one_sample_group(std_scope):
    """Not 0 / 0: the docstring's 0 for any eps; the other groups are plain z-scores."""
    rewards = torch.tensor([0.3, 0.3, 0.3, 1.0, 3.0, 7.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])  # constant, two samples (mean 2, std 1), one sample
    out = group_advantages(rewards, groups, std_scope=std_scope, eps=0.0)
    assert torch.equal(out[[0, 1, 2, 5]], torch.zeros(4))
    std = 1.0 if std_scope == "group" else float(rewards.std(unbiased=False))
    torch.testing.assert_close(out[3:5], torch.tensor([-1.0, 1.0]) / std)
    assert torch.equal(group_advantages(torch.full((4,), 2.5), torch.zeros(4), std_scope, eps=0.0), torch.zeros(4))
    assert torch.equal(group_advantages(torch.tensor([4.0]), torch.tensor([0]), std_scope, eps=0.0), torch.zeros(1))


def test_the_dance_grpo_preset_normalises_each_group_by_its_own_std():
    """DanceGRPO's ``--use_group`` (every public script): per-group z-scores; the Flow-GRPO preset keeps the batch's."""
    cfg = load_config("dance_grpo")
    assert (cfg.reward.std_scope, load_config("flow_grpo").reward.std_scope) == ("group", "batch")
    rewards = torch.tensor([1.0, 3.0, 2.0, 10.0, 20.0, 30.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    weights = torch.tensor(cfg.reward.weights)
    out = aggregate_rewards(rewards[:, None], groups, weights, cfg.reward.aggregation, cfg.reward.std_scope)
    s0, s1 = (2 / 3) ** 0.5 + 1e-4, (200 / 3) ** 0.5 + 1e-4  # population stds of (1, 3, 2) and (10, 20, 30)
    torch.testing.assert_close(out, torch.tensor([-1 / s0, 1 / s0, 0.0, -10 / s1, 0.0, 10 / s1]))


def test_gdpo_matches_numpy():
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(12, 2)) * np.array([1.0, 30.0])  # very different reward scales
    groups = np.repeat(np.arange(3), 4)
    weights = np.array([1.0, 0.5])
    normalised = np.zeros_like(rewards)
    for g in range(3):
        r = rewards[groups == g]
        normalised[groups == g] = (r - r.mean(0)) / (r.std(0) + 1e-4)
    summed = normalised @ weights
    expected = (summed - summed.mean()) / (summed.std() + 1e-4)
    out = aggregate_rewards(torch.tensor(rewards), torch.tensor(groups), torch.tensor(weights), method="gdpo")
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    # a plain sum is dominated by the large-scale reward; GDPO is not
    plain = aggregate_rewards(torch.tensor(rewards), torch.tensor(groups), torch.tensor(weights), method="sum")
    corr_plain = np.corrcoef(plain.numpy(), rewards[:, 1])[0, 1]
    corr_gdpo = np.corrcoef(out.numpy(), rewards[:, 1])[0, 1]
    assert corr_plain > 0.95 and corr_gdpo < corr_plain - 0.1, (corr_plain, corr_gdpo)


def test_weighted_sum():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [0.0, 0.0]])
    groups = torch.tensor([0, 0, 1, 1])
    out = aggregate_rewards(rewards, groups, torch.tensor([2.0, 1.0]), method="sum")
    torch.testing.assert_close(out, group_advantages(torch.tensor([2.0, 1.0, 6.0, 0.0]), groups))


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="std_scope must be one of"):
        group_advantages(torch.ones(2), torch.zeros(2), std_scope="global")
    with pytest.raises(ValueError, match="rewards and group_ids"):
        group_advantages(torch.ones(2), torch.zeros(3))
    with pytest.raises(ValueError, match="method must be one of"):
        aggregate_rewards(torch.ones(2, 2), torch.zeros(2), method="max")
    with pytest.raises(ValueError, match="weights must have shape"):
        aggregate_rewards(torch.ones(2, 2), torch.zeros(2), torch.ones(3))


def test_a_group_of_equal_rewards_gets_exactly_zero_advantages():
    """A float32 mean of eight 123.7s is not 123.7; dividing the rounding by 0 + eps must not make it -0.07."""
    rewards = torch.tensor([123.7] * 8 + [1.0, 2.0, 3.0, 4.0])
    groups = torch.tensor([0] * 8 + [1] * 4)
    for scope in ("group", "batch"):
        adv = group_advantages(rewards, groups, std_scope=scope)
        assert torch.equal(adv[:8], torch.zeros(8)), (scope, adv[:8])
        assert adv[8:].abs().min() > 0
    two = torch.stack([rewards, torch.tensor([0.3] * 8 + [5.0, 1.0, 2.0, 0.0])], dim=1)
    gdpo = aggregate_rewards(two, groups, method="gdpo")
    assert torch.equal(gdpo[:8], torch.full((8,), gdpo[0].item()))  # both rewards constant: one value
    per_reward = group_advantages(two[:, 1], groups, std_scope="group")
    assert torch.equal(per_reward[:8], torch.zeros(8))
