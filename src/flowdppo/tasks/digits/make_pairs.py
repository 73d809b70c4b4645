"""``flowdppo digits make-pairs``: a preference file for offline Diffusion-DPO, from base samples scored by a reward.

    flowdppo digits make-pairs --out pairs.jsonl --n 200
    flowdppo train --method diffusion_dpo_offline dpo.pairs_file=pairs.jsonl

Each pair is a prompt (digits ``0..9`` in turn) with ``--candidates`` ODE samples of the shipped base (CFG 1, the
digits schedule, noise from ``--seed``); the best by the reward is ``chosen``, the worst ``rejected``. The images are
PNGs in ``STEM_images/`` beside the file (8x8 grayscale, or 8u x 8u with ``--upsample`` u: the latent
``pixel_shuffle``d, as it decodes), named by the file relative to it; each line also records the two rewards::

    {"prompt": "3", "chosen": "pairs_images/00003_chosen.png", "rejected": "pairs_images/00003_rejected.png",
     "chosen_reward": 0.97, "rejected_reward": 0.02}
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flowdppo.errors import ConfigError
from flowdppo.files import staged, write_text_atomic
from flowdppo.rewards.registry import RewardContext, load_rewards
from flowdppo.rollout import sample
from flowdppo.sde import shifted_sigmas
from flowdppo.tasks.digits.classifier import load_classifier
from flowdppo.tasks.digits.data import NUM_CLASSES, to_unit_range
from flowdppo.tasks.digits.policy import load_base_policy

CHUNK = 512  # samples per model call


def pair_image(latent: Tensor) -> np.ndarray:
    """A latent ``(u*u, 8, 8)`` -> the uint8 image ``(8u, 8u)`` it decodes from (``to_unit_range`` of the
    ``pixel_shuffle``)."""
    factor = int(latent.shape[0] ** 0.5)
    image = to_unit_range(F.pixel_shuffle(latent[None], factor) if factor > 1 else latent[None])[0, 0]
    return (image * 255).round().to(torch.uint8).cpu().numpy()


@torch.no_grad()
def make_pairs(
    out: str | Path,
    n: int = 200,
    candidates: int = 4,
    seed: int = 0,
    reward: str = "classifier_prob",
    num_steps: int = 10,
    upsample: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` preference pairs to the JSONL file ``out`` and their PNGs beside it; returns ``out``."""
    from PIL import Image

    out = Path(out)
    if n < 1 or candidates < 2:
        raise ConfigError(f"--n must be >= 1 and --candidates >= 2 (a best and a worst), got {n} and {candidates}")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out: {out} exists; give another file or --overwrite")
    if out.suffix != ".jsonl":
        raise ConfigError(f"--out: {out} must end in .jsonl (one JSON object a line)")
    policy = load_base_policy(upsample=upsample)
    ((_, score),) = load_rewards([reward], ("digits",), RewardContext("cpu", classifier=load_classifier()))
    cond = torch.arange(n).remainder(NUM_CLASSES).repeat_interleave(candidates)
    noise = torch.randn((len(cond), *policy.latent_shape), generator=torch.Generator().manual_seed(seed))
    velocity, sigmas = partial(policy, guidance_scale=1.0), shifted_sigmas(num_steps)
    latents = torch.cat(
        [sample(velocity, cond[i : i + CHUNK], noise[i : i + CHUNK], sigmas) for i in range(0, len(cond), CHUNK)]
    )
    rewards = score(policy.decode(latents), cond).view(n, candidates)
    best, worst = rewards.argmax(dim=1), rewards.argmin(dim=1)
    images = out.with_name(f"{out.stem}_images")
    lines = []
    with staged(images) as staging:
        for i in range(n):
            record = {"prompt": str(i % NUM_CLASSES)}
            for key, k in (("chosen", best[i]), ("rejected", worst[i])):
                name = f"{i:05d}_{key}.png"
                Image.fromarray(pair_image(latents[i * candidates + k])).save(staging / name)
                record[key] = f"{images.name}/{name}"
            record |= {"chosen_reward": float(rewards[i, best[i]]), "rejected_reward": float(rewards[i, worst[i]])}
            lines.append(json.dumps(record))
    write_text_atomic(out, "\n".join(lines) + "\n")
    return out
