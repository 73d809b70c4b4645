"""``flowdppo digits make-pairs``: a preference file for offline Diffusion-DPO, from base samples scored by a reward.

    flowdppo digits make-pairs --out pairs.jsonl --n 200
    flowdppo train --method diffusion_dpo_offline dpo.pairs_file=pairs.jsonl

Each pair is a prompt (digits ``0..9`` in turn) with ``--candidates`` ODE samples of the shipped base (CFG 1, the
digits schedule, noise from ``--seed``); the best by the reward is ``chosen``, the worst ``rejected``. The images are
PNGs in ``STEM_images/`` beside the file (8x8 grayscale, or 8u x 8u with ``--upsample`` u: the latent
``pixel_shuffle``d, as it decodes), named by the file relative to it; each line also records the two rewards::

    {"prompt": "3", "chosen": "pairs_images/00003_chosen.png", "rejected": "pairs_images/00003_rejected.png",
     "chosen_reward": 0.97, "rejected_reward": 0.02}

``dpo.pairs_file=digits`` makes the same pairs in memory (``base_pairs``) from the run's base and rewards.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowdppo.errors import ConfigError
from flowdppo.files import staged, write_text_atomic
from flowdppo.rewards.registry import RewardContext, load_rewards
from flowdppo.rollout import sample
from flowdppo.sde import shifted_sigmas
from flowdppo.tasks.digits.classifier import load_classifier
from flowdppo.tasks.digits.data import NUM_CLASSES, to_unit_range
from flowdppo.tasks.digits.policy import load_base_policy

CHUNK = 512  # samples per model call
PAIRS, CANDIDATES, NUM_STEPS = 200, 4, 10  # the defaults of the command and of dpo.pairs_file=digits


def pair_images(latents: Tensor) -> Tensor:
    """Latents ``(B, u*u, 8, 8)`` -> the uint8 images ``(B, 8u, 8u)`` they decode from (``to_unit_range`` of the
    ``pixel_shuffle``)."""
    factor = int(latents.shape[1] ** 0.5)
    images = to_unit_range(F.pixel_shuffle(latents, factor) if factor > 1 else latents)[:, 0]
    return (images * 255).round().to(torch.uint8)


@torch.no_grad()
def base_pairs(
    policy: nn.Module, score: Callable[[Tensor, Tensor], Tensor], n: int, candidates: int, seed: int, num_steps: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` pairs of the policy's ODE samples, the best and the worst of ``candidates`` by ``score(images,
    prompts)``: prompts ``(n,)``, chosen and rejected uint8 images ``(n, 8u, 8u)`` and their rewards ``(n, 2)``."""
    device = next(policy.parameters()).device
    cond = torch.arange(n).remainder(NUM_CLASSES).repeat_interleave(candidates).to(device)
    noise = torch.randn((len(cond), *policy.latent_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    velocity, sigmas = partial(policy, guidance_scale=1.0), shifted_sigmas(num_steps, device=device)
    latents = torch.cat(
        [sample(velocity, cond[i : i + CHUNK], noise[i : i + CHUNK], sigmas) for i in range(0, len(cond), CHUNK)]
    )
    rewards = score(policy.decode(latents), cond).view(n, candidates)
    rows = torch.arange(n, device=device)
    best, worst = rows * candidates + rewards.argmax(dim=1), rows * candidates + rewards.argmin(dim=1)
    images = pair_images(latents)
    scores = torch.stack([rewards.flatten()[best], rewards.flatten()[worst]], dim=1)
    return cond[best], images[best], images[worst], scores


def reward_score(names: list[str], weights: list[float], device) -> Callable[[Tensor, Tensor], Tensor]:
    """The weighted sum of the digits rewards ``names``, as ``score(images, prompts)``."""
    rewards = load_rewards(names, ("digits",), RewardContext(device, classifier=load_classifier().to(device)))

    def score(images: Tensor, prompts: Tensor) -> Tensor:
        return sum(w * fn(images, prompts).float() for w, (_, fn) in zip(weights, rewards, strict=True)) / sum(weights)

    return score


def make_pairs(
    out: str | Path,
    n: int = PAIRS,
    candidates: int = CANDIDATES,
    seed: int = 0,
    reward: str = "classifier_prob",
    upsample: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` preference pairs to the JSONL file ``out`` and their PNGs beside it; returns ``out``."""
    from PIL import Image

    out = Path(out)
    if n < 1 or candidates < 2:
        raise ConfigError(f"--n must be >= 1 and --candidates >= 2 (a best and a worst), got {n} and {candidates}")
    if out.suffix != ".jsonl":
        raise ConfigError(f"--out: {out} must end in .jsonl (one JSON object a line)")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out: {out} exists; give another file or --overwrite")
    score = reward_score([reward], [1.0], "cpu")
    prompts, chosen, rejected, rewards = base_pairs(
        load_base_policy(upsample=upsample), score, n, candidates, seed, NUM_STEPS
    )
    folder = out.with_name(f"{out.stem}_images")
    lines = []
    with staged(folder) as staging:
        for i in range(n):
            record = {"prompt": str(int(prompts[i]))}
            for key, images in (("chosen", chosen), ("rejected", rejected)):
                Image.fromarray(images[i].cpu().numpy()).save(staging / f"{i:05d}_{key}.png")
                record[key] = f"{folder.name}/{i:05d}_{key}.png"
            record |= {"chosen_reward": float(rewards[i, 0]), "rejected_reward": float(rewards[i, 1])}
            lines.append(json.dumps(record))
    write_text_atomic(out, "\n".join(lines) + "\n")
    return out
