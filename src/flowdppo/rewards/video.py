"""Rewards of text-to-video fine-tuning.

Videos are ``(B, F, 3, H, W)`` float32 in ``[0, 1]`` (what ``WanPolicy.decode`` returns), prompts ``B`` strings,
metadata ``B`` dicts (or ``None``); each reward returns ``(B,)`` float32, higher is better. A user's
``module:function`` is called as ``(videos, prompts, metadata)`` with the videos as 8-bit frames, ``(B, F, 3, H, W)``
uint8, ``round(255 x)`` (``UserVideoReward``), as a video file would hold them.

- ``FrameReward``: an image reward on ``n`` evenly spaced frames ``f_1 .. f_n`` (first to last), aggregated per
  video: ``mean_i r(x_{f_i})`` (or ``min_i``);
- ``temporal_consistency``: ``mean_f cos(phi(x_f), phi(x_{f+1}))`` over consecutive frames, with ``phi`` the
  frame's pixels average-pooled to at most ``16 x 16`` (all channels), minus their mean (a correlation, in
  ``[-1, 1]``; 1 for a still video). Pixel features, no model: it rewards smooth, flicker-free motion, and
  stillness too, so pair it with a content reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

from flowdppo.errors import RewardError
from flowdppo.rewards import Reward

FEATURE_SIDE = 16


def frame_indices(num_frames: int, count: int) -> list[int]:
    """``count`` frame indices ``round(linspace(0, F - 1, count))`` (every frame when ``count`` is 0 or >= F)."""
    if count <= 0 or count >= num_frames:
        return list(range(num_frames))
    return torch.linspace(0, num_frames - 1, count).round().long().tolist()


def check_videos(videos: Tensor) -> None:
    if videos.ndim != 5 or videos.shape[2] not in (1, 3):
        raise ValueError(f"video rewards take videos (B, F, 3, H, W), got {tuple(videos.shape)}")


class FrameReward:
    """An image reward on ``count`` evenly spaced frames of each video, aggregated by ``mean`` or ``min``."""

    def __init__(self, reward: Reward, name: str, count: int = 4, aggregation: str = "mean") -> None:
        self.reward, self.name, self.count, self.aggregation = reward, name, count, aggregation

    def __call__(self, videos: Tensor, prompts: Sequence[Any], metadata: Any = None) -> Tensor:
        check_videos(videos)
        batch, index = videos.shape[0], frame_indices(videos.shape[1], self.count)
        frames = videos[:, index].flatten(0, 1)  # (B n, 3, H, W), video-major
        texts = [p for p in prompts for _ in index]
        metas = None if metadata is None else [m for m in metadata for _ in index]
        scores = self.reward(frames, texts, metas)
        if not isinstance(scores, Tensor) or scores.shape != (len(frames),):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise RewardError(f"reward {self.name!r} returned {got} for {len(frames)} frames")
        per_frame = scores.float().reshape(batch, len(index))
        return per_frame.mean(1) if self.aggregation == "mean" else per_frame.amin(1)


def frame_features(videos: Tensor, side: int = FEATURE_SIDE) -> Tensor:
    """``phi``: each frame average-pooled to at most ``side x side``, flattened, minus its mean: ``(B, F, D)``."""
    check_videos(videos)
    batch, frames = videos.shape[:2]
    size = (min(side, videos.shape[-2]), min(side, videos.shape[-1]))
    pooled = functional.adaptive_avg_pool2d(videos.flatten(0, 1).float(), size).reshape(batch, frames, -1)
    return pooled - pooled.mean(-1, keepdim=True)


class TemporalConsistencyReward:
    """``mean_f cos(phi(x_f), phi(x_{f+1}))`` over consecutive frames (1 for a one-frame video)."""

    name = "temporal_consistency"

    def __call__(self, videos: Tensor, prompts: Sequence[Any], metadata: Any = None) -> Tensor:
        features = frame_features(videos)
        if features.shape[1] < 2:
            return torch.ones(features.shape[0], device=videos.device)
        cos = functional.cosine_similarity(features[:, 1:], features[:, :-1], dim=-1, eps=1e-8)
        return cos.mean(1)


def to_uint8(videos: Tensor) -> Tensor:
    """``[0, 1]`` floats -> 8-bit values ``round(255 x)``, uint8 (the same shape)."""
    return (videos.float().clamp(0, 1) * 255).round().to(torch.uint8)


class UserVideoReward:
    """A user's ``(videos, prompts, metadata) -> (B,)`` callable, given the videos ``(B, F, 3, H, W)`` as uint8."""

    def __init__(self, fn: Any, name: str) -> None:
        self.fn, self.name = fn, name

    def __call__(self, videos: Tensor, prompts: Sequence[Any], metadata: Any = None) -> Tensor:
        check_videos(videos)
        return self.fn(to_uint8(videos), prompts, metadata)
