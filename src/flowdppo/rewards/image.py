"""Rewards of text-to-image fine-tuning.

Images are ``(B, 3, H, W)`` in ``[0, 1]`` on any device (``Policy.decode``), prompts a list of ``B`` strings,
metadata a list of ``B`` dicts (or ``None``). Each reward returns ``(B,)`` float32 on the images' device, higher
is better. Model rewards see the images as ``uint8`` PIL images ``round(255 x)`` through the model's own image
processor (as the public reference implementations do), run under ``torch.no_grad()`` on the device / dtype they
were built with, and compute the final formula in float32.

Rewards (``IMAGE_REWARDS``; ``make_image_reward("name")`` or ``make_image_reward("name@path")``):

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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from flowdppo.errors import ConfigError, did_you_mean, shown
from flowdppo.rewards import Reward

IMAGE_REWARDS: tuple[str, ...] = (
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "clip_score",
    "pickscore",
    "aesthetic",
    "ocr",
    "vlm_yes_prob",
    "vlm_yes_prob_default_question",
    "vlm_ocr",
    "hpsv2",
)
DEFAULT_MODELS: dict[str, str] = {
    "clip_score": "openai/clip-vit-large-patch14",
    "pickscore": "yuvalkirstain/PickScore_v1",
    "aesthetic": "openai/clip-vit-large-patch14",
    "ocr": "microsoft/trocr-base-printed",
    "vlm_yes_prob": "Qwen/Qwen2.5-VL-7B-Instruct",
    "vlm_yes_prob_default_question": "Qwen/Qwen2.5-VL-7B-Instruct",
    "vlm_ocr": "Qwen/Qwen2.5-VL-7B-Instruct",
    "hpsv2": "xswu/HPSv2",
}
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


# Inputs


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


def _batch(images: Tensor, prompts: Sequence[Any], metadata: Any) -> tuple[list[str], list[dict[str, Any]]]:
    batch = images.shape[0]
    texts = [str(p) for p in (prompts.tolist() if isinstance(prompts, Tensor) else prompts)]
    metas = [{} for _ in range(batch)] if metadata is None else [m or {} for m in metadata]
    if len(texts) != batch or len(metas) != batch:
        raise ValueError(f"got {len(texts)} prompts and {len(metas)} metadata for {batch} images")
    return texts, metas


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


def _load_error(reward: str, path: str, err: BaseException) -> ConfigError:
    lines = str(err).strip().splitlines()
    detail = lines[0][:300] if lines else ""
    return ConfigError(f"reward {reward!r}: cannot load {path!r} ({type(err).__name__}: {detail})")


def _check_local(reward: str, path: str) -> None:
    looks_local = os.path.isabs(path) or path.startswith((".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"reward {reward!r}: {path!r} is not a directory (give a local directory or a hub id)")


def _load_processors(path: str) -> tuple[Any, Any]:
    """``(AutoImageProcessor, AutoTokenizer)`` of ``path``; a tokenizer without a vocabulary is an error."""
    from transformers import AutoImageProcessor, AutoTokenizer

    path = os.path.expanduser(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # transformers 5 builds an empty tokenizer from a directory without tokenizer files instead of failing.
    if tokenizer.vocab_size <= len(tokenizer.all_special_tokens):
        raise OSError(f"no tokenizer files in {path!r}")
    return image_processor, tokenizer


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

        _check_local(reward, path)
        try:
            model = AutoModel.from_pretrained(os.path.expanduser(path), use_safetensors=True)
        except Exception as err:
            raise _load_error(reward, path, err) from err
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ConfigError(f"reward {reward!r}: {path!r} holds a {type(model).__name__}, not a CLIP model")
        processor_paths = [path] + ([processor_fallback] if processor_fallback not in (None, path) else [])
        for i, processor_path in enumerate(processor_paths):
            try:
                image_processor, tokenizer = _load_processors(processor_path)
                break
            except Exception as err:
                if i == len(processor_paths) - 1:
                    raise _load_error(reward, processor_path, err) from err
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
        texts, _ = _batch(images, prompts, metadata)
        return cosine(self.clip.text_embeds(texts), self.clip.image_embeds(images)).to(images.device)


class PickScoreReward:
    """``exp(logit_scale) * cos(E_text(prompt), E_image(x)) / divisor`` (``divisor`` 26, as Flow-GRPO; 1: raw)."""

    name = "pickscore"

    def __init__(self, clip: ClipEmbedder, divisor: float = PICKSCORE_DIVISOR) -> None:
        self.clip = clip
        self.divisor = float(divisor)

    def __call__(self, images: Tensor, prompts: Sequence[Any], metadata: Any = None) -> Tensor:
        texts, _ = _batch(images, prompts, metadata)
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
    if path != DEFAULT_MODELS["aesthetic"]:
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
        _batch(images, prompts, metadata)
        embeds = nn.functional.normalize(self.clip.image_embeds(images), dim=-1)
        return self.head(embeds).float().to(images.device)



# Factory


def _make_aesthetic(path: str, device: torch.device, dtype: torch.dtype) -> Reward:
    _check_local("aesthetic", path)
    try:
        head = load_aesthetic_head(_aesthetic_head_file(path))
    except Exception as err:
        raise _load_error("aesthetic", path, err) from err
    return AestheticReward(ClipEmbedder.load("aesthetic", path, device, dtype), head)


_MODEL_REWARDS: dict[str, Callable[[str, torch.device, torch.dtype], Reward]] = {
    "clip_score": lambda path, device, dtype: ClipScoreReward(ClipEmbedder.load("clip_score", path, device, dtype)),
    "pickscore": lambda path, device, dtype: PickScoreReward(
        ClipEmbedder.load("pickscore", path, device, dtype, processor_fallback=PICKSCORE_PROCESSOR)
    ),
    "aesthetic": _make_aesthetic,
    "ocr": lambda path, device, dtype: _ocr_reward().load(path, device, dtype),
    "vlm_yes_prob": lambda path, device, dtype: _vlm_reward("vlm_yes_prob", path, device, dtype),
    "vlm_yes_prob_default_question": lambda path, device, dtype: _vlm_reward(
        "vlm_yes_prob_default_question", path, device, dtype
    ),
    "vlm_ocr": lambda path, device, dtype: _vlm_reward("vlm_ocr", path, device, dtype),
    "hpsv2": lambda path, device, dtype: _hps_reward(path, device, dtype),
}


def _ocr_reward():
    from flowdppo.rewards.ocr import OcrReward  # ocr.py builds on the helpers above

    return OcrReward


def _vlm_reward(name: str, path: str, device: torch.device, dtype: torch.dtype) -> Reward:
    from flowdppo.rewards.vlm import make_vlm_reward  # vlm.py builds on the helpers above

    return make_vlm_reward(name, path, device, dtype)


def _hps_reward(path: str, device: torch.device, dtype: torch.dtype) -> Reward:
    from flowdppo.rewards.hps import make_hps_reward  # hps.py builds on the helpers above; open_clip is optional

    return make_hps_reward(path, device, dtype)


def make_image_reward(spec: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Reward:
    """The reward ``spec`` = ``name`` or ``name@path`` (``name`` in ``IMAGE_REWARDS``; ``path`` a local directory or a
    hub id, ``DEFAULT_MODELS[name]`` without it), its model loaded once, on ``device`` in ``dtype``."""
    name, at, path = spec.strip().partition("@")
    name, path = name.strip(), path.strip()
    if name not in IMAGE_REWARDS:
        raise ConfigError(f"unknown image reward {shown(name)}{did_you_mean(name, IMAGE_REWARDS)}; choose one of "
                          f"{', '.join(IMAGE_REWARDS)} (or name@path)")
    if name.startswith("jpeg_"):
        if at:
            raise ConfigError(f"reward {name!r} has no model; drop '@{path}'")
        return JpegReward(incompressible=name == "jpeg_incompressibility")
    if at and not path:
        raise ConfigError(f"reward {name!r}: empty path after '@' (give a local directory or a hub id)")
    return _MODEL_REWARDS[name](path or DEFAULT_MODELS[name], torch.device(device), dtype)


__all__ = [
    "AESTHETIC_HEAD_FILES",
    "AESTHETIC_HEAD_HUB",
    "DEFAULT_MODELS",
    "IMAGE_REWARDS",
    "PICKSCORE_DIVISOR",
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
    "make_image_reward",
    "to_pil",
    "to_uint8",
]
