"""Training examples that do not come from a rollout, and the forward noising the data-trained algorithms share.

Preference file (``dpo.pairs_file``, Pick-a-Pic style): one JSON object a line, image paths relative to the file's
folder (or absolute); other keys (``flowdppo digits make-pairs`` adds the two rewards) are ignored::

    {"prompt": "3", "chosen": "pairs_images/00000_chosen.png", "rejected": "pairs_images/00000_rejected.png"}

``dpo.pairs_file=digits``: the pairs ``make-pairs`` writes by default, made in memory from the run's base.

Data folder (``sft.data=DIR``): ``DIR/captions.jsonl``, one ``{"image": "0001.png", "prompt": "3"}`` a line, paths
relative to ``DIR``. ``sft.data=digits``: the digits task's real training digits (the base's 1,437), each prompted
with its class. Images become latents as the digits task's data do: an 8x8 (or, with ``digits.upsample`` u, 8u x 8u)
grayscale image ``x`` in [0, 1] is ``2 x - 1``, an 8x8 one upsampled (bicubic, no shift) for u > 1, then
``pixel_unshuffle``d to ``(u*u, 8, 8)``. Reading images is implemented for the digits task only.

An epoch trains on ``prompts_per_epoch x group_size`` examples drawn from the trainer's generator without
replacement (the file is cycled when it holds fewer), the same draw on every process, each taking its rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowdppo.algorithms.base import Elements
from flowdppo.algorithms.likelihood_free import TIMESTEP_MODES, noise_levels
from flowdppo.distributed import Distributed
from flowdppo.errors import ConfigError, shown
from flowdppo.sde import per_sample, shifted_sigmas

LEVEL_MODES = ("logit_normal", *TIMESTEP_MODES)
LOGIT_NORMAL_RANGE = (0.01, 0.99)  # Flow-Factory's DPO draws s in about [0.01, 0.99]
CAPTIONS_FILE = "captions.jsonl"
BUILT_IN_DIGITS = "digits"  # sft.data's real digits, dpo.pairs_file's pairs of the base
PAIR_KEYS = ("prompt", "chosen", "rejected")
CAPTION_KEYS = ("prompt", "image")


@dataclass
class ExampleBatch:
    """An epoch's examples, which ``Algorithm.update`` takes in place of a rollout's ``Trajectory``.

    cond:      (B,) the prompts (digit labels).
    final:     (B, ...) the latents trained on (a pair's chosen one).
    rejected:  (B, ...) a pair's rejected latents, or None.
    sigmas:    (K + 1,) the task's schedule (the levels ``schedule`` / ``stratified`` / ``uniform`` draw from).
    """

    cond: Tensor
    final: Tensor
    rejected: Tensor | None
    sigmas: Tensor


@dataclass
class Examples:
    """Every example of a file or folder, on the device: prompts ``cond`` (N,), latents ``x0`` (N, ...) and, for
    preference pairs, ``rejected`` (N, ...)."""

    cond: Tensor
    x0: Tensor
    rejected: Tensor | None = None

    def draw(self, total: int, rows: slice, rng: torch.Generator, sigmas: Tensor) -> ExampleBatch:
        """``total`` examples (a random order of all, repeated as needed) drawn for the global batch from ``rng``;
        this process's ``rows`` of them."""
        n = len(self.cond)
        rounds = -(-total // n)
        order = torch.cat([torch.randperm(n, generator=rng, device=rng.device) for _ in range(rounds)])
        index = order[:total][rows].to(self.x0.device)
        rejected = None if self.rejected is None else self.rejected[index]
        return ExampleBatch(self.cond[index], self.x0[index], rejected, sigmas.to(self.x0.device))


def training_levels(mode: str, sigmas: Tensor, n: int, batch: int, generator: torch.Generator) -> Tensor:
    """Noise levels ``(n, batch)``: ``"logit_normal"``, ``s = sigmoid(z)``, ``z ~ N(0, 1)``, clamped to [0.01, 0.99]
    (Flow-Factory's DPO default, unshifted; flow_grpo's DPO and SFT draw the same); the other modes are
    ``noise_levels``'."""
    if mode == "logit_normal":
        z = torch.randn((n, batch), generator=generator, device=generator.device)
        return torch.sigmoid(z).clamp(*LOGIT_NORMAL_RANGE)
    return noise_levels(mode, sigmas, n, batch, generator)


def shared_noise_elements(
    x0: dict[str, Tensor], sample: Tensor, mode: str, n: int, sigmas: Tensor, rng: torch.Generator, dist: Distributed
) -> Elements:
    """``n`` forward-noised copies of each row of the latents ``x0[key]`` (B, ...), every key at the same level
    ``s`` with the same noise ``eps`` (a pair's winner and loser, as Diffusion-DPO trains them).

    Element ``e = t * B + b`` holds ``key`` (row ``b``'s latent), ``noised_key = (1 - s) key + s eps``, ``eps``,
    ``sigma`` and ``sample``: ``sample[b]``, the row's sample in the batch whose prompts ``update`` indexes. The
    levels and the noise are drawn for the global batch from ``rng`` (alike on every process), sliced to this
    process's rows.
    """
    first = next(iter(x0.values()))
    b = first.shape[0]
    rows = slice(dist.rank * b, (dist.rank + 1) * b)
    sigma = training_levels(mode, sigmas, n, b * dist.world_size, rng)[:, rows].to(first.device).flatten()
    eps = torch.randn((n, b * dist.world_size, *first.shape[1:]), generator=rng, device=rng.device)[:, rows]
    eps = eps.to(device=first.device, dtype=first.dtype).flatten(0, 1)
    row = torch.arange(b, device=first.device).repeat(n)
    s = per_sample(sigma, first)
    data = {"eps": eps, "sigma": sigma, "sample": sample.to(first.device)[row], "row": row}
    for key, latents in x0.items():
        data[key] = latents[row]
        data[f"noised_{key}"] = (1 - s) * latents[row] + s * eps
    return Elements(data, n, b)


# ---------------------------------------------------------------- reading files and folders


def check_source_path(option: str, value: str, folder: bool) -> str | None:
    """Why ``value`` is not the file (or, with ``folder``, the data folder) ``option`` names, or None."""
    path = Path(value)
    if folder:
        if not path.is_dir():
            return f"{option}: no such folder {shown(value)}; give a folder with {CAPTIONS_FILE}, or {BUILT_IN_DIGITS}"
        path = path / CAPTIONS_FILE
    if not path.is_file():
        hint = "; write one line {'image': ..., 'prompt': ...} per image" if folder else ""
        return f"{option}: no such file {shown(str(path))}{hint}"
    return None


def read_records(path: Path, keys: tuple[str, ...], option: str) -> list[tuple[str, dict]]:
    """``(where, record)`` of each non-empty line of the JSONL file ``path``, ``where`` its ``FILE:LINE``; a line that
    is not a JSON object with string values under ``keys``: one line naming the file and line."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{option}: {where}: not valid JSON ({err.msg}); fix or remove the line") from err
        if not isinstance(record, dict) or not all(isinstance(record.get(key), str) for key in keys):
            raise ConfigError(
                f"{option}: {where}: a line must be a JSON object with the string keys {', '.join(keys)}; "
                f"got {shown(record)}"
            )
        records.append((where, record))
    if not records:
        raise ConfigError(f"{option}: {path} holds no examples; give one JSON object a line")
    return records


def digit_label(prompt: str, where: str, option: str) -> int:
    text = prompt.strip()
    if not (text.isdigit() and 0 <= int(text) <= 9):
        raise ConfigError(f"{option}: {where}: prompt {shown(prompt)} is not a digit 0-9 (the digits task's prompts)")
    return int(text)


def read_image(name: str, folder: Path, where: str, option: str) -> Tensor:
    """The grayscale image at ``name`` (relative to ``folder``) as ``(1, H, W)`` float32 in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(name) if Path(name).is_absolute() else folder / name
    if not path.is_file():
        raise ConfigError(f"{option}: {where}: no such image {shown(str(path))}")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as err:
        raise ConfigError(f"{option}: {where}: {path} is not a readable image ({err})") from err
    return torch.from_numpy(pixels).unsqueeze(0)


def digits_latent(image: Tensor, upsample: int, where: str, option: str) -> Tensor:
    """An image ``(1, H, W)`` in [0, 1] -> the digits latent ``(u*u, 8, 8)`` (module docstring)."""
    from flowdppo.tasks.digits.data import to_latent, upsample_digits  # scikit-learn, imported when used

    x = image.unsqueeze(0) * 2 - 1
    size = tuple(image.shape[1:])
    if size == (8 * upsample, 8 * upsample):
        return to_latent(x, upsample)[0]
    if size == (8, 8):
        return to_latent(upsample_digits(x, upsample, max_shift=0), upsample)[0]
    big = f" or {8 * upsample}x{8 * upsample}" if upsample > 1 else ""
    raise ConfigError(f"{option}: {where}: the image is {size[1]}x{size[0]}; digits.upsample={upsample} takes 8x8{big}")


def load_pairs(path: str | Path, upsample: int, device, option: str = "dpo.pairs_file") -> Examples:
    """The preference pairs of a JSONL file: prompts, chosen latents ``x0`` and ``rejected`` ones."""
    path = Path(path)
    cond, chosen, rejected = [], [], []
    for where, record in read_records(path, PAIR_KEYS, option):
        cond.append(digit_label(record["prompt"], where, option))
        for key, out in (("chosen", chosen), ("rejected", rejected)):
            out.append(digits_latent(read_image(record[key], path.parent, where, option), upsample, where, option))
    return Examples(torch.tensor(cond, device=device), torch.stack(chosen).to(device), torch.stack(rejected).to(device))


def built_in_pairs(policy: Any, cfg: Any, n: int | None = None) -> Examples:
    """``dpo.pairs_file=digits``: the pairs ``flowdppo digits make-pairs`` writes by default, made in memory from
    ``policy`` before it trains (the run's base) and ranked by the run's rewards (their weighted mean), its 8-bit
    images read back as the file's would be."""
    from flowdppo.tasks.digits.make_pairs import CANDIDATES, NUM_STEPS, PAIRS, base_pairs, reward_score

    device, upsample = policy_device(policy), cfg.digits.upsample
    score = reward_score(cfg.reward.names, cfg.reward.weights, device)
    prompts, chosen, rejected, _ = base_pairs(policy, score, n or PAIRS, CANDIDATES, 0, NUM_STEPS)

    def latents(images: Tensor) -> Tensor:
        return torch.stack([digits_latent(image[None].float() / 255, upsample, "", "") for image in images.cpu()])

    return Examples(prompts, latents(chosen).to(device), latents(rejected).to(device))


def load_data(source: str, upsample: int, classes: list[int], device, option: str = "sft.data") -> Examples:
    """A data folder's captioned images, or (``digits``) the real training digits of ``classes`` (empty: all)."""
    if source == BUILT_IN_DIGITS:
        from flowdppo.tasks.digits.data import load_digits_split, to_latent, upsample_digits

        images, labels, _, _ = load_digits_split()
        keep = torch.isin(labels, torch.tensor(classes)) if classes else torch.ones_like(labels, dtype=torch.bool)
        x0 = to_latent(upsample_digits(images[keep], upsample, max_shift=0), upsample)
        return Examples(labels[keep].to(device), x0.to(device))
    folder = Path(source)
    cond, x0 = [], []
    for where, record in read_records(folder / CAPTIONS_FILE, CAPTION_KEYS, option):
        cond.append(digit_label(record["prompt"], where, option))
        x0.append(digits_latent(read_image(record["image"], folder, where, option), upsample, where, option))
    return Examples(torch.tensor(cond, device=device), torch.stack(x0).to(device))


def epoch_examples(
    examples: Examples, cfg: Any, rng: torch.Generator, dist: Distributed
) -> tuple[ExampleBatch, Tensor]:
    """An epoch's ``prompts_per_epoch x group_size`` examples (this process's rows) and their weights (ones), on the
    digits task's schedule."""
    total = cfg.prompts_per_epoch * cfg.group_size
    sigmas = shifted_sigmas(cfg.sampler.num_steps, cfg.sampler.shift)
    batch = examples.draw(total, dist.rows(total, "prompts_per_epoch x group_size"), rng, sigmas)
    return batch, torch.ones(len(batch.cond), device=batch.final.device)


def policy_device(policy: Any) -> torch.device:
    return next(policy.parameters()).device
