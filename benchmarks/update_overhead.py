"""Cost per trained element of the policy update vs a raw forward + backward of the model.

The update is ``PolicyGradient.update`` (``flowdppo.algorithms``) on one digits rollout (LoRA r 8, one
inner epoch, Flow-DPPO): replay with gradients, transition mean, log-prob, loss, backward, clip, AdamW.
The baseline runs the same LoRA model on the same inputs (x_t, sigma, class) with an MSE loss, backward and AdamW.

    python benchmarks/update_overhead.py [--repeats 20] [--group 16]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import RESULTS_DIR, interleaved_times, ratio_summary, write_result

from flowdppo.algorithms.policy_gradient import PolicyGradient
from flowdppo.config import load_config
from flowdppo.distributed import Distributed
from flowdppo.policies.lora import make_trainable, trainable_parameters
from flowdppo.rollout import rollout
from flowdppo.samplers import trained_steps
from flowdppo.tasks.digits.task import DigitsTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--method", default="flow_dppo")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    cfg = load_config(args.method, overrides=[f"group_size={args.group}"])
    task = DigitsTask(cfg)
    policy = task.policy
    make_trainable(policy, cfg.optim.lora_rank, cfg.optim.lora_alpha, policy.lora_target_modules)
    optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=1e-6)  # tiny lr: the anchor stays valid
    cond, group_ids = task.prompts(cfg.prompts_per_epoch, cfg.group_size, 0, 0)
    noise = torch.randn(len(cond), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = rollout(
        policy.velocity,
        cond,
        noise,
        task.sigmas(),
        cfg.sampler,
        trained_steps(cfg.sampler, 0, 0),
        generator=torch.Generator(),
    )
    advantages = torch.randn(len(cond))
    algorithm = PolicyGradient(cfg)
    elements = algorithm.elements(traj, advantages, policy, torch.Generator(), Distributed()).data
    n = traj.num_elements
    cfg.optim.minibatch_size = n  # one optimizer step per repeat in both
    cfg.consistency_tolerance = float("inf")  # repeats reuse one rollout while the weights move
    rng = torch.Generator().manual_seed(0)

    def policy_update() -> None:
        algorithm.update(policy, optimizer, traj, advantages, rng, None, epoch=0)

    def raw_step() -> None:
        v = policy.velocity(elements["latents"], elements["sigma"], traj.cond[elements["sample"]])
        loss = ((v - elements["next_latents"]) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_parameters(policy), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = interleaved_times({"update": policy_update, "raw": raw_step}, args.repeats)
    r = ratio_summary(times["update"], times["raw"])
    us = {k: 1e6 * statistics.median(v) / n for k, v in times.items()}
    print(
        f"update / raw forward+backward: median {r['median']:.3f}x (min {r['min']:.3f}, max {r['max']:.3f}); "
        "target <= 1.15"
    )
    print(f"per trained element: update {us['update']:.0f} us, raw {us['raw']:.0f} us ({n} elements)")
    result = {
        "ratio_update_over_raw": r,
        "median_us_per_element": us,
        "elements": n,
        "method": args.method,
        "repeats": args.repeats,
    }
    print(f"wrote {write_result('update_overhead', result, args.out)}")


if __name__ == "__main__":
    main()
