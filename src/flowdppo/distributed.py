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
- **weights** (``optim.fsdp``, full fine-tuning): instead of DDP, FSDP2 shards the transformer and the
  frozen reference, each process holding ``1 / N`` of every parameter and of the optimizer state.
  Every forward is then a collective, so every process evaluates and samples the grids too;
  checkpoints and final weights are gathered into the full state a single process would hold;
- **files**: metrics, evaluations, checkpoints and plots are written by process 0 only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from flowdppo.errors import ConfigError
from flowdppo.policies.lora import experts


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
        """``cuda`` means this process's GPU (``cuda:LOCAL_RANK``) when distributed; a device this machine does
        not have is a ``ConfigError``."""
        try:
            device = torch.device(name)
        except RuntimeError as err:
            raise ConfigError(f"device: {name!r} is not a device name (cpu, cuda, cuda:1, mps, ...)") from err
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {name} is not available on this machine (CUDA devices: "
                f"{torch.cuda.device_count()}); use device=cpu"
            )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"device: {name} is not available on this machine; use device=cpu")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"device: {name} is not supported; use cpu, cuda or mps")
        if name == "cuda" and self.enabled:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

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

    def wrap(self, policy: nn.Module, fsdp: bool = False) -> nn.Module:
        """The module the update runs: ``DistributedDataParallel`` over the trainable parameters, or with
        ``fsdp`` the policy itself, sharded in place (``shard``). The policy itself on one process."""
        if not self.enabled:
            return policy
        if fsdp:
            return self.shard(policy)
        device_ids = [self.local_rank] if next(policy.parameters()).is_cuda else None
        # two experts: a mini-batch may reach only one of them (and another process the other)
        return nn.parallel.DistributedDataParallel(
            policy, device_ids=device_ids, find_unused_parameters=len(experts(policy)) > 1
        )

    def wrap_frozen(self, module: nn.Module | None, fsdp: bool = False) -> nn.Module | None:
        """A frozen module (the reference policy): sharded like the policy with ``fsdp``, else as it is."""
        return self.shard(module) if fsdp and module is not None else module

    def shard(self, policy: nn.Module) -> nn.Module:
        """FSDP2, in place: ``fully_shard`` each transformer block, then the policy (the rest of its weights).

        Each process keeps ``1 / world_size`` of every parameter (a ``DTensor``). A forward through the
        policy's ``__call__`` (not ``.velocity``) gathers each block's weights just before it runs and frees
        them after, so every process must run every forward; backward reduce-scatters the mean gradient.
        """
        if not self.enabled:
            return policy
        if torch.torch_version.TorchVersion(torch.__version__) < (2, 7):
            raise ConfigError(f"optim.fsdp: needs torch >= 2.7 (fully_shard, ignored_params), not {torch.__version__}")
        if len(experts(policy)) > 1:
            raise ConfigError(
                "optim.fsdp: not supported for a two-expert model (each process may run a different "
                "expert, and sharded forwards must match); train it with LoRA (DDP)"
            )
        from torch.distributed.fsdp import fully_shard

        for block in policy.shard_units():
            fully_shard(block)
        # the root too (every transformer parameter is sharded between calls); frozen parts outside the
        # transformer (a VAE, prompt tables) stay whole on every process
        outside = set(policy.parameters()) - set(policy.transformer.parameters())
        fully_shard(policy, reshard_after_forward=True, ignored_params=outside)
        return policy

    @contextmanager
    def gradient_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """One micro-batch's backward: DDP averages the gradients only when ``sync`` (``no_sync`` otherwise,
        to accumulate locally); FSDP reduce-scatters every micro-batch and accumulates the sharded sums
        (its no-sync mode would hold a full, unsharded gradient on every process)."""
        if sync or not self.enabled or is_sharded(model):
            yield
        else:
            with model.no_sync():
                yield

    def full_model(self, policy: nn.Module, blank: Callable[[], nn.Module]) -> nn.Module | None:
        """``policy`` itself; when sharded, its gathered weights (a collective) loaded into ``blank()`` on
        process 0, and None elsewhere."""
        if not is_sharded(policy):
            return policy
        state = get_model_state_dict(policy, options=FULL_STATE)
        if not self.is_main:
            return None
        full = blank()
        full.load_state_dict(state)
        return full


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Gathered, unsharded state dicts on CPU, on process 0 only (the other processes get empty ones)."""


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` was sharded by ``fully_shard`` (FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2, nothing is sharded
        return False
    return isinstance(module, FSDPModule)


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_``; for FSDP's sharded parameters the norm is the global one, returned
    as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor for sharded parameters


def gather_full_state(policy: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """The transformer's weights and the optimizer state of a sharded policy as one process would hold them
    (``transformer.state_dict()``, ``optimizer.state_dict()`` keyed by parameter index), on CPU.

    A collective: every process calls it; process 0 gets the state, the others empty dicts.
    """
    weights = get_model_state_dict(policy.transformer, options=FULL_STATE)
    by_name = get_optimizer_state_dict(policy, optimizer, options=FULL_STATE)
    if not by_name:
        return weights, {}
    index = {name: i for i, name in enumerate(name for group in by_name["param_groups"] for name in group["params"])}
    return weights, _renamed(by_name, index)


def load_full_state(
    policy: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Tensor], optimizer_state: dict
) -> None:
    """The inverse of ``gather_full_state``: every process passes the full state and keeps its shards."""
    set_model_state_dict(policy.transformer, weights, options=StateDictOptions(full_state_dict=True))
    fqn = {param: name for name, param in policy.named_parameters()}
    name = dict(enumerate(fqn[p] for group in optimizer.param_groups for p in group["params"]))
    by_name = _renamed(optimizer_state, name)
    set_optimizer_state_dict(policy, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _renamed(optimizer_state: dict, key: dict) -> dict:
    """An optimizer state dict with each parameter key ``k`` (index or name) replaced by ``key[k]``."""
    return {
        "state": {key[k]: slots for k, slots in optimizer_state["state"].items()},
        "param_groups": [{**g, "params": [key[k] for k in g["params"]]} for g in optimizer_state["param_groups"]],
    }


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
