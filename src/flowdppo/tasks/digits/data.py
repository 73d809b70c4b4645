"""The digits data: scikit-learn's bundled 8x8 ``load_digits`` (1,797 images, no download).

Pixels are integers 0..16; images are returned as float32 ``(N, 1, 8, 8)`` in ``[-1, 1]``
(``x / 8 - 1``) and labels as int64 ``(N,)`` in ``0..9``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

NUM_CLASSES = 10
NULL_CLASS = 10  # the "empty prompt" used for classifier-free guidance
IMAGE_SIZE = 8
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0


def to_model_range(pixels: np.ndarray | Tensor) -> Tensor:
    """Raw pixels in ``0..16`` -> float32 in ``[-1, 1]``: ``x / 8 - 1``."""
    return torch.as_tensor(pixels, dtype=torch.float32) / 8.0 - 1.0


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1,797 digits: images ``(N, 1, 8, 8)`` in ``[-1, 1]`` and labels ``(N,)`` (int64)."""
    bunch = load_digits()
    images = to_model_range(bunch.images.astype(np.float32)).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels


def load_digits_split(
    heldout_fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fixed stratified train / held-out split -> ``(train_x, train_y, heldout_x, heldout_y)``.

    The defaults (20% held out, seed 0) give the split the shipped base model and classifier were
    trained on: 1,437 train and 360 held-out images.
    """
    images, labels = load_digits_tensors()
    idx = np.arange(len(labels))
    train_idx, heldout_idx = train_test_split(
        idx, test_size=heldout_fraction, random_state=seed, stratify=labels.numpy()
    )
    train_idx = torch.as_tensor(np.sort(train_idx))
    heldout_idx = torch.as_tensor(np.sort(heldout_idx))
    return images[train_idx], labels[train_idx], images[heldout_idx], labels[heldout_idx]


def to_unit_range(images: Tensor) -> Tensor:
    """Model range ``[-1, 1]`` -> image range ``[0, 1]``: ``clamp((x + 1) / 2, 0, 1)``."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def as_labels(prompts: Tensor | list | tuple, device: torch.device | str | None = None) -> Tensor:
    """Digit prompts -> int64 labels ``(B,)``.

    Accepts an integer tensor, or a list of ints or of digit strings (``"3"``). Labels must lie in
    ``0..10`` (10 is the null prompt).
    """
    if isinstance(prompts, Tensor):
        if prompts.is_floating_point() or prompts.is_complex():
            raise TypeError(f"digit prompts must be an integer tensor, got dtype {prompts.dtype}")
        labels = prompts.to(dtype=torch.int64).reshape(-1)
    else:
        values = []
        for p in prompts:
            if isinstance(p, str):
                if not p.strip().isdigit():
                    raise ValueError(f"a digit prompt must be a class index such as '3', got {p!r}")
                values.append(int(p.strip()))
            else:
                values.append(int(p))
        labels = torch.tensor(values, dtype=torch.int64)
    if labels.numel() and (labels.min() < 0 or labels.max() > NULL_CLASS):
        raise ValueError(f"digit labels must be in 0..{NULL_CLASS}, got {labels.tolist()}")
    return labels if device is None else labels.to(device)


# ---------------------------------------------------------------- high-dimensional digits (digits.upsample)


def upsample_digits(
    images: Tensor, factor: int, max_shift: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Digits ``(N, 1, 8, 8)`` in ``[-1, 1]`` -> ``(N, 1, 8u, 8u)``: bicubic upsampling (clamped to ``[-1, 1]``),
    then each image shifted by a random whole number of pixels in ``[-max_shift, max_shift]`` per axis (background
    ``-1`` enters at the border). ``max_shift`` defaults to ``u // 2`` (at most half an original pixel); 0: no
    shift and no random draw. ``factor = 1`` returns ``images`` unchanged.
    """
    if factor == 1:
        return images
    big = F.interpolate(images, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)
    shift = factor // 2 if max_shift is None else max_shift
    if shift == 0:
        return big
    n, _, h, w = big.shape
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator)
    padded = F.pad(big, (shift, shift, shift, shift), value=-1.0)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def to_latent(images: Tensor, factor: int) -> Tensor:
    """Images ``(N, 1, 8u, 8u)`` -> latents ``(N, u*u, 8, 8)`` (``pixel_unshuffle``; the identity for ``u = 1``)."""
    return images if factor == 1 else F.pixel_unshuffle(images, factor)


def latent_factor(channels: int) -> int:
    """The upsampling factor ``u`` of a latent with ``u*u`` channels."""
    factor = math.isqrt(channels)
    if factor * factor != channels:
        raise ValueError(f"a digits latent has u*u channels, got {channels}")
    return factor


def decode_latents(latents: Tensor) -> Tensor:
    """Latents ``(N, u*u, 8, 8)`` in ``[-1, 1]`` -> 8x8 images ``(N, 1, 8, 8)`` in ``[0, 1]``: ``pixel_shuffle`` to
    ``(N, 1, 8u, 8u)``, ``to_unit_range`` (clamp) at that size, then the mean of each ``u x u`` block. For ``u = 1``
    exactly ``to_unit_range``."""
    factor = latent_factor(latents.shape[1])
    if factor == 1:
        return to_unit_range(latents)
    return F.avg_pool2d(to_unit_range(F.pixel_shuffle(latents, factor)), factor)


def pooled_model_range(latents: Tensor) -> Tensor:
    """Latents ``(N, u*u, 8, 8)`` -> 8x8 images in the model range ``[-1, 1]`` (what the classifier takes):
    ``decode_latents`` mapped back by ``2 x - 1``; for ``u = 1`` exactly ``latents.clamp(-1, 1)``."""
    if latents.shape[1] == 1:
        return latents.clamp(-1.0, 1.0)
    return decode_latents(latents) * 2.0 - 1.0
