"""Training that cannot learn is loud: a warning at the first epoch with nothing to learn from, a stop after
``stall_epochs`` of them in a row.

An epoch has nothing to learn from when every group's rewards are equal (each reward alike: group-relative
advantages are all zero, there is no signal) or when its update left the policy where it was (a zero gradient
norm at every optimizer step: a LoRA scale of 0, a loss that is identically 0, a frozen layer). A stop is a
``StallError`` (one line, exit code 2); the epochs before it are logged and checkpointed as usual.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowdppo.errors import StallError


def equal_within_groups(rewards: Tensor, group_ids: Tensor) -> bool:
    """Whether, for every reward (column of ``rewards (N, R)``), all samples of each group scored the same."""
    groups = int(group_ids.max()) + 1
    index = group_ids.long().view(-1, 1).expand_as(rewards).to(rewards.device)
    high = rewards.new_full((groups, rewards.shape[1]), -torch.inf).scatter_reduce(0, index, rewards, "amax")
    low = rewards.new_full((groups, rewards.shape[1]), torch.inf).scatter_reduce(0, index, rewards, "amin")
    return bool((high == low).all())


def stall_reason(rewards: Tensor, group_ids: Tensor, update_metrics: dict[str, float]) -> str:
    """Why this epoch had nothing to learn from ("" if it had): equal rewards in every group, or a zero gradient."""
    if equal_within_groups(rewards, group_ids):
        value = float(rewards.mean())
        return (
            f"every group's rewards are equal (mean {value:.4g}): no advantage signal; use a reward that tells "
            "the samples of a prompt apart (reward.names) or larger groups (group_size)"
        )
    if update_metrics.get("grad_norm", 1.0) == 0:
        return (
            "the gradient norm is 0: the update did not move the policy; check optim.lora_alpha, "
            "optim.lora_target_modules and the loss settings"
        )
    return ""


class StallWatch:
    """Counts epochs in a row with nothing to learn from; warns at the first, raises at ``limit`` (0: never)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row = limit, 0

    def check(self, epoch: int, rewards: Tensor, group_ids: Tensor, update_metrics: dict[str, float]) -> None:
        reason = stall_reason(rewards, group_ids, update_metrics) if self.limit else ""
        if not reason:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise StallError(
                f"nothing to learn for {self.in_a_row} epochs in a row (up to epoch {epoch}): {reason} "
                "(stall_epochs=0 trains on regardless)"
            )
        if self.in_a_row == 1:
            tqdm.write(
                f"flowdppo: warning: nothing to learn at epoch {epoch}: {reason}; the run stops after "
                f"{self.limit} such epochs in a row (stall_epochs)"
            )
