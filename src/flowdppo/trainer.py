"""The training loop: rollout -> reward -> advantage -> freeze anchor -> inner epochs -> step.

``train(cfg, out_dir)`` is the whole algorithm and reads top to bottom; the helpers below it do the
detail (replaying a step with gradients, the consistency check, the non-finite guard, mini-batching,
metric averaging). Under ``torchrun`` / ``accelerate launch`` it runs data-parallel (see ``distributed``).
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flowdppo.advantages import aggregate_rewards
from flowdppo.checkpoint import load_checkpoint
from flowdppo.config import LossConfig, RewardConfig, TrainConfig
from flowdppo.distributed import Distributed, clip_grad_norm, init_distributed, shared_randn
from flowdppo.errors import ConsistencyError, NonFiniteError
from flowdppo.losses import StepBatch, get_loss, reference_kl_penalty
from flowdppo.policies.lora import (
    adapters_disabled,
    make_trainable,
    reference_policy,
    trainable_parameters,
)
from flowdppo.rewards import score
from flowdppo.rollout import Trajectory, in_chunks, rollout, stochastic_steps, trained_steps
from flowdppo.runs import RunFolder
from flowdppo.sde import log_prob, sampler_step
from flowdppo.tasks import get_task

__all__ = ["ConsistencyError", "NonFiniteError", "train", "update"]


def train(
    cfg: TrainConfig, out_dir: str | Path, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> RunFolder:
    """Run ``cfg`` and write the run folder ``out_dir``; ``resume`` continues from its last checkpoint."""
    dist = init_distributed()
    run = RunFolder(Path(out_dir), cfg, resume=resume, overwrite=overwrite, writer=dist.is_main)
    global_batch = cfg.prompts_per_epoch * cfg.group_size
    dist.share(cfg.prompts_per_epoch, "prompts_per_epoch")  # whole groups on each process
    rows = dist.rows(global_batch, "prompts_per_epoch x group_size")
    device = dist.device(cfg.device)
    torch.manual_seed(cfg.seed)
    task = get_task(cfg, device)
    policy = task.load_policy(cfg.model)
    make_trainable(policy, cfg.optim.lora_rank, cfg.optim.lora_alpha, cfg.optim.lora_target_modules)
    sigmas = task.sigmas(cfg.sampler)  # the model's noise schedule
    chunk = cfg.sampler.rollout_batch_size  # samples per model call in rollouts and decoding (0: all)
    reference = dist.wrap_frozen(reference_policy(policy), cfg.optim.fsdp)  # frozen base copy; None with LoRA
    trained_policy = dist.wrap(policy, cfg.optim.fsdp)  # DDP, or FSDP2 sharding the policy in place
    base_velocity = in_chunks(make_base_velocity(policy, reference, cfg.sampler.guidance_scale), chunk)
    optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    reward_fns = list(zip(cfg.reward.names, task.rewards(cfg.reward.names), strict=True))
    dist.barrier()  # every process has checked the inputs before process 0 writes the run folder
    run.create()
    rng = torch.Generator(device).manual_seed(cfg.seed)  # rollout noise and mini-batch order, same on every process
    start_epoch = load_checkpoint(run.latest_checkpoint(), policy, optimizer, rng) if resume else 0
    run.start(start_epoch)
    guard = NonFiniteGuard(cfg.on_nonfinite, cfg.max_nonfinite_in_a_row, dist, device)
    velocity = in_chunks(partial(policy, guidance_scale=cfg.sampler.guidance_scale), chunk)  # module call: FSDP hooks
    # Every process evaluates and samples (a sharded policy's forwards are collective); process 0 writes.
    if start_epoch == 0:
        run.save_json(
            "base_eval.json", task.evaluate(base_velocity, cfg.eval_samples_per_class, cfg.seed, cfg.sampler.num_steps)
        )

    bar = tqdm(range(start_epoch, cfg.epochs), desc=f"{cfg.method}", disable=not (progress and dist.is_main),
               initial=start_epoch, total=cfg.epochs)  # fmt: skip
    for epoch in bar:
        t0 = time.perf_counter()
        # 1. rollout: P prompts x G samples (this process's rows), stochastic and recorded on the trained steps
        cond, group_ids = task.prompts(cfg.prompts_per_epoch, cfg.group_size, cfg.seed, epoch)
        steps = trained_steps(cfg.sampler, cfg.seed, epoch)
        noise = shared_randn(rng, global_batch, rows, task.latent_shape, device)
        kl_steps = stochastic_steps(cfg.sampler) if cfg.sampler.kl_to_base_steps == "all" else steps
        prompts = cond[rows]
        traj = rollout(velocity, prompts, noise, cfg.sampler, steps, rng, base_velocity, kl_steps, global_batch, rows,
                       sigmas)  # fmt: skip
        # 2. rewards of the whole batch (gathered) and group-relative advantages
        images = torch.cat([policy.decode(part) for part in traj.final.split(chunk or len(traj.final))])
        rewards, advantages = rewards_and_advantages(reward_fns, images, prompts, group_ids, cfg.reward, dist)
        update_metrics = {}
        if guard.ok(f"epoch {epoch} (rollout)", reward=rewards, advantage=advantages):
            # 3. the anchor (logp_old, mu_old): recorded during the rollout, or replayed without gradients
            if cfg.optim.anchor == "replay":
                traj = replay_anchor(policy, traj, cfg)
            # 4. inner epochs over shuffled mini-batches of (sample, trained step) elements
            update_metrics = update(trained_policy, optimizer, traj, advantages[rows], cfg, rng, base_velocity, epoch,
                                    guard, dist)  # fmt: skip
        # 5. log, evaluate, checkpoint (process 0 writes)
        row = {
            "epoch": epoch,
            "reward_mean": float((rewards @ rewards.new_tensor(cfg.reward.weights)).mean() / sum(cfg.reward.weights)),
            **{f"reward/{name}": float(rewards[:, k].mean()) for k, name in enumerate(cfg.reward.names)},
            "kl_to_base": float(dist.gather(traj.kl_to_base).mean()),
            "trained_steps": steps,
            **update_metrics,
            "nonfinite_skipped": guard.skipped,
            "time_s": time.perf_counter() - t0,
        }
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            row.update(task.evaluate(velocity, cfg.eval_samples_per_class, cfg.seed, cfg.sampler.num_steps))
        run.log(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl_to_base']:.2e}")
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
            run.save_checkpoint(epoch + 1, policy, optimizer, rng)
    grids = {name: task.sample_grid(v, cfg.seed) for name, v in (("base", base_velocity), ("trained", velocity))}
    run.finish(dist.full_model(policy, lambda: task.load_policy(cfg.model)), grids)
    dist.barrier()
    return run


def rewards_and_advantages(
    reward_fns: list, images: Tensor, prompts: Any, group_ids: Tensor, reward_cfg: RewardConfig, dist: Distributed
) -> tuple[Tensor, Tensor]:
    """Score this process's ``images``; gather the rewards of the whole batch ``(N, num_rewards)``; return
    them with the group-relative advantages of the whole batch ``(N,)`` (global group and batch statistics)."""
    local = torch.stack([score(fn, name, images, prompts) for name, fn in reward_fns], dim=1)
    rewards = dist.gather(local)
    weights = torch.tensor(reward_cfg.weights, device=rewards.device)
    return rewards, aggregate_rewards(rewards, group_ids, weights, reward_cfg.aggregation, reward_cfg.std_scope)


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


def make_base_velocity(policy: nn.Module, reference: nn.Module | None, guidance_scale: float):
    """Velocity of the frozen base: the ``reference`` copy (full fine-tuning), or with LoRA (``reference``
    None) the same network with its adapters off."""
    if reference is not None:
        return partial(reference, guidance_scale=guidance_scale)

    def base_velocity(x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        with adapters_disabled(policy):
            return policy(x, sigma, cond, guidance_scale=guidance_scale)

    return base_velocity


def flatten_elements(traj: Trajectory, advantages: Tensor) -> dict[str, Any]:
    """(T, B, ...) records -> (T*B, ...) elements; element ``e`` is step ``e // B`` of sample ``e % B``."""
    t, b = traj.log_probs.shape
    sample = torch.arange(b, device=advantages.device).repeat(t)
    return {
        "latents": traj.latents.flatten(0, 1),
        "next_latents": traj.next_latents.flatten(0, 1),
        "means": traj.means.flatten(0, 1),
        "stds": traj.stds.flatten(),
        "log_probs": traj.log_probs.flatten(),
        "sigma": traj.sigma.repeat_interleave(b),
        "sigma_next": traj.sigma_next.repeat_interleave(b),
        "step_index": traj.step_index.repeat_interleave(b),
        "advantages": advantages[sample],
        "sample": sample,
    }


def index_cond(cond: Any, index: Tensor) -> Any:
    """Select samples of a condition: a tensor, or a dict of tensors (prompt embeddings)."""
    if isinstance(cond, dict):
        return {k: v[index] for k, v in cond.items()}
    return cond[index]


def replay_step(velocity, elements: dict[str, Any], cond: Any, cfg: TrainConfig, sigma_max: Tensor):
    """Recompute the transitions of some elements with the current weights: (mean, log-prob)."""
    x = elements["latents"]
    v = velocity(x, elements["sigma"], cond)
    s = cfg.sampler
    step = sampler_step(s.sde_type, x, v, elements["sigma"], elements["sigma_next"], s.eta, sigma_max)
    return step.mean, log_prob(elements["next_latents"], step.mean, step.std, convention=s.logprob_convention)


@torch.no_grad()
def replay_anchor(policy: nn.Module, traj: Trajectory, cfg: TrainConfig) -> Trajectory:
    """Recompute ``mu_old`` and ``logp_old`` with a no-grad replay of every trained element."""
    velocity = in_chunks(partial(policy, guidance_scale=cfg.sampler.guidance_scale), cfg.sampler.rollout_batch_size)
    sigma_max = traj.sigmas[1]
    t, b = traj.log_probs.shape
    elements = flatten_elements(traj, torch.zeros(b, device=traj.final.device))
    cond = index_cond(traj.cond, elements["sample"])
    means, log_probs = replay_step(velocity, elements, cond, cfg, sigma_max)
    traj.means, traj.log_probs = means.view_as(traj.means), log_probs.view(t, b)
    return traj


def loss_kwargs(loss_cfg: LossConfig) -> dict[str, Any]:
    """The hyper-parameters the configured loss takes."""
    common = {"kl_reduce": loss_cfg.kl_reduce, "add_kl_coefficient": loss_cfg.add_kl_coefficient}
    if loss_cfg.loss_mode == "flow_dppo":
        return {"kl_mask_threshold": loss_cfg.kl_mask_threshold, **common}
    return {"clip_range": loss_cfg.clip_range, "adv_clip_max": loss_cfg.adv_clip_max, **common}


def update(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    traj: Trajectory,
    advantages: Tensor,
    cfg: TrainConfig,
    rng: torch.Generator,
    base_velocity,
    epoch: int,
    guard: NonFiniteGuard | None = None,
    dist: Distributed | None = None,
) -> dict[str, float]:
    """``inner_epochs`` passes over the rollout's elements in shuffled mini-batches; returns mean metrics.

    ``policy`` may be wrapped in DDP or sharded by FSDP (its ``forward`` is the velocity): each process then
    takes ``minibatch_size / world_size`` of its own elements per mini-batch and the gradients are averaged.
    """
    dist = dist or Distributed()
    guard = guard or NonFiniteGuard("stop", 1)
    loss_fn = partial(get_loss(cfg.loss.loss_mode), **loss_kwargs(cfg.loss))
    velocity = partial(policy, guidance_scale=cfg.sampler.guidance_scale)
    sigma_max = traj.sigmas[1]
    elements = flatten_elements(traj, advantages)
    accum = cfg.optim.grad_accum
    size = dist.share(cfg.optim.minibatch_size, "optim.minibatch_size")
    history: list[dict[str, Tensor]] = []
    params = trainable_parameters(policy)  # the policy stays in eval mode: no dropout between rollout and replay
    for inner in range(cfg.optim.inner_epochs):
        order = shuffled_elements(rng, *traj.log_probs.shape, dist)
        chunks = list(order.split(size))
        window_ok = True  # no non-finite loss in this optimizer step's mini-batches
        for k, index in enumerate(chunks):
            last_of_window = (k + 1) % accum == 0 or k + 1 == len(chunks)
            mb = {key: value[index] for key, value in elements.items()}
            cond = index_cond(traj.cond, mb["sample"])
            with dist.gradient_sync(policy, last_of_window):
                mean_new, logp_new = replay_step(velocity, mb, cond, cfg, sigma_max)
                batch = StepBatch(
                    logp_new=logp_new, logp_old=mb["log_probs"], advantages=mb["advantages"], mean_new=mean_new,
                    mean_old=mb["means"], std=mb["stds"], dt=mb["sigma_next"] - mb["sigma"],
                    step_index=mb["step_index"],
                )  # fmt: skip
                if inner == 0 and k == 0:
                    check_consistency(batch, cfg.consistency_tolerance, epoch, dist)
                per_element, metrics = loss_fn(batch)
                loss = per_element.mean()
                if cfg.loss.beta > 0:
                    with torch.no_grad():
                        mean_ref, _ = replay_step(base_velocity, mb, cond, cfg, sigma_max)
                    ref_kl = reference_kl_penalty(mean_new, mean_ref, mb["stds"], 1.0, cfg.loss.kl_reduce).mean()
                    loss = loss + cfg.loss.beta * ref_kl
                    metrics["ref_kl"] = ref_kl.detach()
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
                optimizer.zero_grad(set_to_none=True)
                metrics["grad_norm"] = grad_norm.detach()
                window_ok = True
            history.append(metrics)
    return dist.reduce_metrics(average_metrics(history), advantages.device)


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


def check_consistency(batch: StepBatch, tolerance: float, epoch: int, dist: Distributed | None = None) -> None:
    """Before any update the replay must reproduce the rollout: ``rho == 1`` and ``D == 0``."""
    with torch.no_grad():
        max_log_ratio = (batch.logp_new - batch.logp_old).abs().max().item()
        max_divergence = batch.divergence().max().item()
    failed = max_log_ratio > tolerance or max_divergence > tolerance
    if (dist or Distributed()).any(failed, batch.logp_new.device):  # every process stops, none waits
        raise ConsistencyError(
            f"epoch {epoch}: the replayed policy differs from the rollout policy before any update "
            f"(max |log rho| {max_log_ratio:.3g}, max D {max_divergence:.3g}, tolerance {tolerance:g}). "
            "The rollout and the replay must run the same weights and numerics; if your rollout engine "
            "differs on purpose, set optim.anchor=replay."
        )


def average_metrics(history: list[dict[str, Tensor]]) -> dict[str, float]:
    """Mean over mini-batches; ``*_max`` / ``*_min`` keys take the max / min."""
    keys = {k for m in history for k in m}
    out = {}
    for key in sorted(keys):
        values = torch.stack([m[key].float() for m in history if key in m])
        reduce = torch.max if key.endswith("_max") else torch.min if key.endswith("_min") else torch.mean
        out[key] = float(reduce(values))
    return out
