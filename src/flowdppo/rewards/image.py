"""Rewards of text-to-image fine-tuning.

Images are ``(B, 3, H, W)`` in ``[0, 1]`` on any device (``Policy.decode``), prompts a list of ``B`` strings,
metadata a list of ``B`` dicts (or ``None``). Each reward returns ``(B,)`` float32 on the images' device, higher
is better. Model rewards see the images as ``uint8`` PIL images ``round(255 x)`` through the model's own image
processor (as the public reference implementations do), run under ``torch.no_grad()`` on the device / dtype they
were built with, and compute the final formula in float32.

Rewards (registered in ``rewards.registry``: ``make_reward("name")`` or ``make_reward("name@path")``):

- ``jpeg_compressibility``:   ``-size_kB``, minus the JPEG size (PIL, quality 95, as DDPO) of the image in kB;
- ``jpeg_incompressibility``: ``+size_kB``; ``size_kB = len(jpeg bytes) / 1000``;
- ``clip_score``: ``cos(E_text(prompt), E_image(x))``, the raw cosine similarity of CLIP's projected
  embeddings, in ``[-1, 1]`` (not multiplied by 100, not clipped at 0);
- ``pickscore``:  ``exp(logit_scale) * cos(E_text, E_image) / 26``, PickScore as the Flow-GRPO recipes scale it
  (the unscaled PickScore is 26 times this; ``exp(logit_scale)`` is about 100, so typically about ``[0, 1]``);
- ``aesthetic``:  ``MLP(e / |e|)``, the LAION aesthetic predictor v2 head on the L2-normalised CLIP ViT-L/14
  image embedding ``e``, about ``[1, 10]``;
- ``ocr``: 1 - the normalised edit distance of the text a model reads to the target text (``rewards.ocr``);
- ``vlm_yes_prob`` / ``vlm_yes_prob_default_question`` / ``vlm_ocr``: a chat VLM's ``P(Yes)`` (over Yes / No) to the
  prompt's questions, or its reading scored as ``ocr`` (``rewards.vlm``);
- ``hpsv2``: HPSv2.1, ``cos(E_image, E_text)`` of an open_clip ViT-H-14 (``rewards.hps``, needs open_clip).

Default models (``path`` of ``name@path``: a local directory or a hub id):

- ``clip_score``: ``openai/clip-vit-large-patch14``;
- ``pickscore``:  ``yuvalkirstain/PickScore_v1``; the processor (image processor + tokenizer) comes from ``path``
  when it has one, else from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``;
- ``aesthetic``:  CLIP ``openai/clip-vit-large-patch14`` and the head ``aesthetic-model.pth`` of the hub repository
  ``trl-lib/ddpo-aesthetic-predictor``. ``aesthetic@DIR`` reads both from ``DIR``: the CLIP model and processor files
  (``save_pretrained``) and one head file among ``AESTHETIC_HEAD_FILES`` (``aesthetic_head.safetensors`` first; a
  ``.pth`` state dict is read with ``torch.load(weights_only=True)``), keys ``layers.{0,2,4,6,7}.{weight,bias}``;
- ``ocr``: ``microsoft/trocr-base-printed`` (see ``rewards.ocr`` for the models it takes);
- ``vlm_*``: ``Qwen/Qwen2.5-VL-7B-Instruct``; ``hpsv2``: ``HPS_v2.1_compressed.pt`` of ``xswu/HPSv2``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from flowdppo.errors import ConfigError
from flowdppo.rewards.common import batch_texts, check_local, load_error, load_processors, to_pil, to_uint8

CLIP_L14 = "openai/clip-vit-large-patch14"  # clip_score's and aesthetic's default model
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_DIVISOR = 26.0
AESTHETIC_HEAD_HUB = ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")
AESTHETIC_HEAD_FILES = (
    "aesthetic_head.safetensors",
    "aesthetic_head.pth",
    "sac+logos+ava1-l14-linearMSE.pth",
    "aesthetic-model.pth",
)
JPEG_QUALITY = 95


# JPEG


def jpeg_sizes_kb(images: Tensor, quality: int = JPEG_QUALITY) -> Tensor:
    """``len(JPEG(to_uint8(x), quality)) / 1000`` per image: ``(B,)`` float32 on the images' device."""
    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegReward:
    """``-size_kB`` (name ``jpeg_compressibility``) or ``+size_kB`` (``incompressible=True``,
    name ``jpeg_incompressibility``) with ``size_kB = jpeg_sizes_kb(x)``."""

    def __init__(self, incompressible: bool = False) -> None:
        self.sign = 1.0 if incompressible else -1.0
        self.name = "jpeg_incompressibility" if incompressible else "jpeg_compressibility"

    def __call__(self, images: Tensor, prompts: Sequence[Any], metadata: Any = None) -> Tensor:
        return self.sign * jpeg_sizes_kb(images)


# Loading


def _features(output: Any) -> Tensor:
    # transformers < 5 returns the projected embeddings; 5 returns an output whose pooler_output holds them.
    return output if isinstance(output, Tensor) else output.pooler_output


class ClipEmbedder:
    """A CLIP-like model (``get_image_features`` / ``get_text_features``) with its image processor and tokenizer."""

    def __init__(self, model: nn.Module, image_processor: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        text_config = getattr(model.config, "text_config", None)
        self.max_length = int(getattr(text_config, "max_position_embeddings", 77))

    @classmethod
    def load(
        cls,
        reward: str,
        path: str,
        device: torch.device | str,
        dtype: torch.dtype,
        processor_fallback: str | None = None,
    ) -> ClipEmbedder:
        """Model from ``path``; processor from ``path``, else from ``processor_fallback`` (when given)."""
        from transformers import AutoModel

        check_local(reward, path)
        try:
            model = AutoModel.from_pretrained(os.path.expanduser(path), use_safetensors=True)
        except Exception as err:
            raise load_error(reward, path, err) from err
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ConfigError(f"reward {reward!r}: {path!r} holds a {type(model).__name__}, not a CLIP model")
        processor_paths = [path] + ([processor_fallback] if processor_fallback not in (None, path) else [])
        for i, processor_path in enumerate(processor_paths):
            try:
                image_processor, tokenizer = load_processors(processor_path)
                break
            except Exception as err:
                if i == len(processor_paths) - 1:
                    raise load_error(reward, processor_path, err) from err
        return cls(model.to(device=device, dtype=dtype), image_processor, tokenizer)

    @torch.no_grad()
    def image_embeds(self, images: Tensor) -> Tensor:
        """Projected image embeddings ``(B, D)`` float32 (not normalised) of images ``(B, 3, H, W)`` in ``[0, 1]``."""
        pixels = self.image_processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        return _features(self.model.get_image_features(pixel_values=pixels)).float()

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """Projected text embeddings ``(B, D)`` float32 (not normalised); prompts truncated to the model's length."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _features(self.model.get_text_features(**tokens)).float()


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise ``<a, b> / (|a| |b|)`` of ``(B, D)`` tensors -> ``(B,)``."""
    return (nn.functional.normalize(a, dim=-1) * nn.functional.normalize(b, dim=-1)).sum(-1)


# CLIP score, PickScore


class ClipScoreReward:
    """``cos(E_text(prompt), E_image(x))`` of CLIP's projected embeddings, in ``[-1, 1]`` (no x100, no clipping)."""

    name = "clip_score"

    def __init__(self, clip: ClipEmbedder) -> None:
        self.clip = clip

    def __call__(self, images: Tensor, prompts: Sequence[Any], metadata: Any = None) -> Tensor:
        texts, _ = batch_texts(images, prompts, metadata)
        return cosine(self.clip.text_embeds(texts), self.clip.image_embeds(images)).to(images.device)


class PickScoreReward:
    """``exp(logit_scale) * cos(E_text(prompt), E_image(x)) / divisor`` (``divisor`` 26, as Flow-GRPO; 1: raw)."""

    name = "pickscore"

    def __init__(self, clip: ClipEmbedder, divisor: float = PICKSCORE_DIVISOR) -> None:
        self.clip = clip
        self.divisor = float(divisor)

    def __call__(self, images: Tensor, prompts: Sequence[Any], metadata: Any = None) -> Tensor:
        texts, _ = batch_texts(images, prompts, metadata)
        scale = self.clip.model.logit_scale.detach().float().exp()
        cos = cosine(self.clip.text_embeds(texts), self.clip.image_embeds(images))
        return (scale * cos / self.divisor).to(images.device)


# LAION aesthetic predictor v2


class AestheticHead(nn.Module):
    """LAION aesthetic predictor v2: ``Linear(D,1024)-Dropout(0.2)-Linear(1024,128)-Dropout(0.2)-Linear(128,64)
    -Dropout(0.1)-Linear(64,16)-Linear(16,1)`` on L2-normalised CLIP image embeddings (``D`` = 768 for ViT-L/14)."""

    def __init__(self, in_features: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        """``(B, D)`` normalised embeddings -> ``(B,)`` scores."""
        return self.layers(embeds).squeeze(-1)


def load_aesthetic_head(file: str) -> AestheticHead:
    """An ``AestheticHead`` (float32, eval) from a ``.safetensors`` file or a ``.pth`` state dict (weights only)."""
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "layers.0.weight" not in state:
        raise ValueError(f"{os.path.basename(file)} has no 'layers.0.weight'; keys: {sorted(state)[:8]}")
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    head.load_state_dict(state)
    return head.float().eval()


def _aesthetic_head_file(path: str) -> str:
    if os.path.isdir(os.path.expanduser(path)):
        for name in AESTHETIC_HEAD_FILES:
            file = os.path.join(os.path.expanduser(path), name)
            if os.path.isfile(file):
                return file
        raise FileNotFoundError(f"no head file in the directory (one of {', '.join(AESTHETIC_HEAD_FILES)})")
    if path != CLIP_L14:
        raise FileNotFoundError("a hub id other than the default CLIP has no known head; give a local directory")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(*AESTHETIC_HEAD_HUB)


class AestheticReward:
    """``head(e / |e|)`` with ``e`` the CLIP image embedding; the head runs in float32."""

    name = "aesthetic"

    def __init__(self, clip: ClipEmbedder, head: AestheticHead) -> None:
        width = getattr(clip.model.config, "projection_dim", None)
        if head.layers[0].in_features != width:
            raise ConfigError(
                f"reward 'aesthetic': the head takes {head.layers[0].in_features}-d embeddings, "
                f"the CLIP model makes {width}-d ones"
            )
        self.clip = clip
        self.head = head.to(clip.device).float().eval()

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[Any], metadata: Any = None) -> Tensor:
        batch_texts(images, prompts, metadata)
        embeds = nn.functional.normalize(self.clip.image_embeds(images), dim=-1)
        return self.head(embeds).float().to(images.device)


def load_aesthetic_reward(path: str, device: torch.device | str, dtype: torch.dtype) -> AestheticReward:
    """``AestheticReward`` with the CLIP model and head of ``path`` (a directory, or the default CLIP's hub id)."""
    check_local("aesthetic", path)
    try:
        head = load_aesthetic_head(_aesthetic_head_file(path))
    except Exception as err:
        raise load_error("aesthetic", path, err) from err
    return AestheticReward(ClipEmbedder.load("aesthetic", path, device, dtype), head)


__all__ = [
    "AESTHETIC_HEAD_FILES",
    "AESTHETIC_HEAD_HUB",
    "CLIP_L14",
    "PICKSCORE_DIVISOR",
    "PICKSCORE_MODEL",
    "PICKSCORE_PROCESSOR",
    "AestheticHead",
    "AestheticReward",
    "ClipEmbedder",
    "ClipScoreReward",
    "JpegReward",
    "PickScoreReward",
    "cosine",
    "jpeg_sizes_kb",
    "load_aesthetic_head",
    "load_aesthetic_reward",
    "to_pil",
    "to_uint8",
]
