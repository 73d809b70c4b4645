"""Rewards and out-of-domain measures of the digits task.

Images are ``(B, 1, 8, 8)`` in ``[0, 1]`` (``Policy.decode``); the classifier sees them as ``2 x - 1``.
Prompts are digit labels ``0..9`` (a tensor, ints or digit strings).

Rewards (registered in ``rewards.registry``, kind "digits"):

- ``classifier_prob``:    ``p(c | x)``, the classifier's probability of the prompted digit ``c``, in ``[0, 1]``;
- ``classifier_logprob``: ``log p(c | x)``, in ``(-inf, 0]``;
- ``ink``:                ``-mean(x)``, minus the mean ink of the image, in ``[-1, 0]``. It competes with
  legibility: the cheapest way to use less ink is to drop strokes, and a fainter or thinner digit is
  recognised less surely.

Measures of forgetting: ``feature_fid`` (a Frechet distance in the classifier's feature space) and
``group_diversity`` (mean pairwise distance within a group of samples of one prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from flowdppo.tasks.digits.classifier import DigitClassifier, load_classifier
from flowdppo.tasks.digits.data import NUM_CLASSES, as_labels


def _digit_labels(prompts: Tensor | Sequence[Any], batch: int, device: torch.device) -> Tensor:
    labels = as_labels(prompts, device=device)
    if labels.shape[0] != batch:
        raise ValueError(f"got {labels.shape[0]} prompts for {batch} images")
    if labels.numel() and int(labels.max()) >= NUM_CLASSES:
        raise ValueError(f"a digit reward needs a prompt in 0..{NUM_CLASSES - 1}, not the null prompt")
    return labels


@torch.no_grad()
def classifier_log_probs(images: Tensor, classifier: DigitClassifier) -> Tensor:
    """``log softmax`` of the classifier on images ``(B, 1, 8, 8)`` in ``[0, 1]`` -> ``(B, 10)`` float32."""
    classifier.to(images.device)
    return classifier(images.float() * 2 - 1).log_softmax(dim=-1)


class ClassifierReward:
    """``log p(c | x)`` (``log=True``, name ``classifier_logprob``) or ``p(c | x)`` (name ``classifier_prob``)."""

    def __init__(self, classifier: DigitClassifier | None = None, log: bool = False) -> None:
        self.classifier = classifier if classifier is not None else load_classifier()
        self.log = log
        self.name = "classifier_logprob" if log else "classifier_prob"

    def __call__(self, images: Tensor, prompts: Tensor | Sequence[Any], metadata: Any = None) -> Tensor:
        labels = _digit_labels(prompts, images.shape[0], images.device)
        logp = classifier_log_probs(images, self.classifier).gather(1, labels[:, None]).squeeze(1)
        return logp if self.log else logp.exp()


class InkReward:
    """``-mean(x)`` over pixels: minus the mean ink of images in ``[0, 1]``, in ``[-1, 0]``."""

    name = "ink"

    def __call__(self, images: Tensor, prompts: Tensor | Sequence[Any], metadata: Any = None) -> Tensor:
        return -images.float().mean(dim=tuple(range(1, images.ndim)))


@torch.no_grad()
def prompt_accuracy(images: Tensor, prompts: Tensor | Sequence[Any], classifier: DigitClassifier) -> float:
    """Fraction of images ``(B, 1, 8, 8)`` in ``[0, 1]`` whose arg-max class is the prompted digit."""
    labels = _digit_labels(prompts, images.shape[0], images.device)
    return (classifier_log_probs(images, classifier).argmax(-1) == labels).float().mean().item()


@torch.no_grad()
def classifier_features(images: Tensor, classifier: DigitClassifier, batch_size: int = 1024) -> Tensor:
    """Penultimate classifier features ``(N, feature_dim)`` of images ``(N, 1, 8, 8)`` in ``[0, 1]``."""
    classifier.to(images.device)
    feats = [classifier.features(images[i : i + batch_size].float() * 2 - 1) for i in range(0, len(images), batch_size)]
    return torch.cat(feats).cpu()


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Frechet distance of Gaussian fits: ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``.

    ``feats_*``: ``(N, D)``, ``N >= 2``. The matrix square root goes through symmetric eigen-decompositions
    in float64 (``tr (C_a C_b)^1/2 = tr (C_a^1/2 C_b C_a^1/2)^1/2``).
    """
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError("the Frechet distance needs at least 2 samples on each side")
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals_a, evecs_a = torch.linalg.eigh(cov_a)
    sqrt_a = evecs_a @ torch.diag(evals_a.clamp_min(0).sqrt()) @ evecs_a.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * tr_sqrt
    return max(fd.item(), 0.0)


def feature_fid(gen_images: Tensor, ref_images: Tensor, classifier: DigitClassifier) -> float:
    """A small FID: ``frechet_distance`` of classifier features of ``gen_images`` and ``ref_images`` (in ``[0, 1]``)."""
    return frechet_distance(classifier_features(gen_images, classifier), classifier_features(ref_images, classifier))


def group_diversity(images: Tensor, group_ids: Tensor | Sequence[Any]) -> float:
    """Mean over groups of the mean pairwise L2 distance ``|x_i - x_j|`` (i < j) between a group's images.

    ``images``: ``(B, ...)``; ``group_ids``: ``(B,)`` (samples of one prompt share an id). Groups of one
    image are skipped; at least one group must have two.
    """
    flat = images.detach().float().flatten(1).cpu()
    ids = torch.as_tensor(group_ids).reshape(-1).cpu()
    if ids.shape[0] != flat.shape[0]:
        raise ValueError(f"got {ids.shape[0]} group ids for {flat.shape[0]} images")
    per_group = [torch.pdist(flat[ids == g]).mean() for g in ids.unique() if int((ids == g).sum()) >= 2]
    if not per_group:
        raise ValueError("group_diversity needs at least one group with two or more images")
    return torch.stack(per_group).mean().item()
