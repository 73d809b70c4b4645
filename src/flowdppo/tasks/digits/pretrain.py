"""Pretraining of the digits base policy by rectified flow, and its headroom check.

Rectified flow (flow matching with straight paths): ``x0`` a train digit, ``eps ~ N(0, I)``,
``x_sigma = (1 - sigma) x0 + sigma eps``, target velocity ``v = eps - x0``, loss ``|v_theta(x_sigma, sigma, c) - v|^2``.
The class ``c`` is replaced by the null class with probability ``label_dropout`` so the same network also
gives the unconditional velocity for classifier-free guidance.

Headroom. Like a text-to-image model trained on loosely captioned web images, the base model is trained
on noisy prompts: with probability ``label_noise`` a digit's label is replaced by a uniformly random class.
It learns ``p(x | c) = (1 - q) p_data(x | c) + q p_data(x)``: its samples are clean digits, but without
guidance only about ``1 - 0.9 q`` of them show the prompted digit, while CFG 3 sharpens ``p(x | c) / p(x)``
and recovers the class. RL without guidance therefore has a real prompt-following error to fix, and
forgetting (image quality, diversity) can be measured against a base that draws good digits.
``evaluate_policy`` measures the gap.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from flowdppo.samplers import get_sampler
from flowdppo.sde import shifted_sigmas
from flowdppo.tasks.digits.classifier import DigitClassifier
from flowdppo.tasks.digits.data import (
    NULL_CLASS,
    NUM_CLASSES,
    load_digits_split,
    pooled_model_range,
    to_latent,
    upsample_digits,
)
from flowdppo.tasks.digits.policy import DigitsPolicy

SIGMA_SAMPLING = ("uniform", "logit_normal")


def sample_sigmas(n: int, how: str, generator: torch.Generator) -> Tensor:
    """Training noise levels ``(n,)``: ``U(0, 1)`` or logit-normal ``sigmoid(N(0, 1))``."""
    if how == "uniform":
        return torch.rand(n, generator=generator)
    if how == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    raise ValueError(f"sigma_sampling must be one of {SIGMA_SAMPLING}, got {how!r}")


def pretrain(
    out_dir: str | Path | None = None,
    steps: int = 2000,
    seed: int = 0,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 50,
    label_dropout: float = 0.1,
    label_noise: float = 0.4,
    sigma_sampling: Literal["uniform", "logit_normal"] = "uniform",
    ema_decay: float | None = 0.995,
    progress: bool = True,
    callback: Callable[[int, DigitsPolicy], None] | None = None,
    upsample: int = 1,
) -> DigitsPolicy:
    """Train the digits base policy from scratch by rectified flow; the defaults re-create the shipped weights.

    Each step: a batch of train digits; labels replaced by a random class with probability ``label_noise``,
    then by the null class with probability ``label_dropout``; ``sigma`` from ``sigma_sampling``. AdamW with
    a linear warm-up over ``warmup_steps``, then a constant learning rate. With ``ema_decay`` the returned
    (and saved) policy is the exponential moving average ``ema <- d ema + (1 - d) theta`` with the usual
    warm-up ``d = min(ema_decay, (1 + step) / (10 + step))``; ``None`` returns the raw weights.
    ``callback(step, policy)`` is called after every step with the policy that would be returned.
    With ``out_dir`` the policy is written there with ``save_pretrained``.

    ``upsample`` ``u`` > 1 trains the base of ``digits.upsample=u``: each batch's digits are upsampled ``u``
    times (bicubic) with random shifts of up to ``u // 2`` pixels (``upsample_digits``) and
    ``pixel_unshuffle``d into ``(u*u, 8, 8)`` latents; the transformer is the same but for its in / out channels
    (the patch embedding and the output projection). ``u = 1`` draws nothing more: the shipped recipe.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y, _, _ = load_digits_split()
    policy = DigitsPolicy.from_config(in_channels=upsample**2, out_channels=upsample**2)
    ema = copy.deepcopy(policy).requires_grad_(False) if ema_decay is not None else None
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(warmup_steps, 1)))
    policy.train()
    start = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc="pretrain", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(train_x), (batch_size,), generator=generator)
        x0, labels = train_x[idx], train_y[idx]
        x0 = to_latent(upsample_digits(x0, upsample, generator=generator), upsample)  # u = 1: unchanged
        noisy = torch.rand(batch_size, generator=generator) < label_noise
        random_labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
        labels = torch.where(noisy, random_labels, labels)
        drop = torch.rand(batch_size, generator=generator) < label_dropout
        labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
        eps = torch.randn(x0.shape, generator=generator)
        sigma = sample_sigmas(batch_size, sigma_sampling, generator)
        s = sigma.view(-1, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * eps  # straight path
        loss = F.mse_loss(policy.velocity(x_sigma, sigma, labels), eps - x0)  # target v = eps - x0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), policy.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - decay)  # ema <- d ema + (1 - d) theta
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if callback is not None:
            callback(step, ema if ema is not None else policy)
    final = (ema if ema is not None else policy).eval()
    print(f"pretrain: {steps} steps in {time.perf_counter() - start:.1f} s")
    if out_dir is not None:
        final.save_pretrained(out_dir)
    return final


@torch.no_grad()
def sample_digits(
    policy: DigitsPolicy,
    labels: Tensor,
    num_steps: int = 10,
    guidance_scale: float = 1.0,
    kind: str = "ode",
    eta: float = 0.7,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample latents ``(B, *policy.latent_shape)`` for ``labels`` (B,) from ``x ~ N(0, I)`` at ``sigma = 1``.

    Every step is a step of the sampler ``kind`` (``flowdppo.samplers``) on ``shifted_sigmas(num_steps, shift)``:
    ``x_next = mean + std * noise`` (``std = 0`` for ``"ode"``, the Euler step ``x + dt v``).
    """
    device = policy.device
    labels = labels.to(device)
    sigmas = shifted_sigmas(num_steps, shift)
    shape = (labels.shape[0], *policy.latent_shape)
    x = torch.randn(shape, generator=generator).to(device)
    sampler = get_sampler(kind)
    for i in range(num_steps):
        sigma = sigmas[i].expand(labels.shape[0]).to(device)
        v = policy.velocity(x, sigma, labels, guidance_scale)
        step = sampler.step(x, v, sigmas[i].item(), sigmas[i + 1].item(), eta, sigmas[1].item())
        x = step.mean
        if sampler.stochastic:
            x = x + step.std * torch.randn(shape, generator=generator).to(device)
    return x


@torch.no_grad()
def evaluate_policy(
    policy: DigitsPolicy,
    classifier: DigitClassifier,
    num_per_class: int = 100,
    num_steps: int = 10,
    guidance_scales: Sequence[float] = (1.0, 3.0),
    kinds: Sequence[str] = ("ode", "flow_sde"),
    eta: float = 0.7,
    seed: int = 0,
) -> dict[str, float]:
    """Classifier accuracy of samples, ``num_per_class`` per digit -> ``{"acc/{kind}/cfg{w}": acc}``.

    Accuracy: fraction of samples whose arg-max class is the prompted digit. Every setting uses the same
    seed, hence the same initial noise.
    """
    labels = torch.arange(NUM_CLASSES).repeat_interleave(num_per_class)
    results = {}
    for kind in kinds:
        for w in guidance_scales:
            generator = torch.Generator().manual_seed(seed)
            latents = sample_digits(policy, labels, num_steps, w, kind, eta, generator=generator)
            logits = classifier(pooled_model_range(latents).to(next(classifier.parameters()).device))
            results[f"acc/{kind}/cfg{w:g}"] = (logits.argmax(-1).cpu() == labels).float().mean().item()
    return results
