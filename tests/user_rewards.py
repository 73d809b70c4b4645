"""Rewards of a user's own, imported by ``reward.names=[user_rewards:NAME]`` in the tests."""

import torch


def brightness(images, prompts):
    """A valid reward: mean pixel value, (B,)."""
    return images.mean(dim=(1, 2, 3))


def nan_reward(images, prompts):
    """A broken reward: NaN for every image."""
    return torch.full((images.shape[0],), float("nan"))


def two_scores_per_image(images, prompts):
    """A broken reward: shape (B, 2) instead of (B,)."""
    return torch.zeros(images.shape[0], 2)
