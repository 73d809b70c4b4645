"""Rewards of a user's own, imported by ``reward.names=[user_rewards:NAME]`` in the tests."""

import torch


def brightness(images, prompts, metadata):
    """A valid reward: mean pixel value, (B,)."""
    return images.mean(dim=(1, 2, 3))


def nan_reward(images, prompts, metadata):
    """A broken reward: NaN for every image."""
    return torch.full((images.shape[0],), float("nan"))


def two_scores_per_image(images, prompts, metadata):
    """A broken reward: shape (B, 2) instead of (B,)."""
    return torch.zeros(images.shape[0], 2)


def prompt_length(images, prompts, metadata):
    """A text-to-image reward: (images, prompt strings, metadata dicts) -> mean pixel + 0.01 x prompt length."""
    assert len(prompts) == len(metadata) == images.shape[0] and all(isinstance(p, str) for p in prompts)
    return images.mean(dim=(1, 2, 3)) + 0.01 * torch.tensor([len(p) for p in prompts], dtype=images.dtype)


def raises(images, prompts, metadata):
    """A broken reward: its service is down."""
    raise RuntimeError("the reward server is down")


def two_arguments(images, prompts):
    """A reward written for an older calling convention."""
    return images.mean(dim=(1, 2, 3))


def sometimes_nan(images, prompts, metadata):
    """Mean pixel value, but NaN for the whole batch on some batches (a function of the images alone, so a
    resumed run meets the same NaNs)."""
    scores = images.mean(dim=(1, 2, 3))
    return scores * float("nan") if int(images.sum() * 1000) % 3 == 0 else scores


def constant(images, prompts, metadata):
    """A reward that cannot tell images apart: 0.5 for every image (no advantage signal)."""
    return torch.full((images.shape[0],), 0.5)
