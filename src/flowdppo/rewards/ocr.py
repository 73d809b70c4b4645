"""OCR reward: ``1 - min(1, lev(norm(read), norm(target)) / max(1, len(norm(target))))`` in ``[0, 1]``.

``read`` is the text an image-to-text model reads (greedy), ``target`` the text the prompt asks for
(``ocr_target``: the metadata's ``text``, else the prompt's first quoted span) and
``norm(s) = "".join(s.lower().split())`` (lower-cased, all whitespace removed).

Models: any checkpoint whose image processor alone makes the inputs of ``generate``
(``AutoModelForImageTextToText``, e.g. ``VisionEncoderDecoderModel`` such as TrOCR, the default
``microsoft/trocr-base-printed``); its directory holds the model, the image processor and the tokenizer.
Chat models that need a text prompt do not work.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flowdppo.errors import RewardError
from flowdppo.rewards.common import batch_texts, check_local, load_error, load_processors, to_pil

# A first quoted span: "..." or '...'; a single quote opens a span only when no letter or digit precedes it and
# closes it only when none follows, so the apostrophes of "cat's" or "don't" are not quotes.
_QUOTED = re.compile(r"\"([^\"]*)\"|(?<!\w)'([^']*)'(?!\w)")


def ocr_target(prompt: str, metadata: dict[str, Any] | None = None) -> str:
    """The text an image should show: ``metadata["text"]`` if present, else the first quoted span of ``prompt``."""
    if metadata and "text" in metadata:
        return str(metadata["text"])
    match = _QUOTED.search(prompt)
    if match is None:
        raise RewardError(
            f"reward 'ocr': prompt {prompt!r} has no quoted text (\"...\" or '...') and its metadata no 'text'"
        )
    return match.group(1) if match.group(1) is not None else match.group(2)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    # A two-row dynamic programme: ten lines, no extra dependency for one small function.
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def normalize_text(text: str) -> str:
    """``"".join(text.lower().split())``: lower-cased, every whitespace character removed."""
    return "".join(text.lower().split())


def ocr_score(read: str, target: str) -> float:
    """``1 - min(1, lev(norm(read), norm(target)) / max(1, len(norm(target))))`` in ``[0, 1]``."""
    read, target = normalize_text(read), normalize_text(target)
    return 1.0 - min(1.0, levenshtein(read, target) / max(1, len(target)))


class OcrReward:
    """``ocr_score(read(x), ocr_target(prompt, metadata))``: ``read`` greedy-decodes at most ``max_new_tokens``."""

    name = "ocr"

    def __init__(self, model: nn.Module, image_processor: Any, tokenizer: Any, max_new_tokens: int = 32) -> None:
        self.model = model.eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def load(cls, path: str, device: torch.device | str, dtype: torch.dtype, max_new_tokens: int = 32) -> OcrReward:
        """Model (``AutoModelForImageTextToText``, else ``AutoModelForVision2Seq``), image processor, tokenizer."""
        import transformers

        check_local("ocr", path)
        auto_classes = [
            getattr(transformers, n, None) for n in ("AutoModelForImageTextToText", "AutoModelForVision2Seq")
        ]
        auto_classes = [c for c in auto_classes if c is not None]
        try:
            image_processor, tokenizer = load_processors(path)
            for i, auto in enumerate(auto_classes):
                try:
                    model = auto.from_pretrained(os.path.expanduser(path), use_safetensors=True)
                    break
                except ValueError:  # an architecture this auto class does not map
                    if i == len(auto_classes) - 1:
                        raise
        except Exception as err:
            raise load_error("ocr", path, err) from err
        return cls(model.to(device=device, dtype=dtype), image_processor, tokenizer, max_new_tokens)

    @torch.no_grad()
    def read(self, images: Tensor) -> list[str]:
        """The text the model reads in each image (greedy ``generate``, special tokens skipped)."""
        inputs = self.image_processor(images=to_pil(images), return_tensors="pt")
        inputs = {
            k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
            for k, v in inputs.items()
            if isinstance(v, Tensor)
        }
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        if "input_ids" in inputs and not self.model.config.is_encoder_decoder:
            ids = ids[:, inputs["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def __call__(self, images: Tensor, prompts: Sequence[Any], metadata: Any = None) -> Tensor:
        texts, metas = batch_texts(images, prompts, metadata)
        targets = [ocr_target(prompt, meta) for prompt, meta in zip(texts, metas, strict=True)]
        scores = [ocr_score(read, target) for read, target in zip(self.read(images), targets, strict=True)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


__all__ = ["OcrReward", "levenshtein", "normalize_text", "ocr_score", "ocr_target"]
