"""What the model rewards share: images as 8-bit pixels, the prompts of a batch, loading a model's files.

Model rewards see images ``(B, 3, H, W)`` in ``[0, 1]`` as ``uint8`` ``round(255 x)`` (``to_uint8``, ``to_pil``), as
the public reference implementations do. A model that cannot be loaded is one ``ConfigError`` line naming the reward
and the path (``load_error``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from flowdppo.errors import ConfigError


def to_uint8(images: Tensor) -> np.ndarray:
    """``round(255 x)`` clamped to ``[0, 255]``: images ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, H, W, 3)`` uint8.

    One-channel images are repeated to three channels.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image rewards take images (B, 3, H, W), got {tuple(images.shape)}")
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: Tensor) -> list[Image.Image]:
    """Images ``(B, 3, H, W)`` in ``[0, 1]`` -> ``B`` RGB PIL images of ``to_uint8(images)``."""
    return [Image.fromarray(array) for array in to_uint8(images)]


def batch_texts(images: Tensor, prompts: Sequence[Any], metadata: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """``(prompt strings, metadata dicts)``, one of each per image (``{}`` where there is no metadata)."""
    batch = images.shape[0]
    texts = [str(p) for p in (prompts.tolist() if isinstance(prompts, Tensor) else prompts)]
    metas = [{} for _ in range(batch)] if metadata is None else [m or {} for m in metadata]
    if len(texts) != batch or len(metas) != batch:
        raise ValueError(f"got {len(texts)} prompts and {len(metas)} metadata for {batch} images")
    return texts, metas


def load_error(reward: str, path: str, err: BaseException) -> ConfigError:
    """One line: reward ``reward`` cannot load ``path``, with the first line of ``err``."""
    lines = str(err).strip().splitlines()
    detail = lines[0][:300] if lines else ""
    return ConfigError(f"reward {reward!r}: cannot load {path!r} ({type(err).__name__}: {detail})")


def check_local(reward: str, path: str) -> None:
    """A ``ConfigError`` when ``path`` looks like a local path (absolute, ``.`` or ``~``) but is no directory."""
    looks_local = os.path.isabs(path) or path.startswith((".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"reward {reward!r}: {path!r} is not a directory (give a local directory or a hub id)")


def load_processors(path: str) -> tuple[Any, Any]:
    """``(AutoImageProcessor, AutoTokenizer)`` of ``path``; a tokenizer without a vocabulary is an error."""
    from transformers import AutoImageProcessor, AutoTokenizer

    path = os.path.expanduser(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # transformers 5 builds an empty tokenizer from a directory without tokenizer files instead of failing.
    if tokenizer.vocab_size <= len(tokenizer.all_special_tokens):
        raise OSError(f"no tokenizer files in {path!r}")
    return image_processor, tokenizer


__all__ = ["batch_texts", "check_local", "load_error", "load_processors", "to_pil", "to_uint8"]
