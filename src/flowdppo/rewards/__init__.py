"""Rewards: functions of decoded images and their prompts.

A reward maps a batch of images ``(B, C, H, W)`` in ``[0, 1]`` (what ``Policy.decode`` returns), their
prompts (a tensor of labels or a list) and optional per-sample metadata to one float32 score per image
``(B,)``; higher is better. Each reward carries a ``name`` used in logs and configs. ``score`` calls one reward
and checks its scores, ``score_chunks`` every reward of a batch (a remote one overlapping the decoding); the
built-in rewards and the resolution of ``reward.names`` are in ``rewards.registry``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from flowdppo.advantages import AGGREGATIONS, STD_SCOPES
from flowdppo.errors import ConfigError, RewardError
from flowdppo.prompts import PromptBatch
from flowdppo.settings import Section, register_section, require


@dataclass
class RewardConfig(Section):
    """The rewards and how their scores become advantages (``reward.*``)."""

    names: list[str] = field(default_factory=lambda: ["classifier_prob"])
    """Rewards by name: a built-in one (``name``, or ``name@model_path`` for a model reward), a reward server
    (``http://HOST:PORT``) or your own ``module:function``."""
    weights: list[float] = field(default_factory=lambda: [1.0])
    """One weight per reward."""
    aggregation: str = "sum"
    """Multi-reward advantages: "sum" (weighted sum) or "gdpo"."""
    std_scope: str = "batch"
    """Advantage std over the whole "batch" or each "group"."""
    video_frames: int = 4
    """text_to_video: frames an image reward scores, evenly spaced from first to last (0: every frame)."""
    video_aggregation: str = "mean"
    """text_to_video: an image reward's per-frame scores -> one per video: "mean" or "min"."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        return {"aggregation": AGGREGATIONS, "std_scope": STD_SCOPES, "video_aggregation": ("mean", "min")}

    def check(self, prefix: str = "reward.") -> None:
        self.check_choices(prefix)
        require(self, prefix, ">= 0", "video_frames")
        if sum(self.weights) == 0:
            raise ConfigError(
                f"{prefix}weights: must not sum to 0 (the logged reward is their weighted mean), got {self.weights}"
            )
        if len(self.weights) != len(self.names) or not self.names:
            raise ConfigError(
                f"{prefix}weights: need one weight per reward name ({len(self.names)} names, "
                f"{len(self.weights)} weights)"
            )


register_section("reward", RewardConfig)


@runtime_checkable
class Reward(Protocol):
    """``reward(images, prompts, metadata) -> (B,) float32``, higher is better."""

    name: str

    def __call__(self, images: Tensor, prompts: Tensor | Sequence[Any], metadata: Any = None) -> Tensor:
        """Score ``images`` (B, C, H, W) in ``[0, 1]`` against ``prompts`` (B items) -> ``(B,)`` float32."""
        ...


def load_user_reward(path: str) -> Reward:
    """Import ``module:function`` (the module on ``sys.path``), a callable ``(images, prompts, metadata) -> (B,)``."""
    module_name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # a module in the working folder, as `python -m` finds it
        sys.path.insert(0, os.getcwd())
    try:
        reward = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise RewardError(f"reward.names: cannot import {path!r} ({type(err).__name__}: {err})") from err
    if not callable(reward):
        raise RewardError(f"reward.names: {path!r} is not callable")
    return reward


def reward_arguments(prompts: Any) -> tuple[Any, Any]:
    """``(prompts, metadata)`` as a reward is called with them: the texts and metadata dicts of a ``PromptBatch``,
    other prompts (digit labels) as they are with ``None``."""
    return (prompts.text, prompts.metadata) if isinstance(prompts, PromptBatch) else (prompts, None)


def check_shape(scores: Any, name: str, batch: int) -> Tensor:
    """``scores`` as float32 if it is a tensor of shape ``(batch,)``; a RewardError otherwise."""
    if not isinstance(scores, Tensor) or scores.shape != (batch,):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise RewardError(f"reward {name!r} returned {got}; a reward returns a tensor of shape ({batch},)")
    return scores.to(torch.float32)


def score(reward: Reward, name: str, images: Tensor, prompts: Any) -> Tensor:
    """``reward(images, prompts, metadata)`` checked to be one float score per image: ``(B,)`` float32.

    Prompts are passed as ``reward_arguments`` makes them.
    """
    texts, metadata = reward_arguments(prompts)
    try:
        scores = reward(images, texts, metadata)
    except RewardError:
        raise
    except Exception as err:  # a user's reward may raise anything; say where it came from
        raise RewardError(
            f"reward {name!r} raised {type(err).__name__}: {err} (a reward is called as "
            "reward(images, prompts, metadata))"
        ) from err
    return check_shape(scores, name, images.shape[0])


def score_chunks(reward_fns: list[tuple[str, Any]], chunks: Iterable[Tensor] | Tensor, prompts: Any) -> Tensor:
    """Every reward's scores of the images decoded as ``chunks`` (in order) -> ``(B, num_rewards)`` float32.

    A reward with ``submit`` (a remote one: ``submit(images, prompts, metadata).result()`` waits for its scores) is
    sent each chunk as soon as it is decoded: its server scores it while the next chunk decodes and the in-process
    rewards run. The others score the whole batch at the end, exactly as ``score`` does.
    """
    chunks = [chunks] if isinstance(chunks, Tensor) else chunks
    remote = [k for k, (_, fn) in enumerate(reward_fns) if hasattr(fn, "submit")]
    pending: dict[int, list[Any]] = {k: [] for k in remote}
    parts, start = [], 0
    for part in chunks:
        texts, metadata = reward_arguments(prompts[start : start + part.shape[0]])
        for k in remote:
            pending[k].append(reward_fns[k][1].submit(part, texts, metadata))
        parts.append(part)
        start += part.shape[0]
    images = torch.cat(parts)
    columns = []
    for k, (name, fn) in enumerate(reward_fns):
        if k in pending:
            scores = torch.cat([p.result() for p in pending[k]]).to(images.device)
            columns.append(check_shape(scores, name, images.shape[0]))
        else:
            columns.append(score(fn, name, images, prompts))
    return torch.stack(columns, dim=1)


__all__ = ["Reward", "check_shape", "load_user_reward", "reward_arguments", "score", "score_chunks"]
