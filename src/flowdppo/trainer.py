"""The training loop: rollout -> reward -> advantage -> algorithm update -> log / evaluate / checkpoint.

``train(cfg, out_dir)`` reads top to bottom. The task (``flowdppo.tasks``) brings the policy, prompts,
rewards and evaluation; the sampler (``flowdppo.samplers``) the rollout's kernel and trained steps; the
algorithm (``flowdppo.algorithms``) turns a rollout and its advantages into training elements and a
loss; one that takes its data from a file or a folder (``Algorithm.epoch_data``) skips the rollout and the reward.
Under ``torchrun`` / ``accelerate launch`` it runs data-parallel (see ``distributed``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flowdppo import mechanism
from flowdppo.advantages import aggregate_rewards
from flowdppo.algorithms import get_algorithm
from flowdppo.algorithms.base import NonFiniteGuard
from flowdppo.config import TrainConfig
from flowdppo.distributed import Distributed, init_distributed
from flowdppo.errors import ConfigError, ConsistencyError, NonFiniteError, RewardError
from flowdppo.policies.limits import memory_error
from flowdppo.policies.lora import adapters_disabled, experts, make_trainable, reference_policy, trainable_parameters
from flowdppo.rewards import RewardConfig, score_chunks
from flowdppo.rollout import guided_velocity, in_chunks, initial_noise, rollout
from flowdppo.runs import RunFolder, evaluates
from flowdppo.samplers import measure_sampler, trained_steps
from flowdppo.stall import StallWatch
from flowdppo.tasks import load_task

__all__ = ["ConsistencyError", "NonFiniteError", "train"]


def train(
    cfg: TrainConfig, out_dir: str | Path, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> RunFolder:
    """Run ``cfg`` and write the run folder ``out_dir``; ``resume`` continues from its last checkpoint."""
    dist = init_distributed()
    run = RunFolder(Path(out_dir), cfg, resume=resume, overwrite=overwrite, writer=dist.is_main)
    try:
        run_training(cfg, run, dist, resume, progress)
    except BaseException:
        run.close(failed=True)  # the lock is released; a run that failed in its first epoch leaves nothing
        raise
    run.close(failed=False)
    return run


def run_training(cfg: TrainConfig, run: RunFolder, dist: Distributed, resume: bool, progress: bool) -> None:
    """The body of ``train``: set up, then rollout -> reward -> advantage -> update, epoch after epoch."""
    global_batch = cfg.prompts_per_epoch * cfg.group_size
    dist.share(cfg.prompts_per_epoch, "prompts_per_epoch")  # whole groups on each process
    rows = dist.rows(global_batch, "prompts_per_epoch x group_size")
    device = dist.device(cfg.device)
    torch.manual_seed(cfg.seed)
    task = load_task(cfg, device)  # the base policy and the rewards, loaded
    policy = task.policy
    if hasattr(policy, "tokens"):  # a pipeline's: sizes checked against the memory free (before any sample)
        problem = memory_error(
            policy,
            cfg.sampler.guidance_scale,
            global_batch // dist.world_size,
            cfg.sampler.rollout_batch_size,
            cfg.optim.minibatch_size // dist.world_size,
            dist.world_size,
        )
        if problem:
            raise ConfigError(problem)
    make_trainable(
        policy,
        cfg.optim.lora_rank,
        cfg.optim.lora_alpha,
        cfg.optim.lora_target_modules,
        cfg.optim.lora_text_stream,
        cfg.optim.trained_experts,
    )
    if cfg.optim.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    if cfg.optim.compile:
        for expert in experts(policy).values():
            expert.compile()  # nn.Module.compile: the module and its state-dict keys stay as they are
    algorithm = get_algorithm(cfg)
    algorithm.setup(policy)
    sigmas = task.sigmas()  # the one noise schedule of rollouts, evaluations and grids
    chunk = cfg.sampler.rollout_batch_size  # samples per model call in rollouts and decoding (0: all)
    reference = dist.wrap_frozen(reference_policy(policy), cfg.optim.fsdp)  # frozen base copy; None with LoRA
    trained_policy = dist.wrap(policy, cfg.optim.fsdp)  # DDP, or FSDP2 sharding the policy in place
    base_velocity = in_chunks(make_base_velocity(policy, reference, cfg.sampler.guidance_scale), chunk)
    optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    dist.barrier()  # every process has checked the inputs before process 0 writes the run folder
    run.create()
    rng = torch.Generator(device).manual_seed(cfg.seed)  # rollout noise and mini-batch order, same on every process
    guard = NonFiniteGuard(cfg.on_nonfinite, cfg.max_nonfinite_in_a_row, dist, device)
    stall = StallWatch(cfg.stall_epochs)
    state = run.load_latest_checkpoint(policy, optimizer, rng, algorithm) if resume else {"epoch": 0}
    start_epoch = state["epoch"]
    guard.load_state_dict(state.get("nonfinite", {}))
    run.start(start_epoch)
    velocity = guided_velocity(policy, cfg.sampler)
    measured_steps = measure_sampler(cfg.sampler)[0].stochastic_steps(cfg.sampler.num_steps)  # path KL's steps
    # Every process evaluates and samples (a sharded policy's forwards are collective); process 0 writes.
    if start_epoch == 0:
        run.save_json("base_eval.json", task.evaluate(base_velocity, cfg.eval_samples_per_class))
        run.log_images({"base": task.sample_grid(base_velocity)}, 0)

    def end_epoch(epoch: int, row: dict) -> None:
        """4. evaluate, log, checkpoint (process 0 writes)."""
        if evaluates(epoch, cfg):
            row.update(task.evaluate(velocity, cfg.eval_samples_per_class, base_velocity))
            run.log_images({"trained": task.sample_grid(velocity)}, epoch)
        run.log(row)
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
            run.save_checkpoint(epoch + 1, policy, optimizer, rng, algorithm, {"nonfinite": guard.state_dict()})

    bar = tqdm(
        range(start_epoch, cfg.epochs),
        desc=f"{cfg.method}",
        disable=not (progress and dist.is_main),
        initial=start_epoch,
        total=cfg.epochs,
    )
    for epoch in bar:
        t0 = time.perf_counter()
        data = algorithm.epoch_data(epoch, rng, dist)  # (examples, weights) of a file or a folder: no rollout
        if data is not None:
            metrics = algorithm.update(
                trained_policy, optimizer, *data, rng, base_velocity, epoch=epoch, guard=guard, dist=dist
            )
            row = {"epoch": epoch, **metrics, "nonfinite_skipped": guard.skipped, "time_s": time.perf_counter() - t0}
            end_epoch(epoch, row)
            bar.set_postfix(loss=f"{metrics['loss']:.3g}")
            continue
        rng_at_start = rng.get_state()  # checkpointed if this epoch's reward fails
        # 1. rollout: P prompts x G samples (this process's rows), stochastic and recorded on the trained steps
        cond, group_ids = task.prompts(cfg.prompts_per_epoch, cfg.group_size, cfg.seed, epoch)
        steps = trained_steps(cfg.sampler, cfg.seed, epoch)
        noise = initial_noise(rng, cfg.sampler, cfg.prompts_per_epoch, cfg.group_size, rows, task.latent_shape, device)
        kl_steps = measured_steps if cfg.sampler.kl_to_base_steps == "all" else steps
        prompts = cond[rows]
        with algorithm.sampling_weights(policy):  # the current weights, or the algorithm's sampling policy
            traj = rollout(
                velocity,
                prompts,
                noise,
                sigmas,
                cfg.sampler,
                steps,
                generator=rng,
                base_velocity=base_velocity,
                kl_steps=kl_steps,
                global_batch=global_batch,
                rows=rows,
            )
        # 2. rewards of the whole batch (gathered) and group-relative advantages
        images = (policy.decode(part) for part in traj.final.split(chunk or len(traj.final)))  # decoded as scored
        try:
            rewards, advantages = rewards_and_advantages(task.rewards, images, prompts, group_ids, cfg.reward, dist)
        except RewardError as err:  # e.g. a reward server gone mid-run: keep this epoch's start, stop resumably
            if epoch > 0 and not dist.enabled and not run.checkpoint_dir(epoch).is_dir():
                rng.set_state(rng_at_start)  # the state before this epoch's rollout
                run.save_checkpoint(epoch, policy, optimizer, rng, algorithm, {"nonfinite": guard.state_dict()})
            hint = f"; continue with: flowdppo train --resume {run.path}" if epoch else ""
            raise RewardError(f"{err}{hint}") from err
        update_metrics = {}
        if guard.ok(f"epoch {epoch} (rollout)", reward=rewards, advantage=advantages):
            # 3. the algorithm's update: inner epochs over shuffled mini-batches of training elements
            update_metrics = algorithm.update(
                trained_policy,
                optimizer,
                traj,
                advantages[rows],
                rng,
                base_velocity,
                epoch=epoch,
                guard=guard,
                dist=dist,
            )
            counts = algorithm.mechanism_counts(dist)  # what the trust tests would drop (every process calls it)
            if counts is not None and run.is_writer:
                run.save_json(mechanism.FILE, mechanism.with_epoch(run.path / mechanism.FILE, epoch, counts))
        row = {
            "epoch": epoch,
            "reward_mean": float((rewards @ rewards.new_tensor(cfg.reward.weights)).mean() / sum(cfg.reward.weights)),
            **{f"reward/{name}": float(rewards[:, k].mean()) for k, (name, _) in enumerate(task.rewards)},
            "kl_to_base": float(dist.gather(traj.kl_to_base).mean()),
            "trained_steps": steps,
            **update_metrics,
            "nonfinite_skipped": guard.skipped,
            "time_s": time.perf_counter() - t0,
        }
        end_epoch(epoch, row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl_to_base']:.2e}")
        stall.check(epoch, rewards, group_ids, update_metrics)  # after the row and checkpoint: nothing is lost
    grids = {name: task.sample_grid(v) for name, v in (("base", base_velocity), ("trained", velocity))}
    if hasattr(task, "save_videos"):  # a video task's samples.mp4 / .gif (every process samples, process 0 writes)
        task.save_videos(run.path if run.is_writer else None, {"base": base_velocity, "trained": velocity})
    run.finish(dist.full_model(policy, lambda: task.load_policy(cfg.model)), grids, getattr(task, "grid_prompts", None))
    dist.barrier()


def rewards_and_advantages(
    reward_fns: list,
    images: Iterable[Tensor] | Tensor,
    prompts: Any,
    group_ids: Tensor,
    reward_cfg: RewardConfig,
    dist: Distributed,
) -> tuple[Tensor, Tensor]:
    """Score this process's ``images`` (a tensor or its chunks as they are decoded: a remote reward scores a chunk
    while the next decodes); gather the rewards of the whole batch ``(N, num_rewards)``; return them with the
    group-relative advantages of the whole batch ``(N,)`` (global group and batch statistics)."""
    local = score_chunks(reward_fns, images, prompts)
    rewards = dist.gather(local)
    weights = torch.tensor(reward_cfg.weights, device=rewards.device)
    return rewards, aggregate_rewards(rewards, group_ids, weights, reward_cfg.aggregation, reward_cfg.std_scope)


def make_base_velocity(policy: nn.Module, reference: nn.Module | None, guidance_scale: float):
    """Velocity of the frozen base: the ``reference`` copy (full fine-tuning), or with LoRA (``reference``
    None) the same network with its adapters off."""
    if reference is not None:
        return partial(reference, guidance_scale=guidance_scale)

    def base_velocity(x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        with adapters_disabled(policy):
            return policy(x, sigma, cond, guidance_scale=guidance_scale)

    return base_velocity
