"""The digits task: 8x8 scikit-learn digits, a tiny class-conditional flow model and a digit classifier.

The shipped weights live under ``weights/`` next to this file:

- ``weights/base/``: the base policy (``transformer/`` in diffusers layout + ``prompt_embeddings.safetensors``),
  re-created by ``flowdppo.tasks.digits.pretrain.pretrain``;
- ``weights/base_u4/``, ``weights/base_u8/``: the bases of ``digits_upsample=4`` and ``8`` (latent dim 1,024 and
  4,096), re-created by ``flowdppo digits pretrain --upsample U --steps 6000 --out DIR``;
- ``weights/classifier/``: the reward classifier (``model.safetensors`` + ``config.json``), re-created by
  ``flowdppo.tasks.digits.classifier.train_classifier``.

A prompt is a digit class ``0..9``; class ``10`` is the null prompt used for classifier-free guidance.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BASE_WEIGHTS_DIR = WEIGHTS_DIR / "base"
CLASSIFIER_WEIGHTS_DIR = WEIGHTS_DIR / "classifier"
UPSAMPLE_FACTORS = (1, 4, 8)  # digits_upsample: latent (u*u, 8, 8), dim 64, 1,024, 4,096


def base_weights_dir(upsample: int = 1) -> Path:
    """The shipped base of ``digits_upsample=upsample``."""
    return BASE_WEIGHTS_DIR if upsample == 1 else WEIGHTS_DIR / f"base_u{upsample}"


__all__ = ["base_weights_dir", "BASE_WEIGHTS_DIR", "CLASSIFIER_WEIGHTS_DIR", "UPSAMPLE_FACTORS", "WEIGHTS_DIR"]
