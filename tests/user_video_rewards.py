"""A user's video reward, imported by ``reward.names=[user_video_rewards:NAME]`` in the tests."""

import torch


def brightness_and_length(videos, prompts, metadata):
    """Videos (B, F, 3, H, W) in [0, 1], prompt strings, metadata dicts -> mean pixel + 0.01 x prompt length."""
    assert videos.ndim == 5 and videos.shape[2] == 3 and videos.dtype == torch.float32
    assert len(prompts) == len(metadata) == videos.shape[0] and all(isinstance(p, str) for p in prompts)
    return videos.mean(dim=(1, 2, 3, 4)) + 0.01 * torch.tensor([len(p) for p in prompts])
