"""The training loop: rollout -> reward -> advantage -> freeze anchor -> inner epochs -> step.

``train(cfg, out_dir)`` is the whole algorithm and reads top to bottom; the helpers below it do the
detail (replaying a step with gradients, the consistency check, mini-batching, metric averaging).
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
from flowdppo.checkpoint import load_checkpoint, save_checkpoint
from flowdppo.config import LossConfig, TrainConfig
from flowdppo.losses import StepBatch, get_loss, reference_kl_penalty
from flowdppo.policies.lora import (
    adapters_disabled,
    make_trainable,
    reference_policy,
    trainable_parameters,
)
from flowdppo.rollout import Trajectory, rollout, rollout_schedule, stochastic_steps, trained_steps
from flowdppo.runs import RunFolder
from flowdppo.sde import log_prob, sampler_step
from flowdppo.tasks import get_task


class ConsistencyError(RuntimeError):
    """The replayed policy does not reproduce the rollout policy before any update."""


def train(
    cfg: TrainConfig, out_dir: str | Path, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> RunFolder:
    """Run ``cfg`` and write the run folder ``out_dir``; ``resume`` continues from its last checkpoint."""
    run = RunFolder(Path(out_dir), cfg, resume=resume, overwrite=overwrite)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    task = get_task(cfg.task, device)
    policy = task.load_policy()
    make_trainable(policy, cfg.optim.lora_rank, cfg.optim.lora_alpha, policy.lora_target_modules)
    base_velocity = make_base_velocity(policy, cfg.sampler.guidance_scale)
    optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    reward_fns = task.rewards(cfg.reward.names)
    rng = torch.Generator(device).manual_seed(cfg.seed)  # rollout noise and mini-batch order
    start_epoch = load_checkpoint(run.latest_checkpoint(), policy, optimizer, rng) if resume else 0
    run.start(start_epoch)
    velocity = partial(policy.velocity, guidance_scale=cfg.sampler.guidance_scale)
    if start_epoch == 0:
        run.save_json(
            "base_eval.json", task.evaluate(base_velocity, cfg.eval_samples_per_class, cfg.seed, cfg.sampler.num_steps)
        )

    bar = tqdm(range(start_epoch, cfg.epochs), desc=f"{cfg.method}", disable=not progress, initial=start_epoch,
               total=cfg.epochs)  # fmt: skip
    for epoch in bar:
        t0 = time.perf_counter()
        # 1. rollout: P prompts x G samples, stochastic and recorded on this epoch's trained steps
        cond, group_ids = task.prompts(cfg.prompts_per_epoch, cfg.group_size, cfg.seed, epoch)
        steps = trained_steps(cfg.sampler, cfg.seed, epoch)
        noise = torch.randn((len(group_ids), *task.latent_shape), generator=rng, device=device)
        kl_steps = stochastic_steps(cfg.sampler) if cfg.sampler.kl_to_base_steps == "all" else steps
        traj = rollout(velocity, cond, noise, cfg.sampler, steps, rng, base_velocity, kl_steps)
        # 2. rewards and group-relative advantages
        images = policy.decode(traj.final)
        rewards = torch.stack([fn(images, cond) for fn in reward_fns], dim=1)  # (B, num_rewards)
        check_finite(rewards=rewards, epoch=epoch)
        weights = torch.tensor(cfg.reward.weights, device=device)
        advantages = aggregate_rewards(rewards, group_ids, weights, cfg.reward.aggregation, cfg.reward.std_scope)
        # 3. the anchor (logp_old, mu_old): recorded during the rollout, or replayed without gradients
        if cfg.optim.anchor == "replay":
            traj = replay_anchor(policy, traj, cfg)
        # 4. inner epochs over shuffled mini-batches of (sample, trained step) elements
        update_metrics = update(policy, optimizer, traj, advantages, cfg, rng, base_velocity, epoch)
        # 5. log, checkpoint
        row = {
            "epoch": epoch,
            "reward_mean": float((rewards @ weights / weights.sum()).mean()),
            **{f"reward/{name}": float(rewards[:, k].mean()) for k, name in enumerate(cfg.reward.names)},
            "kl_to_base": float(traj.kl_to_base.mean()),
            "trained_steps": steps,
            **update_metrics,
            "time_s": time.perf_counter() - t0,
        }
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            row.update(task.evaluate(velocity, cfg.eval_samples_per_class, cfg.seed, cfg.sampler.num_steps))
        run.log(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl_to_base']:.2e}")
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
            save_checkpoint(run.checkpoint_dir(epoch + 1), policy, optimizer, rng, epoch + 1, cfg.keep_checkpoints)
    grids = {name: task.sample_grid(v, cfg.seed) for name, v in (("base", base_velocity), ("trained", velocity))}
    run.finish(policy, grids)
    return run


def make_base_velocity(policy: nn.Module, guidance_scale: float):
    """Velocity of the frozen base: the same network with LoRA off, or a frozen copy (full fine-tuning)."""
    reference = reference_policy(policy)
    if reference is not None:
        return partial(reference.velocity, guidance_scale=guidance_scale)

    def base_velocity(x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        with adapters_disabled(policy):
            return policy.velocity(x, sigma, cond, guidance_scale=guidance_scale)

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
    velocity = partial(policy.velocity, guidance_scale=cfg.sampler.guidance_scale)
    sigma_max = rollout_schedule(cfg.sampler, traj.final.device)[1]
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
) -> dict[str, float]:
    """``inner_epochs`` passes over the rollout's elements in shuffled mini-batches; returns mean metrics."""
    loss_fn = partial(get_loss(cfg.loss.loss_mode), **loss_kwargs(cfg.loss))
    velocity = partial(policy.velocity, guidance_scale=cfg.sampler.guidance_scale)
    sigma_max = rollout_schedule(cfg.sampler, advantages.device)[1]
    elements = flatten_elements(traj, advantages)
    n, size, accum = traj.num_elements, cfg.optim.minibatch_size, cfg.optim.grad_accum
    history: list[dict[str, Tensor]] = []
    params = trainable_parameters(policy)  # the policy stays in eval mode: no dropout between rollout and replay
    for inner in range(cfg.optim.inner_epochs):
        order = torch.randperm(n, generator=rng, device=rng.device)
        chunks = list(order.split(size))
        for k, index in enumerate(chunks):
            mb = {key: value[index] for key, value in elements.items()}
            cond = index_cond(traj.cond, mb["sample"])
            mean_new, logp_new = replay_step(velocity, mb, cond, cfg, sigma_max)
            batch = StepBatch(
                logp_new=logp_new, logp_old=mb["log_probs"], advantages=mb["advantages"], mean_new=mean_new,
                mean_old=mb["means"], std=mb["stds"], dt=mb["sigma_next"] - mb["sigma"], step_index=mb["step_index"],
            )  # fmt: skip
            if inner == 0 and k == 0:
                check_consistency(batch, cfg.consistency_tolerance, epoch)
            per_element, metrics = loss_fn(batch)
            loss = per_element.mean()
            if cfg.loss.beta > 0:
                with torch.no_grad():
                    mean_ref, _ = replay_step(base_velocity, mb, cond, cfg, sigma_max)
                ref_kl = reference_kl_penalty(mean_new, mean_ref, mb["stds"], 1.0, cfg.loss.kl_reduce).mean()
                loss = loss + cfg.loss.beta * ref_kl
                metrics["ref_kl"] = ref_kl.detach()
            check_finite(loss=loss.detach(), epoch=epoch, step=k)
            (loss / accum).backward()
            metrics["loss"] = loss.detach()
            if (k + 1) % accum == 0 or k + 1 == len(chunks):
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm or math.inf)
                check_finite(grad_norm=grad_norm, epoch=epoch, step=k)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                metrics["grad_norm"] = grad_norm.detach()
            history.append(metrics)
    return average_metrics(history)


def check_consistency(batch: StepBatch, tolerance: float, epoch: int) -> None:
    """Before any update the replay must reproduce the rollout: ``rho == 1`` and ``D == 0``."""
    with torch.no_grad():
        max_log_ratio = (batch.logp_new - batch.logp_old).abs().max().item()
        max_divergence = batch.divergence().max().item()
    if max_log_ratio > tolerance or max_divergence > tolerance:
        raise ConsistencyError(
            f"epoch {epoch}: the replayed policy differs from the rollout policy before any update "
            f"(max |log rho| {max_log_ratio:.3g}, max D {max_divergence:.3g}, tolerance {tolerance:g}). "
            "The rollout and the replay must run the same weights and numerics; if your rollout engine "
            "differs on purpose, set optim.anchor=replay."
        )


def check_finite(epoch: int, step: int | None = None, **quantities: Tensor) -> None:
    """Stop with a clear message if a reward, loss or gradient norm is NaN or infinite."""
    for name, value in quantities.items():
        if not bool(torch.isfinite(value).all()):
            where = f"epoch {epoch}" + (f", mini-batch {step}" if step is not None else "")
            raise FloatingPointError(f"non-finite {name} at {where}; nothing was trained on it")


def average_metrics(history: list[dict[str, Tensor]]) -> dict[str, float]:
    """Mean over mini-batches; ``*_max`` / ``*_min`` keys take the max / min."""
    keys = {k for m in history for k in m}
    out = {}
    for key in sorted(keys):
        values = torch.stack([m[key].float() for m in history if key in m])
        reduce = torch.max if key.endswith("_max") else torch.min if key.endswith("_min") else torch.mean
        out[key] = float(reduce(values))
    return out
