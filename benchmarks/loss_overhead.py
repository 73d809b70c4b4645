"""Cost of Flow-DPPO's exact divergence vs Flow-GRPO's ratio clip in one training step.

One step = transformer forward on a batch of trained elements, Flow-SDE transition mean, log-prob,
loss, backward. Both losses run on the same model, batch and anchor, interleaved, and the script
prints the per-repeat time ratio flow_dppo / flow_grpo (min / median / max) and writes it as JSON.

    python benchmarks/loss_overhead.py [--repeats 30] [--batch 64] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from pathlib import Path

import torch
from common import RESULTS_DIR, interleaved_times, ratio_summary, write_result
from diffusers import SD3Transformer2DModel

from flowdppo.losses import StepBatch, get_loss
from flowdppo.sde import flow_sde_step, log_prob, shifted_sigmas


def tiny_transformer(width: int) -> SD3Transformer2DModel:
    heads, head_dim = 4, width // 4
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        caption_projection_dim=width,
        pooled_projection_dim=32,
        pos_embed_max_size=4,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = tiny_transformer(args.width)
    b = args.batch
    sigmas = shifted_sigmas(10, shift=3.0)
    sigma, sigma_next = sigmas[2].expand(b), sigmas[3].expand(b)
    x = torch.randn(b, 4, 8, 8)
    text, pooled = torch.randn(b, 1, 32), torch.randn(b, 32)

    def transition():
        v = model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=sigma * 1000).sample
        return flow_sde_step(x, v, sigma, sigma_next, eta=0.7, sigma_stand_in=sigmas[1])

    with torch.no_grad():
        old = transition()
    x_next = old.mean + old.std * torch.randn_like(x)
    logp_old = log_prob(x_next, old.mean, old.std)
    advantages = torch.randn(b)

    def train_step(loss_mode: str) -> None:
        new = transition()
        batch = StepBatch(
            logp_new=log_prob(x_next, new.mean, new.std),
            logp_old=logp_old,
            advantages=advantages,
            mean_new=new.mean,
            mean_old=old.mean,
            std=new.std.flatten(),
            dt=sigma_next - sigma,
            step_index=torch.full((b,), 2),
        )
        loss, _ = get_loss(loss_mode).fn(batch)
        loss.mean().backward()
        model.zero_grad(set_to_none=True)

    times = interleaved_times({m: partial(train_step, m) for m in ("flow_grpo", "flow_dppo")}, args.repeats)
    r = ratio_summary(times["flow_dppo"], times["flow_grpo"])
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"step time flow_dppo / flow_grpo: median {r['median']:.3f}x (min {r['min']:.3f}, max {r['max']:.3f})")
    print(f"median step: flow_grpo {ms['flow_grpo']:.1f} ms, flow_dppo {ms['flow_dppo']:.1f} ms")
    result = {
        "ratio_dppo_over_grpo": r,
        "median_step_ms": ms,
        "batch": b,
        "repeats": args.repeats,
        "params": sum(p.numel() for p in model.parameters()),
    }
    print(f"wrote {write_result('loss_overhead', result, args.out)}")


if __name__ == "__main__":
    main()
