"""Cost of a recording SDE rollout vs plain Euler sampling of the same model and batch.

The rollout samples the digits policy through 10 steps, stochastic on a window of trained steps, and
records x_t, x_next, the transition mean and std and the log-density there; the baseline is the plain
Euler loop (``flowdppo.rollout.sample``). Same noise, same batch, interleaved repeats.

    python benchmarks/rollout_overhead.py [--repeats 20] [--batch 160] [--window 2]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import RESULTS_DIR, interleaved_times, ratio_summary, write_result

from flowdppo.rollout import rollout, sample
from flowdppo.samplers import SamplerConfig, trained_steps
from flowdppo.sde import shifted_sigmas
from flowdppo.tasks.digits.policy import load_base_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=160)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    policy = load_base_policy().eval()
    cfg = SamplerConfig(window_size=args.window)
    steps = trained_steps(cfg, seed=0, epoch=0)
    cond = torch.arange(args.batch) % 10
    noise = torch.randn(args.batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator()
    sigmas = shifted_sigmas(cfg.num_steps, cfg.shift)

    def recording_rollout() -> None:
        rollout(policy.velocity, cond, noise, sigmas, cfg, steps, generator=gen.manual_seed(1))

    def plain_euler() -> None:
        with torch.no_grad():
            sample(policy.velocity, cond, noise, sigmas)

    times = interleaved_times({"rollout": recording_rollout, "euler": plain_euler}, args.repeats)
    r = ratio_summary(times["rollout"], times["euler"])
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"rollout / plain Euler: median {r['median']:.3f}x (min {r['min']:.3f}, max {r['max']:.3f}); target <= 1.10")
    print(f"median: rollout {ms['rollout']:.1f} ms, Euler {ms['euler']:.1f} ms ({args.batch} samples, 10 steps)")
    result = {
        "ratio_rollout_over_euler": r,
        "median_ms": ms,
        "batch": args.batch,
        "trained_steps": steps,
        "repeats": args.repeats,
    }
    print(f"wrote {write_result('rollout_overhead', result, args.out)}")


if __name__ == "__main__":
    main()
