"""The digits task: 8x8 scikit-learn digits, a tiny class-conditional flow model and a digit classifier.

The shipped weights live under ``weights/`` next to this file:

- ``weights/base/``: the base policy (``transformer/`` in diffusers layout + ``prompt_embeddings.safetensors``),
  re-created by ``flowdppo.tasks.digits.pretrain.pretrain``;
- ``weights/base_u4/``, ``weights/base_u8/``: the bases of ``digits.upsample=4`` and ``8`` (latent dim 1,024 and
  4,096), re-created by ``flowdppo digits pretrain --upsample U --steps 6000 --out DIR``;
- ``weights/classifier/``: the reward classifier (``model.safetensors`` + ``config.json``), re-created by
  ``flowdppo.tasks.digits.classifier.train_classifier``.

A prompt is a digit class ``0..9``; class ``10`` is the null prompt used for classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flowdppo.errors import ConfigError
from flowdppo.settings import Section

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BASE_WEIGHTS_DIR = WEIGHTS_DIR / "base"
CLASSIFIER_WEIGHTS_DIR = WEIGHTS_DIR / "classifier"
UPSAMPLE_FACTORS = (1, 4, 8)  # digits.upsample: latent (u*u, 8, 8), dim 64, 1,024, 4,096


@dataclass
class DigitsConfig(Section):
    """The digits task's options (``digits.*``)."""

    upsample: int = 1
    """1 (the 8x8 task, latent (1, 8, 8)), 4 or 8: digits upsampled (bicubic, small random shifts) and
    pixel-unshuffled into a (u*u, 8, 8) latent (dim 1,024 / 4,096), pooled back to 8x8 for reward and evaluation.
    Each has a shipped base (``flowdppo digits pretrain --upsample U --out DIR`` re-creates it; model=DIR takes
    yours)."""
    classes: list[int] = field(default_factory=list)
    """The classes prompts are drawn from (empty: all ten). The others are held out: ``eval/*`` then measures the
    trained classes and ``eval_heldout/*`` the held-out ones (what training does to digits it never saw:
    forgetting)."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        return {"upsample": UPSAMPLE_FACTORS}

    def check(self, prefix: str = "digits.") -> None:
        self.check_choices(prefix)
        if self.classes and (len(set(self.classes)) != len(self.classes) or not set(self.classes) <= set(range(10))):
            raise ConfigError(f"{prefix}classes: distinct digits 0-9, got {self.classes!r}")


def base_weights_dir(upsample: int = 1) -> Path:
    """The shipped base of ``digits.upsample=upsample``."""
    return BASE_WEIGHTS_DIR if upsample == 1 else WEIGHTS_DIR / f"base_u{upsample}"


__all__ = [
    "DigitsConfig",
    "base_weights_dir",
    "BASE_WEIGHTS_DIR",
    "CLASSIFIER_WEIGHTS_DIR",
    "UPSAMPLE_FACTORS",
    "WEIGHTS_DIR",
]
