"""HPSv2.1 (Human Preference Score v2.1): ``HPS(x, prompt) = cos(E_image(x), E_text(prompt))``, in ``[-1, 1]``.

The cosine of the image and text embeddings of an open_clip ViT-H-14 fine-tuned on human preferences, as the
reference ``hpsv2.score`` computes it (``image_features @ text_features.T`` of the L2-normalised features, without
the logit scale; its ranking evaluation multiplies by ``exp(logit_scale)``, which does not change the order, and its
benchmark tables report 100 x the mean). Typical HPSv2.1 scores are about 0.2 to 0.35.

Preprocessing (the reference's evaluation transform): the image ``round(255 x) / 255``, its longer side resized to
the model's ``image_size`` (bicubic, antialiased, on the float tensor; the shorter side ``round(side * scale)``),
zero-padded to a centred square, normalised with the CLIP mean and std. Text: open_clip's tokenizer of the model
(77 tokens for ViT-H-14, truncated).

``hpsv2@DIR``: ``DIR`` holds the weights, one of ``HPS_WEIGHT_FILES`` (a ``.safetensors`` file, or the released
``HPS_v2.1_compressed.pt`` read with ``torch.load(weights_only=True)``: no pickled code runs), an open_clip state dict
(possibly under ``state_dict``, keys possibly prefixed ``module.``), and optionally ``open_clip_config.json``
(open_clip's folder format ``{"model_cfg": ..., "preprocess_cfg": ...}``); without it, open_clip's built-in
``ViT-H-14`` config. ``hpsv2`` alone downloads ``HPS_v2.1_compressed.pt`` from the hub repository ``xswu/HPSv2``.
Needs open_clip: ``pip install 'flowdppo[hps]'``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowdppo.errors import ConfigError
from flowdppo.rewards.common import batch_texts, check_local, load_error, to_uint8

HPS_HUB = ("xswu/HPSv2", "HPS_v2.1_compressed.pt")
HPS_MODEL = "ViT-H-14"
HPS_CONFIG_FILE = "open_clip_config.json"
HPS_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "HPS_v2.1_compressed.safetensors",
    "HPS_v2.1_compressed.pt",
    "HPS_v2_compressed.pt",
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, open_clip's default
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIP_HINT = "pip install 'flowdppo[hps]' (or pip install open-clip-torch)"


def import_open_clip() -> Any:
    """The ``open_clip`` module, or a one-line ``ConfigError`` that says how to install it."""
    try:
        import open_clip
    except ImportError as err:
        raise ConfigError(f"reward 'hpsv2' needs open_clip, which is not installed: {PIP_HINT}") from err
    except Exception as err:  # e.g. a torchvision build that does not match torch
        detail = " ".join(str(err).split())[:200]
        raise ConfigError(
            f"reward 'hpsv2': open_clip does not import ({type(err).__name__}: {detail}); "
            "torchvision must be the build that matches torch"
        ) from err
    return open_clip


def hps_pixels(images: Tensor, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Tensor:
    """HPS's evaluation transform of images ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, 3, size, size)`` float32:
    ``u = round(255 x) / 255``; the longer side resized to ``size`` (bicubic, antialiased), the shorter to
    ``round(side * size / max(H, W))``; zero-padded to ``size x size`` (``pad // 2`` before); ``(u - mean) / std``."""
    pixels = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float().div(255)
    height, width = pixels.shape[-2:]
    scale = size / max(height, width)
    if scale != 1.0:
        new_h, new_w = round(height * scale), round(width * scale)
        pixels = nn.functional.interpolate(
            pixels, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
        )
        pad_h, pad_w = size - new_h, size - new_w
        pixels = nn.functional.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


def load_hps_state_dict(file: str) -> dict[str, Tensor]:
    """An open_clip state dict from ``.safetensors`` or a weights-only ``torch.load`` (``state_dict`` unwrapped,
    ``module.`` prefixes removed)."""
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _weights_file(path: str) -> str:
    folder = os.path.expanduser(path)
    if os.path.isdir(folder):
        for name in HPS_WEIGHT_FILES:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        raise FileNotFoundError(f"no weights file in the directory (one of {', '.join(HPS_WEIGHT_FILES)})")
    if path != HPS_HUB[0]:
        raise FileNotFoundError("not a directory (give a folder holding the HPS weights)")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(*HPS_HUB)


class HpsEmbedder:
    """An open_clip CLIP model with its tokenizer and image size / mean / std."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def load(cls, path: str, device: torch.device | str, dtype: torch.dtype) -> HpsEmbedder:
        """The model of ``open_clip_config.json`` in ``path`` (else the built-in ViT-H-14) with ``path``'s weights."""
        open_clip = import_open_clip()
        check_local("hpsv2", path)
        folder = Path(os.path.expanduser(path))
        try:
            config_file = folder / HPS_CONFIG_FILE
            if config_file.is_file():
                config = json.loads(config_file.read_text(encoding="utf-8"))
                model_name = f"local-dir:{folder}"
            else:
                config = {"model_cfg": open_clip.get_model_config(HPS_MODEL), "preprocess_cfg": {}}
                model_name = HPS_MODEL
            state = load_hps_state_dict(_weights_file(path))
            model = open_clip.create_model(model_name, load_weights=False)
            model.load_state_dict(state)
            tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as err:
            raise load_error("hpsv2", path, err) from err
        image_size = config["model_cfg"]["vision_cfg"]["image_size"]
        if not isinstance(image_size, int):
            image_size = int(image_size[0])
        preprocess = config.get("preprocess_cfg", {})
        mean, std = preprocess.get("mean", CLIP_MEAN), preprocess.get("std", CLIP_STD)
        return cls(model.to(device=device, dtype=dtype), tokenizer, image_size, mean, std)

    @torch.no_grad()
    def image_embeds(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings ``(B, D)`` float32."""
        pixels = hps_pixels(images, self.image_size, self.mean, self.std).to(self.device, self.dtype)
        return nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings ``(B, D)`` float32."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)


class HpsReward:
    """``cos(E_image(x), E_text(prompt))`` of the HPSv2.1 open_clip model (the reference ``hpsv2.score``)."""

    name = "hpsv2"

    def __init__(self, embedder: HpsEmbedder) -> None:
        self.embedder = embedder

    def __call__(self, images: Tensor, prompts: Sequence[Any], metadata: Any = None) -> Tensor:
        texts, _ = batch_texts(images, prompts, metadata)
        image, text = self.embedder.image_embeds(images), self.embedder.text_embeds(texts)
        return (image * text).sum(-1).to(images.device)


def make_hps_reward(path: str, device: torch.device, dtype: torch.dtype) -> HpsReward:
    """``HpsReward`` with the model of ``path`` (a folder, or the hub id ``xswu/HPSv2``)."""
    return HpsReward(HpsEmbedder.load(path, device, dtype))


__all__ = [
    "HPS_HUB",
    "HPS_MODEL",
    "HPS_WEIGHT_FILES",
    "HpsEmbedder",
    "HpsReward",
    "hps_pixels",
    "import_open_clip",
    "load_hps_state_dict",
    "make_hps_reward",
]
