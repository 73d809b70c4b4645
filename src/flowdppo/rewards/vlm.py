"""Rewards judged by a chat vision-language model (an image-text-to-text model such as Qwen2.5-VL-Instruct).

The model sees one user turn, the image then a text, built with the processor's chat template and followed by the
assistant's generation prompt; batches are left-padded, so the next token of every row comes right after
``<|im_start|>assistant\\n`` (for Qwen).

- ``vlm_yes_prob``: ``mean_q P(Yes | x, q)`` over the questions ``q`` of the image's prompt, with
  ``P(Yes | x, q) = p_Yes / (p_Yes + p_No) = sigmoid(z_Yes - z_No)``: the softmax of the next-token logits ``z``
  renormalised over the two answer tokens ``"Yes"`` and ``"No"``, in ``[0, 1]``. (VQAScore takes ``p_Yes`` over the
  whole vocabulary; DSG and TIFA ask such yes/no questions and average the answers.) The questions are the
  prompt's metadata ``questions`` (a list of strings, or one string; from a ``.jsonl`` prompts file); a prompt
  without them is an error.
- ``vlm_yes_prob_default_question``: the same, but a prompt without questions gets
  ``DEFAULT_QUESTION.format(prompt=prompt)``: ``Does this image show "{prompt}"? Answer Yes or No.``.
- ``vlm_ocr``: ``ocr_score(read, ocr_target(prompt, metadata))`` (``rewards.ocr``: 1 - the normalised edit distance),
  ``read`` the model's greedy answer (at most ``max_new_tokens`` tokens) to ``OCR_QUESTION``.

Loading: ``AutoProcessor`` (with a chat template) and ``AutoModelForImageTextToText`` from a local directory or a hub
id (default ``Qwen/Qwen2.5-VL-7B-Instruct``). Processors of video-capable models (Qwen2-VL, Qwen2.5-VL) need
torchvision under transformers 5.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from flowdppo.errors import ConfigError, RewardError
from flowdppo.rewards.common import batch_texts, check_local, load_error, to_pil
from flowdppo.rewards.ocr import ocr_score, ocr_target

QUESTIONS_KEY = "questions"
DEFAULT_QUESTION = 'Does this image show "{prompt}"? Answer Yes or No.'
OCR_QUESTION = "Read the text in this image. Answer with the text only."
YES, NO = "Yes", "No"
VLM_BATCH_SIZE = 8
OCR_MAX_NEW_TOKENS = 64
OCR_ERROR_PREFIX = "reward 'ocr': "


# Questions


def prompt_questions(reward: str, prompt: str, metadata: dict[str, Any], default_question: bool) -> list[str]:
    """The yes/no questions about an image of ``prompt``: ``metadata["questions"]`` (a string or a list of strings),
    else ``[DEFAULT_QUESTION.format(prompt=prompt)]`` when ``default_question``, else a ``RewardError``."""
    questions = metadata.get(QUESTIONS_KEY)
    if isinstance(questions, str):
        questions = [questions]
    if questions is None or questions == []:
        if default_question:
            return [DEFAULT_QUESTION.format(prompt=prompt)]
        raise RewardError(
            f"reward {reward!r}: prompt {prompt!r} has no {QUESTIONS_KEY!r} (give each prompt of the .jsonl prompts "
            f"file a list of yes/no questions, or use vlm_yes_prob_default_question to ask "
            f"{DEFAULT_QUESTION.format(prompt='<prompt>')!r})"
        )
    if not isinstance(questions, list) or not all(isinstance(q, str) and q.strip() for q in questions):
        raise RewardError(
            f"reward {reward!r}: {QUESTIONS_KEY!r} of prompt {prompt!r} must be a list of non-empty "
            f"strings, got {questions!r}"
        )
    return questions


def yes_probability(logits: Tensor, yes_id: int, no_id: int) -> Tensor:
    """``p_Yes / (p_Yes + p_No) = sigmoid(z_Yes - z_No)`` of next-token logits ``z`` ``(N, V)`` -> ``(N,)`` float32."""
    logits = logits.float()
    return torch.sigmoid(logits[:, yes_id] - logits[:, no_id])


def mean_per_image(values: Tensor, owners: Tensor, num_images: int) -> Tensor:
    """``out[i] = mean(values[owners == i])``: the mean over each image's questions ``(N,) -> (num_images,)``."""
    sums = torch.zeros(num_images, dtype=values.dtype, device=values.device).index_add_(0, owners, values)
    counts = torch.bincount(owners, minlength=num_images).to(values)
    return sums / counts


# The model


def single_token_id(tokenizer: Any, word: str) -> int:
    """The id of ``word`` as the tokenizer encodes it (no special tokens); it must be one token."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"the tokenizer splits {word!r} into {len(ids)} tokens; the yes/no reward needs one token")
    return int(ids[0])


def _torchvision_hint() -> str:
    return "" if importlib.util.find_spec("torchvision") else "; its processor may need torchvision (not installed)"


class ChatVlm:
    """A chat image-text-to-text model and its processor: one user turn ``[image, text]`` per image."""

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"  # every row's next token comes right after its prompt
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def load(cls, reward: str, path: str, device: torch.device | str, dtype: torch.dtype) -> ChatVlm:
        """``AutoProcessor`` and ``AutoModelForImageTextToText`` (safetensors) of ``path`` on ``device``, ``dtype``."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        check_local(reward, path)
        local = os.path.expanduser(path)
        try:
            processor = AutoProcessor.from_pretrained(local)
        except Exception as err:
            error = load_error(reward, path, err)
            raise ConfigError(f"{error}{_torchvision_hint()}") from err
        if not getattr(processor, "chat_template", None) or not hasattr(processor, "tokenizer"):
            raise ConfigError(f"reward {reward!r}: the processor of {path!r} has no chat template or no tokenizer")
        try:
            model = AutoModelForImageTextToText.from_pretrained(local, use_safetensors=True)
        except Exception as err:
            raise load_error(reward, path, err) from err
        return cls(model.to(device=device, dtype=dtype), processor)

    def inputs(self, images: Sequence[Image.Image], texts: Sequence[str]) -> dict[str, Tensor]:
        """The processor's model inputs of the chats ``user: [image, text]`` + generation prompt, left-padded."""
        chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}] for t in texts]
        prompts = self.processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
        batch = self.processor(text=prompts, images=list(images), padding=True, return_tensors="pt")
        return {
            k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
            for k, v in batch.items()
            if isinstance(v, Tensor)
        }

    @torch.no_grad()
    def next_token_logits(self, images: Sequence[Image.Image], texts: Sequence[str]) -> Tensor:
        """The logits ``(N, V)`` float32 of the first answer token, one row per ``(image, text)``."""
        return self.model(**self.inputs(images, texts), logits_to_keep=1).logits[:, -1].float()

    @torch.no_grad()
    def answer(self, images: Sequence[Image.Image], texts: Sequence[str], max_new_tokens: int) -> list[str]:
        """The greedy answers (at most ``max_new_tokens`` tokens, special tokens skipped) to ``texts``."""
        inputs = self.inputs(images, texts)
        ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        return self.processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _chunks(count: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, count, size)]


# Rewards


class VlmYesProbReward:
    """``mean_q sigmoid(z_Yes - z_No)`` over the questions of each image's prompt (see the module docstring)."""

    def __init__(self, vlm: ChatVlm, default_question: bool = False, batch_size: int = VLM_BATCH_SIZE) -> None:
        self.vlm = vlm
        self.default_question = default_question
        self.batch_size = batch_size
        self.name = "vlm_yes_prob_default_question" if default_question else "vlm_yes_prob"
        tokenizer = vlm.processor.tokenizer
        try:
            self.yes_id, self.no_id = single_token_id(tokenizer, YES), single_token_id(tokenizer, NO)
        except ConfigError as err:
            raise ConfigError(f"reward {self.name!r}: {err}") from err

    def __call__(self, images: Tensor, prompts: Sequence[Any], metadata: Any = None) -> Tensor:
        texts, metas = batch_texts(images, prompts, metadata)
        questions = [
            prompt_questions(self.name, prompt, meta, self.default_question)
            for prompt, meta in zip(texts, metas, strict=True)
        ]
        pairs = [(i, q) for i, qs in enumerate(questions) for q in qs]
        pil = to_pil(images)
        probs = []
        for rows in _chunks(len(pairs), self.batch_size):
            chunk = pairs[rows]
            logits = self.vlm.next_token_logits([pil[i] for i, _ in chunk], [q for _, q in chunk])
            probs.append(yes_probability(logits, self.yes_id, self.no_id))
        owners = torch.tensor([i for i, _ in pairs], device=probs[0].device)
        return mean_per_image(torch.cat(probs), owners, len(texts)).to(images.device)


class VlmOcrReward:
    """``ocr_score(read(x), ocr_target(prompt, metadata))``, ``read`` the greedy answer to ``OCR_QUESTION``."""

    name = "vlm_ocr"

    def __init__(self, vlm: ChatVlm, max_new_tokens: int = OCR_MAX_NEW_TOKENS, batch_size: int = VLM_BATCH_SIZE):
        self.vlm = vlm
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def read(self, images: Tensor) -> list[str]:
        """The text the model reads in each image."""
        pil = to_pil(images)
        return [
            text
            for rows in _chunks(len(pil), self.batch_size)
            for text in self.vlm.answer(pil[rows], [OCR_QUESTION] * len(pil[rows]), self.max_new_tokens)
        ]

    def __call__(self, images: Tensor, prompts: Sequence[Any], metadata: Any = None) -> Tensor:
        texts, metas = batch_texts(images, prompts, metadata)
        try:
            targets = [ocr_target(prompt, meta) for prompt, meta in zip(texts, metas, strict=True)]
        except RewardError as err:  # the message names the 'ocr' reward
            raise RewardError(f"reward {self.name!r}: {str(err).removeprefix(OCR_ERROR_PREFIX)}") from err
        scores = [ocr_score(read, target) for read, target in zip(self.read(images), targets, strict=True)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


def make_vlm_reward(name: str, path: str, device: torch.device, dtype: torch.dtype) -> VlmYesProbReward | VlmOcrReward:
    """``vlm_yes_prob``, ``vlm_yes_prob_default_question`` or ``vlm_ocr`` with the model of ``path``."""
    vlm = ChatVlm.load(name, path, device, dtype)
    if name == "vlm_ocr":
        return VlmOcrReward(vlm)
    return VlmYesProbReward(vlm, default_question=name == "vlm_yes_prob_default_question")


__all__ = [
    "DEFAULT_QUESTION",
    "OCR_QUESTION",
    "QUESTIONS_KEY",
    "ChatVlm",
    "VlmOcrReward",
    "VlmYesProbReward",
    "make_vlm_reward",
    "mean_per_image",
    "prompt_questions",
    "single_token_id",
    "yes_probability",
]
