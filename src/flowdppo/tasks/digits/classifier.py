"""The digit classifier: the reward model and the feature extractor of the digits task.

A small CNN on 8x8 images in ``[-1, 1]``, trained on the train split with light augmentation (one-pixel
shifts, Gaussian pixel noise) and a share of synthetic junk images (smoothed noise, blank pages, partly
erased digits) taught to give the uniform distribution, so that blobs do not earn a confident class.
Shipped as ``weights/classifier/{model.safetensors, config.json}``; re-create it with ``train_classifier``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from flowdppo.tasks.digits import CLASSIFIER_WEIGHTS_DIR
from flowdppo.tasks.digits.data import NUM_CLASSES, load_digits_split

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class DigitClassifier(nn.Module):
    """CNN ``(B, 1, 8, 8)`` in ``[-1, 1]`` -> logits ``(B, 10)``; ``features`` is the penultimate layer."""

    def __init__(self, channels: int = 32, feature_dim: int = 64, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.config = {"channels": channels, "feature_dim": feature_dim, "num_classes": num_classes}
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 2x2
        )
        self.fc = nn.Linear(2 * channels * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``(B, feature_dim)`` of images ``(B, 1, 8, 8)`` in ``[-1, 1]``."""
        return F.gelu(self.fc(self.conv(x.float()).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, 1, 8, 8)`` in ``[-1, 1]``."""
        return self.head(self.features(x))

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write ``model.safetensors`` and ``config.json``."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(save_directory / MODEL_FILE))
        (save_directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_path: str | Path) -> DigitClassifier:
        """Load a directory written by ``save_pretrained``; the model is frozen and in eval mode."""
        pretrained_path = Path(pretrained_path)
        if not (pretrained_path / MODEL_FILE).is_file() or not (pretrained_path / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{pretrained_path} is not a digit classifier directory: expected '{MODEL_FILE}' and "
                f"'{CONFIG_FILE}' (written by DigitClassifier.save_pretrained)"
            )
        config = json.loads((pretrained_path / CONFIG_FILE).read_text())
        model = cls(**config)
        model.load_state_dict(load_file(str(pretrained_path / MODEL_FILE)))
        model.requires_grad_(False)
        return model.eval()


def load_classifier() -> DigitClassifier:
    """The shipped digit classifier (``tasks/digits/weights/classifier``)."""
    return DigitClassifier.from_pretrained(CLASSIFIER_WEIGHTS_DIR)


@torch.no_grad()
def accuracy(classifier: DigitClassifier, images: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``images`` (N, 1, 8, 8) in ``[-1, 1]`` whose arg-max class equals ``labels`` (N,)."""
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = classifier(images[i : i + batch_size])
        correct += int((logits.argmax(-1) == labels[i : i + batch_size].to(logits.device)).sum())
    return correct / max(len(images), 1)


def _random_shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Shift each image by -1, 0 or +1 pixel in each direction (background -1 enters at the border)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    offsets = torch.randint(0, 3, (x.shape[0], 2), generator=generator)
    out = torch.empty_like(x)
    for dy in range(3):
        for dx in range(3):
            sel = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            out[sel] = padded[sel, :, dy : dy + 8, dx : dx + 8]
    return out


def _junk_images(n: int, real: Tensor, generator: torch.Generator) -> Tensor:
    """Images that are no digit: smoothed noise blobs, uniform noise, blank pages, mostly erased digits."""
    noise = torch.randn(n, 1, 8, 8, generator=generator)
    blobs = F.avg_pool2d(noise, 3, stride=1, padding=1, count_include_pad=False)
    blobs = (blobs * (1 + 3 * torch.rand(n, 1, 1, 1, generator=generator)) - 0.5).clamp(-1, 1)
    uniform = 2 * torch.rand(n, 1, 8, 8, generator=generator) - 1
    blank = torch.full_like(blobs, -1.0) + 0.1 * torch.rand(n, 1, 1, 1, generator=generator)
    keep = torch.rand(n, 1, 8, 8, generator=generator) < 0.2  # erase ~80% of a real digit's pixels
    erased = torch.where(keep, real[:n], torch.full_like(real[:n], -1.0))
    kind = torch.randint(0, 4, (n, 1, 1, 1), generator=generator)
    out = torch.where(kind == 0, blobs, uniform)
    out = torch.where(kind == 2, blank, out)
    return torch.where(kind == 3, erased, out)


def train_classifier(
    out_dir: str | Path | None = None,
    seed: int = 0,
    epochs: int = 60,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    junk_fraction: float = 0.125,
    max_noise_std: float = 0.3,
    progress: bool = True,
) -> tuple[DigitClassifier, float]:
    """Train the digit classifier on the train split -> ``(classifier, held-out accuracy)``.

    Loss: cross-entropy on augmented real digits (random one-pixel shift, then Gaussian noise with
    ``std ~ U(0, max_noise_std)``, clamped to ``[-1, 1]``) plus cross-entropy to the uniform distribution
    on ``junk_fraction`` extra junk images per batch. AdamW with a cosine learning rate. The defaults
    re-create the shipped weights; with ``out_dir`` the model is written there with ``save_pretrained``.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y, heldout_x, heldout_y = load_digits_split()
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(train_x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    n_junk = max(1, round(junk_fraction * batch_size))
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(epochs), desc="classifier", disable=not progress):
        perm = torch.randperm(len(train_x), generator=generator)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            x, y = _random_shift(train_x[idx], generator), train_y[idx]
            std = max_noise_std * torch.rand(len(x), 1, 1, 1, generator=generator)
            x = (x + std * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
            junk_src = train_x[torch.randint(0, len(train_x), (n_junk,), generator=generator)]
            junk = _junk_images(n_junk, junk_src, generator)
            loss_real = F.cross_entropy(model(x), y)
            loss_junk = -F.log_softmax(model(junk), dim=-1).mean()  # cross-entropy to uniform
            loss = loss_real + junk_fraction * loss_junk
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.requires_grad_(False)
    model.eval()
    heldout_acc = accuracy(model, heldout_x, heldout_y)
    print(f"classifier: held-out accuracy {heldout_acc:.4f}, trained in {time.perf_counter() - start:.1f} s")
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model, heldout_acc
