"""A user's video reward, imported by ``reward.names=[user_video_rewards:NAME]`` in the tests."""

import torch


def brightness_and_length(videos, prompts, metadata):
    """Videos (B, F, 3, H, W) uint8, prompt strings, metadata dicts -> mean pixel / 255 + 0.01 x prompt length."""
    assert videos.ndim == 5 and videos.shape[2] == 3 and videos.dtype == torch.uint8, (videos.shape, videos.dtype)
    assert len(prompts) == len(metadata) == videos.shape[0] and all(isinstance(p, str) for p in prompts)
    return videos.float().mean(dim=(1, 2, 3, 4)) / 255 + 0.01 * torch.tensor([len(p) for p in prompts])
