"""Data-parallel training on ``torch.distributed``, launched by ``torchrun`` or ``accelerate launch``.

One process per GPU (or per CPU worker, gloo). What each process does and what they share:

- **prompts**: every process draws the same global list of ``P`` groups; process ``r`` rolls out groups
  ``r * P / N .. (r + 1) * P / N - 1`` (a group never straddles processes, so ``P`` must divide by ``N``);
- **noise**: one generator, seeded identically everywhere, draws the noise of the whole global batch and
  each process keeps its own rows. Processes get different noise, a run on ``N`` processes samples exactly
  what one process samples, and the generator state (saved in checkpoints) is the same on every process;
- **rewards**, path KL: gathered, so advantages use the global group and batch statistics;
- **gradients**: averaged by ``DistributedDataParallel``; a mini-batch of ``M`` elements is ``M / N`` per
  process, so the mean loss is the same as on one process;
- **files**: metrics, evaluations, checkpoints and plots are written by process 0 only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flowdppo.errors import ConfigError


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: ``rank`` of ``world_size`` (1 = not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def device(self, name: str) -> torch.device:
        """``cuda`` means this process's GPU (``cuda:LOCAL_RANK``) when distributed."""
        if name == "cuda" and self.enabled:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def share(self, total: int, what: str) -> int:
        """``total / world_size``; ``what`` names the setting when it does not divide."""
        if total % self.world_size:
            raise ConfigError(f"{what}: {total} must be divisible by the number of processes ({self.world_size})")
        return total // self.world_size

    def rows(self, total: int, what: str) -> slice:
        """This process's contiguous share of ``total`` rows."""
        size = self.share(total, what)
        return slice(self.rank * size, (self.rank + 1) * size)

    def gather(self, tensor: Tensor) -> Tensor:
        """Concatenate every process's ``tensor`` (same shape everywhere) along dim 0, in rank order."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process if ``flag`` is true on any."""
        if not self.enabled:
            return flag
        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def reduce_metrics(self, metrics: dict[str, float], device: torch.device) -> dict[str, float]:
        """Mean over processes; ``*_max`` / ``*_min`` keys take the max / min."""
        if not self.enabled or not metrics:
            return metrics
        out = {}
        for op, keep in ((dist.ReduceOp.MAX, "_max"), (dist.ReduceOp.MIN, "_min"), (dist.ReduceOp.SUM, None)):
            keys = [k for k in sorted(metrics) if (k.endswith(keep) if keep else not k.endswith(("_max", "_min")))]
            if not keys:
                continue
            values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(values, op=op)
            if keep is None:
                values /= self.world_size
            out.update(zip(keys, values.tolist(), strict=True))
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def wrap(self, policy: nn.Module) -> nn.Module:
        """``DistributedDataParallel`` over the trainable parameters (the policy itself on one process)."""
        if not self.enabled:
            return policy
        device_ids = [self.local_rank] if next(policy.parameters()).is_cuda else None
        return nn.parallel.DistributedDataParallel(policy, device_ids=device_ids)


def init_distributed() -> Distributed:
    """Join the process group the launcher set up (``WORLD_SIZE`` > 1), or run as a single process.

    NCCL on GPUs, gloo on CPU. ``torchrun`` and ``accelerate launch`` both set ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shared_randn(
    generator: torch.Generator | None, total: int, rows: slice, shape: tuple[int, ...], device, dtype=torch.float32
) -> Tensor:
    """This process's ``rows`` of standard normal noise ``(total, *shape)`` for the global batch."""
    return torch.randn((total, *shape), generator=generator, device=device, dtype=dtype)[rows]
