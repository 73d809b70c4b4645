"""What every algorithm shares: training elements, the mini-batch loop, accumulation, the non-finite guard.

An algorithm turns a rollout and its advantages into **elements**, a ``(T, B)`` grid of training units
(sample ``b`` at trained step or sampled noise level ``t``) stored flat as ``(T * B, ...)`` tensors with
element ``e = t * B + b``, and into a **loss** of a mini-batch of elements. ``Algorithm.update`` runs
``inner_epochs`` passes over the elements in shuffled mini-batches with gradient accumulation, gradient
sync across processes, clipping and the non-finite guard; a subclass writes ``elements`` and ``loss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flowdppo.distributed import Distributed, clip_grad_norm
from flowdppo.errors import NonFiniteError
from flowdppo.losses import log_ratio_moments, scaled_divergence_quantiles
from flowdppo.policies.lora import trainable_parameters

if TYPE_CHECKING:
    from flowdppo.rollout import Trajectory


def with_reference_kl(loss: Tensor, metrics: dict[str, Tensor], beta: float, kl: Callable[[], Tensor]) -> Tensor:
    """``loss + beta * KL`` to the frozen base (``loss.beta``), the ``KL`` computed (and logged as ``ref_kl``) only
    when ``beta > 0``: it costs a forward of the base."""
    if beta <= 0:
        return loss
    value = kl()
    metrics["ref_kl"] = value.detach()
    return loss + beta * value


@dataclass
class Elements:
    """A ``(steps, batch)`` grid of training elements stored flat: ``data[key]`` is ``(steps * batch, ...)``
    and ``data["sample"]`` the sample (row of the trajectory) of each element."""

    data: dict[str, Tensor]
    steps: int
    batch: int

    def select(self, index: Tensor) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.data.items()}


class Algorithm:
    """Base class: subclasses set ``name``, ``reads`` and write ``elements`` and ``loss``.

    sections:           its settings sections, ``{"nft": NFTConfig}`` (dataclasses subclassing ``settings.Section``,
                        composed into the config as ``nft.*``).
    presets:            its method presets, ``{"diffusion_nft": {"sampler": {...}, ...}}`` (``--method NAME``).
    reads:              the keys (``"loss.beta"``) or sections (``"nft."``) of the algorithm sections it uses;
                        setting a key of another algorithm's section is refused.
    supports_fsdp:      it runs on a policy sharded by FSDP2 (``optim.fsdp``).

    ``cfg`` is the resolved ``TrainConfig``: the algorithm reads its own section and the run's ``sampler``,
    ``optim``, ``consistency_tolerance``.
    """

    name: ClassVar[str]
    sections: ClassVar[dict[str, type]] = {}
    presets: ClassVar[dict[str, dict]] = {}
    reads: ClassVar[tuple[str, ...]] = ()
    supports_fsdp: ClassVar[bool] = True

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.epoch = 0
        self.optimizer_steps = 0  # taken over the whole run (checkpointed by algorithms that use it)

    @classmethod
    def config_error(cls, cfg: Any) -> str | None:
        """Why ``cfg`` cannot run with this algorithm (a check across sections, e.g. the sampler), or None."""
        return None

    # ---- what a subclass writes
    def elements(
        self, traj: Trajectory, advantages: Tensor, policy: nn.Module, rng: torch.Generator, dist: Distributed
    ) -> Elements:
        raise NotImplementedError

    def loss(
        self, velocity, base_velocity, mb: dict[str, Tensor], cond: Any, first: bool, dist: Distributed
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean loss of a mini-batch and its metrics (detached 0-d tensors); ``first``: the rollout's first
        mini-batch, before any update. Optional per-element values (1-d, one per element of the mini-batch)
        go under ``ELEMENT_DIM_KL`` / ``ELEMENT_LOG_RATIO``; ``update`` turns them into ``mechanism_metrics``."""
        raise NotImplementedError

    # ---- optional: extra weights (a sampling or slow policy), and state to checkpoint
    def setup(self, policy: nn.Module) -> None:
        """Called once the policy is trainable, before any checkpoint is loaded."""

    @contextmanager
    def sampling_weights(self, policy: nn.Module):
        """Inside the block the policy runs the weights rollouts sample with (default: the current ones)."""
        yield

    def after_update(self, policy: nn.Module) -> None:
        """Called once the rollout's inner epochs are done."""

    def mechanism_counts(self, dist: Distributed) -> dict | None:
        """The last update's mechanism test (``flowdppo.mechanism.summary``), summed over processes (every process
        calls it), or None: the algorithm does not log one."""
        return None

    def epoch_data(self, epoch: int, rng: torch.Generator, dist: Distributed) -> tuple[Any, Tensor] | None:
        """``(batch, weights)`` that epoch ``epoch`` trains on when the algorithm takes its data from a file or a
        folder: ``update`` takes them in place of ``(traj, advantages)``, ``batch`` with the prompts ``cond``, and the
        epoch has no rollout and no reward. None (the default): the epoch rolls out."""
        return None

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass

    # ---- the shared loop
    def update(
        self,
        policy: nn.Module,
        optimizer: torch.optim.Optimizer,
        traj: Trajectory,
        advantages: Tensor,
        rng: torch.Generator,
        base_velocity,
        *,
        epoch: int,
        guard: NonFiniteGuard | None = None,
        dist: Distributed | None = None,
    ) -> dict[str, float]:
        """``inner_epochs`` passes over the rollout's elements in shuffled mini-batches; returns mean metrics.

        ``policy`` may be wrapped in DDP or sharded by FSDP (its ``forward`` is the velocity): each process then
        takes ``minibatch_size / world_size`` of its own elements per mini-batch and the gradients are averaged.
        """
        cfg, self.epoch = self.cfg, epoch
        dist = dist or Distributed()
        guard = guard or NonFiniteGuard("stop", 1)
        velocity = partial(policy, guidance_scale=cfg.sampler.guidance_scale)
        elements = self.elements(traj, advantages, policy, rng, dist)
        accum = cfg.optim.grad_accum
        size = dist.share(cfg.optim.minibatch_size, "optim.minibatch_size")
        history: list[dict[str, Tensor]] = []
        steps_before = self.optimizer_steps
        moved: dict[str, list[Tensor]] = {ELEMENT_DIM_KL: [], ELEMENT_LOG_RATIO: []}  # after the first step
        params = trainable_parameters(policy)  # the policy stays in eval mode: no dropout between rollout and replay
        for inner in range(cfg.optim.inner_epochs):
            chunks = list(shuffled_elements(rng, elements.steps, elements.batch, dist).split(size))
            window_ok = True  # no non-finite loss in this optimizer step's mini-batches
            for k, index in enumerate(chunks):
                last_of_window = (k + 1) % accum == 0 or k + 1 == len(chunks)
                mb = elements.select(index)
                cond = index_cond(traj.cond, mb["sample"])
                with dist.gradient_sync(policy, last_of_window):
                    loss, metrics = self.loss(velocity, base_velocity, mb, cond, inner == 0 and k == 0, dist)
                    per_element = {key: metrics.pop(key) for key in moved if key in metrics}
                    if self.optimizer_steps > steps_before:  # the policy has moved since the rollout
                        for key, value in per_element.items():
                            moved[key].append(value.detach())
                    where = f"epoch {epoch}, inner epoch {inner}, mini-batch {k}"
                    if guard.ok(where, loss=loss.detach()):
                        (loss / accum).backward()
                    else:
                        window_ok = False
                metrics["loss"] = loss.detach()
                if last_of_window:
                    grad_norm = clip_grad_norm(params, cfg.optim.max_grad_norm or math.inf)
                    if window_ok and guard.ok(where, grad_norm=grad_norm):
                        optimizer.step()
                        guard.stepped()
                        self.optimizer_steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    metrics["grad_norm"] = grad_norm.detach()
                    window_ok = True
                history.append(metrics)
        self.after_update(policy)
        metrics = dist.reduce_metrics(average_metrics(history), advantages.device)
        counts = {  # what the update cost, in units that do not depend on the machine
            "trained_elements": float(elements.steps * elements.batch * cfg.optim.inner_epochs * dist.world_size),
            "optimizer_steps": float(self.optimizer_steps - steps_before),
        }
        return metrics | counts | mechanism_metrics(moved, dist)


ELEMENT_DIM_KL = "elements/dim_kl"  # dim * D of each element of a mini-batch
ELEMENT_LOG_RATIO = "elements/log_ratio"  # logp_new - logp_old of each element


def mechanism_metrics(moved: dict[str, list[Tensor]], dist: Distributed) -> dict[str, float]:
    """The update's trust-region mechanism, from the per-element values of the mini-batches replayed after
    its first optimizer step (the ones before it have ``rho = 1``, ``D = 0`` by construction).

    ``dim_kl_p50`` / ``_p90`` / ``_p99``: quantiles of ``dim * D`` over all those elements, every inner
    epoch (``flowdppo.losses.scaled_divergence_quantiles``); ``first_moved_log_ratio_mean`` / ``_std``:
    moments of ``log rho`` over the first such mini-batch (``flowdppo.losses.log_ratio_moments``). Values
    of every process are gathered first, so they describe the global mini-batches. Empty where no
    optimizer step came before a mini-batch (one window per update) or the algorithm gives no such values.
    """
    out: dict[str, float] = {}
    if moved.get(ELEMENT_DIM_KL):
        values = scaled_divergence_quantiles(dist.gather(torch.cat(moved[ELEMENT_DIM_KL])))
        out.update({key: float(value) for key, value in values.items()})
    if moved.get(ELEMENT_LOG_RATIO):
        values = log_ratio_moments(dist.gather(moved[ELEMENT_LOG_RATIO][0]))
        out.update({key: float(value) for key, value in values.items()})
    return out


def shuffled_elements(rng: torch.Generator, steps: int, batch: int, dist: Distributed) -> Tensor:
    """A random order of this process's ``steps * batch`` elements (``e = t * batch + b``).

    It is a permutation of the global batch's elements, drawn alike on every process, kept to this
    process's rows: the generator advances the same whatever the number of processes.
    """
    global_batch = batch * dist.world_size
    order = torch.randperm(steps * global_batch, generator=rng, device=rng.device)
    step, sample = order // global_batch, order % global_batch - dist.rank * batch
    mine = (sample >= 0) & (sample < batch)
    return step[mine] * batch + sample[mine]


def index_cond(cond: Any, index: Tensor) -> Any:
    """Select samples of a condition: a tensor, a prompt batch, or a dict of tensors (prompt embeddings)."""
    if isinstance(cond, dict):
        return {k: v[index] for k, v in cond.items()}
    return cond[index]


def average_metrics(history: list[dict[str, Tensor]]) -> dict[str, float]:
    """Mean over mini-batches; ``*_max`` / ``*_min`` keys take the max / min."""
    keys = {k for m in history for k in m}
    out = {}
    for key in sorted(keys):
        values = torch.stack([m[key].float() for m in history if key in m])
        reduce = torch.max if key.endswith("_max") else torch.min if key.endswith("_min") else torch.mean
        out[key] = float(reduce(values))
    return out


class NonFiniteGuard:
    """Catches a NaN / inf reward, advantage, loss or gradient norm before it is trained on.

    ``mode="stop"`` raises ``NonFiniteError`` naming the quantity and where; ``mode="skip"`` drops the
    rollout or optimizer step, counts it (``skipped``) and stops after ``max_in_a_row`` in a row. All
    processes agree on the verdict, so none is left waiting in a collective.
    """

    def __init__(self, mode: str, max_in_a_row: int, dist: Distributed | None = None, device=None) -> None:
        self.mode, self.max_in_a_row = mode, max_in_a_row
        self.dist, self.device = dist or Distributed(), device
        self.skipped = self.in_a_row = 0

    def ok(self, where: str, **quantities: Tensor) -> bool:
        bad = [name for name, value in quantities.items() if not bool(torch.isfinite(value).all())]
        if not self.dist.any(bool(bad), self.device):
            return True
        message = f"non-finite {bad[0] if bad else 'value on another process'} at {where}; it was not trained on"
        if self.mode == "stop":
            raise NonFiniteError(f"{message} (on_nonfinite=skip skips such steps instead)")
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(f"{message}; {self.in_a_row} skipped in a row (max_nonfinite_in_a_row)")
        tqdm.write(f"flowdppo: skipped: {message}")
        return False

    def stepped(self) -> None:
        """An optimizer step went through: the run of skips is broken."""
        self.in_a_row = 0

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))
