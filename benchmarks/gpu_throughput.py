"""Throughput of a Flow-DPPO epoch on a real-size SD3.5-Medium transformer (random weights, config only).

Measured side by side in one process, bf16 base + float32 LoRA r32 (attention projections):

- rollout: ``flowdppo.rollout`` (SDE window recorded) vs the plain diffusers denoising loop of the same
  transformer (``StableDiffusion3Pipeline(..., output_type="latent")``), images/s;   target >= 0.9x
- update: ``PolicyGradient.update`` per trained element vs a raw forward + backward + AdamW step of
  the same LoRA model on the same inputs;                                             target <= 1.15x
- peak memory of one LoRA training step (mini-batch ``--minibatch`` elements), without and with
  gradient checkpointing, and of the rollout;
- the bf16 consistency check: ``max |log rho|`` of a replay of the rollout before any update (must be ~0);
- a whole epoch: rollout of ``--group`` images + VAE decode + update over ``--trained-steps`` steps
  of each image, images/s (reward-model time excluded: the reward is random);         target >= 3.5/s

Prompt embeddings are random tensors of SD3's shapes (the text encoders are not part of the loop).

    python benchmarks/gpu_throughput.py                       # CUDA, SD3.5-Medium size, 512^2
    python benchmarks/gpu_throughput.py --size tiny --device cpu --resolution 64 --repeats 2   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import RESULTS_DIR, interleaved_times, ratio_summary, write_result
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from flowdppo.algorithms.base import index_cond
from flowdppo.algorithms.policy_gradient import PolicyGradient, replay_step
from flowdppo.config import load_config
from flowdppo.distributed import Distributed
from flowdppo.policies.lora import make_trainable, trainable_parameters
from flowdppo.policies.pipelines import SD3Policy
from flowdppo.prompts import PromptBatch
from flowdppo.rollout import rollout
from flowdppo.samplers import trained_steps

SD35_MEDIUM = {  # stabilityai/stable-diffusion-3.5-medium transformer/config.json (2.24 B parameters)
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
TINY = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 24,
    "out_channels": 16,
    "pos_embed_max_size": 32,
}
SD3_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens


def build_policy(size: str, resolution: int, device: str, dtype: torch.dtype) -> SD3Policy:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**(SD35_MEDIUM if size == "sd35m" else TINY))
    small_vae = {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}
    vae_config = SD3_VAE if size == "sd35m" else {**SD3_VAE, **small_vae}
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=AutoencoderKL(**vae_config),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device, dtype)
    return SD3Policy(pipeline, resolution)


def random_prompts(policy: SD3Policy, batch: int, device: str) -> PromptBatch:
    config = policy.transformer.config
    table = {
        "prompt_embeds": torch.randn(1, TEXT_TOKENS, config.joint_attention_dim, device=device, dtype=policy.dtype),
        "pooled_prompt_embeds": torch.randn(1, config.pooled_projection_dim, device=device, dtype=policy.dtype),
    }
    return PromptBatch(["p"] * batch, [{}] * batch, torch.zeros(batch, dtype=torch.long, device=device), table)


def synchronized(fn, device: str):
    def run() -> None:
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("sd35m", "tiny"), default="sd35m")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--group", type=int, default=16, help="images per rollout (one group)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--trained-steps", type=int, default=3)
    parser.add_argument("--minibatch", type=int, default=8, help="trained elements per backward pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    device, dtype = args.device, torch.bfloat16

    policy = build_policy(args.size, args.resolution, device, dtype)
    make_trainable(policy, 32, 64.0, policy.lora_target_modules)
    params = trainable_parameters(policy)
    optimizer = torch.optim.AdamW(params, lr=1e-7)  # tiny lr: the rollout stays a valid anchor across repeats
    cfg = load_config(
        overrides=[
            f"sampler.num_steps={args.steps}",
            f"sampler.window_size={args.trained_steps}",
            "sampler.window_range=[0,2]",
            f"optim.minibatch_size={args.minibatch}",
            f"group_size={args.group}",
        ]
    )
    cfg.consistency_tolerance = float("inf")  # repeats reuse one rollout while the weights move
    cond, sigmas = random_prompts(policy, args.group, device), policy.sigmas(args.steps)
    embeds = cond.embeddings()
    noise = torch.randn((args.group, *policy.latent_shape), device=device)
    gen = torch.Generator(device).manual_seed(0)
    steps = trained_steps(cfg.sampler, 0, 0)
    print(
        f"{args.size}: {sum(p.numel() for p in policy.transformer.parameters()) / 1e9:.2f} B parameters, "
        f"{args.resolution}^2, {args.steps} steps, group {args.group}, {len(steps)} trained steps, on {device}"
    )

    def ours_rollout():
        return rollout(policy.velocity, cond, noise, sigmas, cfg.sampler, steps, generator=gen)

    def plain_loop():
        policy.pipeline(
            prompt_embeds=embeds["prompt_embeds"],
            pooled_prompt_embeds=embeds["pooled_prompt_embeds"],
            num_inference_steps=args.steps,
            guidance_scale=1.0,
            latents=noise.to(dtype),
            height=args.resolution,
            width=args.resolution,
            output_type="latent",
        )

    with torch.no_grad():
        times = interleaved_times(
            {"flowdppo": synchronized(ours_rollout, device), "diffusers": synchronized(plain_loop, device)},
            args.repeats,
        )
    rollout_ratio = ratio_summary(times["diffusers"], times["flowdppo"])  # images/s ratio = inverse time ratio
    rollout_ips = {k: args.group / statistics.median(v) for k, v in times.items()}

    rollout_peak_gib = peak_gib_of(ours_rollout, device, no_grad=True)
    traj = ours_rollout()
    advantages = torch.randn(args.group, device=device)
    algorithm = PolicyGradient(cfg)
    elements = algorithm.elements(traj, advantages, policy, torch.Generator(device), Distributed()).data
    mb = {k: v[: args.minibatch] for k, v in elements.items()}
    with torch.no_grad():  # same weights as the rollout: rho must be 1 up to bf16 noise
        _, logp = replay_step(policy.velocity, mb, index_cond(cond, mb["sample"]), cfg, sigmas[1])
    max_log_rho = float((logp - mb["log_probs"]).abs().max())
    rng = torch.Generator(device).manual_seed(0)
    sub = traj_subset(traj, max(1, args.minibatch // len(steps)))  # about one mini-batch of elements

    def policy_update():
        algorithm.update(policy, optimizer, sub, advantages[: sub.log_probs.shape[1]], rng, None, epoch=0)

    def raw_step():
        v = policy.velocity(mb["latents"], mb["sigma"], cond[mb["sample"]])
        ((v - mb["next_latents"]) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    peak_gib = {"plain": peak_gib_of(raw_step, device)}
    policy.transformer.enable_gradient_checkpointing()
    peak_gib["gradient_checkpointing"] = peak_gib_of(raw_step, device)
    policy.transformer.disable_gradient_checkpointing()
    times_u = interleaved_times(
        {"update": synchronized(policy_update, device), "raw": synchronized(raw_step, device)}, args.repeats
    )
    update_ratio = ratio_summary(
        [t / sub.num_elements for t in times_u["update"]], [t / args.minibatch for t in times_u["raw"]]
    )  # per element
    per_element_ms = {
        "update": 1e3 * statistics.median(times_u["update"]) / sub.num_elements,
        "raw": 1e3 * statistics.median(times_u["raw"]) / args.minibatch,
    }

    def epoch():
        t = ours_rollout()
        with torch.no_grad():
            policy.decode(t.final)
        algorithm.update(policy, optimizer, t, torch.randn(args.group, device=device), rng, None, epoch=0)

    epoch_times = [timed(synchronized(epoch, device)) for _ in range(max(2, args.repeats // 2) + 1)][1:]
    epoch_ips = args.group / statistics.median(epoch_times)

    r = rollout_ratio
    print(
        f"rollout images/s: flowdppo {rollout_ips['flowdppo']:.2f}, diffusers loop {rollout_ips['diffusers']:.2f}; "
        f"ratio median {r['median']:.3f}x (min {r['min']:.3f}, max {r['max']:.3f}); target >= 0.9"
    )
    print(
        f"update per element: {per_element_ms['update']:.1f} ms vs raw fwd+bwd {per_element_ms['raw']:.1f} ms; "
        f"ratio median {update_ratio['median']:.3f}x (min {update_ratio['min']:.3f}, max {update_ratio['max']:.3f}); "
        "target <= 1.15"
    )
    print(
        f"peak memory of a LoRA training step ({args.minibatch} elements): {peak_gib['plain']:.1f} GiB, with "
        f"gradient checkpointing {peak_gib['gradient_checkpointing']:.1f} GiB; rollout {rollout_peak_gib:.1f} GiB"
    )
    print(f"replay before any update: max |log rho| = {max_log_rho:.2e} ({policy.dtype} base, float32 LoRA)")
    print(
        f"epoch: {epoch_ips:.2f} images/s (rollout + decode + update of {len(steps)} steps x {args.group} images, "
        "no reward model); target >= 3.5"
    )
    result = {
        "size": args.size,
        "resolution": args.resolution,
        "group": args.group,
        "steps": args.steps,
        "trained_steps": len(steps),
        "minibatch": args.minibatch,
        "repeats": args.repeats,
        "rollout_images_per_s": rollout_ips,
        "rollout_ratio_flowdppo_over_diffusers": rollout_ratio,
        "update_ms_per_element": per_element_ms,
        "update_ratio_over_raw": update_ratio,
        "peak_train_step_gib": peak_gib,
        "peak_rollout_gib": rollout_peak_gib,
        "max_abs_log_rho": max_log_rho,
        "epoch_images_per_s": epoch_ips,
    }
    print(f"wrote {write_result(f'gpu_throughput_{args.size}', result, args.out)}")


def traj_subset(traj, samples: int):
    """The first ``samples`` samples of a trajectory (so one update is one mini-batch of their elements)."""
    per_step = ("latents", "next_latents", "means", "stds", "log_probs")
    keep = {name: getattr(traj, name)[:, :samples] for name in per_step}
    return replace(traj, cond=traj.cond[:samples], final=traj.final[:samples], **keep)


def peak_gib_of(fn, device: str, no_grad: bool = False) -> float:
    """Peak CUDA memory allocated while ``fn`` runs once, in GiB (nan off CUDA)."""
    if not device.startswith("cuda"):
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.set_grad_enabled(not no_grad):
        fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
