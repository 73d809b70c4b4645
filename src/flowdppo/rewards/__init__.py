"""Rewards: functions of decoded images and their prompts.

A reward maps a batch of images ``(B, C, H, W)`` in ``[0, 1]`` (what ``Policy.decode`` returns), their
prompts (a tensor of labels or a list) and optional per-sample metadata to one float32 score per image
``(B,)``; higher is better. Each reward carries a ``name`` used in logs and configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Reward(Protocol):
    """``reward(images, prompts, metadata) -> (B,) float32``, higher is better."""

    name: str

    def __call__(self, images: Tensor, prompts: Tensor | Sequence[Any], metadata: Any = None) -> Tensor:
        """Score ``images`` (B, C, H, W) in ``[0, 1]`` against ``prompts`` (B items) -> ``(B,)`` float32."""
        ...


__all__ = ["Reward"]
