"""Tokenizers of the tiny pipelines, built locally (no hub access).

* CLIP: byte-level BPE with all 256 byte symbols (plain and ``</w>``-terminated) and ``<|startoftext|>`` /
  ``<|endoftext|>``; ``model_max_length`` 77 like the real CLIP tokenizers.
* T5: a unigram vocabulary of ASCII characters (with and without the ``▁`` word marker) plus ``<pad>`` (0),
  ``</s>`` (1), ``<unk>`` (2).
* Qwen (Qwen-Image's Qwen2.5-VL and FLUX.2-klein's Qwen3): byte-level BPE with all 256 byte symbols, merges that make
  every word of the chat / prompt templates a single token (so Qwen-Image's 34-token template prefix is exactly 34
  tokens, as the pipeline's ``prompt_template_encode_start_idx`` assumes), the Qwen special tokens (``<|im_start|>``,
  ``<|im_end|>``, ``<|endoftext|>``, vision tokens, ...) and a Qwen3-style chat template honouring
  ``enable_thinking=False``.
"""

from __future__ import annotations

import string


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode mapping used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_TO_UNICODE = _byte_to_unicode()
_BYTE_SYMBOLS = [_BYTE_TO_UNICODE[b] for b in range(256)]


def _to_byte_level(text: str) -> str:
    return "".join(_BYTE_TO_UNICODE[b] for b in text.encode("utf-8"))


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {symbol: i for i, symbol in enumerate(_BYTE_SYMBOLS)}
    for symbol in _BYTE_SYMBOLS:
        vocab[symbol + "</w>"] = len(vocab)
    # a couple of merges so that frequent words are single tokens (as in the real tokenizer)
    merges = [("a", "n"), ("an", "d</w>"), ("t", "h"), ("th", "e</w>")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for word in ("the", "a", "and", "of"):
        pieces.append(("▁" + word, -3.0))
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces.append(("▁" + char, -4.0))
        pieces.append((char, -5.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# Qwen-Image's template (pipeline_qwenimage.QwenImagePipeline.prompt_template_encode) and the chat-template words.
_QWEN_TEMPLATE_WORDS = (
    "system",
    "user",
    "assistant",
    "Describe",
    " the",
    " image",
    " by",
    " detailing",
    " color",
    " shape",
    " size",
    " texture",
    " quantity",
    " text",
    " spatial",
    " relationships",
    " of",
    " objects",
    " and",
    " background",
    "\n\n",
)
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN_EXTRA_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>")
# Qwen3's template, reduced to what the pipelines use (plain-text messages, generation prompt, thinking switch).
_QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def qwen_tokenizer():
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(_BYTE_SYMBOLS)}
    merges: list[tuple[str, str]] = []
    for word in _QWEN_TEMPLATE_WORDS:
        word = _to_byte_level(word)
        for i in range(1, len(word)):
            merge = (word[:i], word[i])
            if merge not in merges:
                merges.append(merge)
                vocab.setdefault(word[: i + 1], len(vocab))
    for token in QWEN_SPECIAL_TOKENS + _QWEN_EXTRA_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        errors="replace",
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in _QWEN_EXTRA_TOKENS])
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    return tokenizer
