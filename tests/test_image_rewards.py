"""Image rewards: JPEG sizes against PIL, CLIP score / PickScore / aesthetic / OCR against independent computations
with tiny random models saved to a directory and loaded back by path, and the factory's errors."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from flowdppo.errors import ConfigError, RewardError
from flowdppo.rewards import Reward
from flowdppo.rewards.image import AestheticHead
from flowdppo.rewards.ocr import levenshtein, ocr_score, ocr_target
from flowdppo.rewards.registry import make_reward, reward_names

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")


def _byte_chars() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2's public mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = dict(zip(printable, printable, strict=True)) | {b: 256 + i for i, b in enumerate(others)}
    return [chr(table[b]) for b in range(256)]


def _write_bpe(directory, vocab: dict[str, int]) -> tuple[str, str]:
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n")  # no merges: one token per byte (per byte + "</w>" for CLIP)
    return str(vocab_file), str(merges_file)


def _pil_class(name: str):
    # transformers 5 without torchvision warns and falls back to the PIL processor; ask for it directly.
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


def _images(batch: int = 3, height: int = 20, width: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _pil_images(images: torch.Tensor) -> list[Image.Image]:
    arrays = np.clip(np.round(images.numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8)
    return [Image.fromarray(a.transpose(1, 2, 0)) for a in arrays]


# ---------------------------------------------------------------------------------------------------------------
# JPEG


def _jpeg_kb(image: torch.Tensor) -> float:
    buffer = io.BytesIO()
    _pil_images(image[None])[0].save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_jpeg_rewards_rank_flat_gradient_noise_and_match_pil():
    size = 64
    flat = torch.full((3, size, size), 0.4)
    ramp = torch.linspace(0, 1, size)
    gradient = torch.stack(
        [ramp[None, :].expand(size, size), ramp[:, None].expand(size, size), 0.5 * ramp[None, :].expand(size, size)]
    )
    noise = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    images = torch.stack([flat, gradient, noise])
    prompts, metadata = ["a"] * 3, [{}] * 3

    compress = make_reward("jpeg_compressibility", "cpu")
    incompress = make_reward("jpeg_incompressibility", "cpu")
    assert isinstance(compress, Reward) and compress.name == "jpeg_compressibility"
    assert incompress.name == "jpeg_incompressibility"
    up, down = incompress(images, prompts, metadata), compress(images, prompts, metadata)

    assert up.dtype == torch.float32 and up.shape == (3,)
    assert up[0] < up[1] < up[2]
    assert down[0] > down[1] > down[2]
    expected = torch.tensor([_jpeg_kb(image) for image in images], dtype=torch.float32)
    torch.testing.assert_close(up, expected, rtol=0, atol=0)
    torch.testing.assert_close(down, -expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# CLIP score, PickScore, aesthetic


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel, its byte-level BPE tokenizer and image processor, saved with save_pretrained."""
    directory = tmp_path_factory.mktemp("clip")
    chars = _byte_chars()
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = transformers.CLIPTokenizer(*_write_bpe(directory, vocab))
    image_processor = _pil_class("CLIPImageProcessor")(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    text = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    model.save_pretrained(directory / "model")
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
        directory / "model"
    )
    return directory / "model"


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _clip_embeds(directory, images, prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text embeds, image embeds, logit_scale) computed here: processor + model from the directory."""
    processor = transformers.AutoProcessor.from_pretrained(directory)
    model = transformers.CLIPModel.from_pretrained(directory).eval()
    pixels = processor.image_processor(images=_pil_images(images), return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = _features(model.get_image_features(pixel_values=pixels))
        text = _features(
            model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        )
    return text, image, model.logit_scale.detach()


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


PROMPTS = ["a photo of a cat", "a red car on a road", 'a sign that says "hello"']


def test_clip_score_is_the_cosine_of_the_clip_embeddings(clip_dir):
    reward = make_reward(f"clip_score@{clip_dir}", "cpu")
    images = _images()
    scores = reward(images, PROMPTS, [{}] * 3)

    text, image, _ = _clip_embeds(clip_dir, images, PROMPTS)
    assert reward.name == "clip_score" and scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, _cos(text, image), rtol=0, atol=1e-5)
    other = reward(images, ["a bowl of soup", "two dogs", "a tall tree"], [{}] * 3)
    assert (other - scores).abs().max() > 1e-4  # the score depends on the prompt

    double = make_reward(f"clip_score@{clip_dir}", "cpu", dtype=torch.float64)
    assert next(double.clip.model.parameters()).dtype == torch.float64
    out = double(images, PROMPTS, None)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, scores, rtol=0, atol=1e-5)


def test_pickscore_is_the_scaled_cosine_divided_by_26(clip_dir):
    reward = make_reward(f"pickscore@{clip_dir}", "cpu")
    images = _images(seed=1)
    scores = reward(images, PROMPTS, [{}] * 3)

    text, image, logit_scale = _clip_embeds(clip_dir, images, PROMPTS)
    assert reward.name == "pickscore" and scores.shape == (3,)
    torch.testing.assert_close(scores, logit_scale.exp() * _cos(text, image) / 26, rtol=0, atol=1e-5)
    assert (reward(images, ["x", "y", "z"], [{}] * 3) - scores).abs().max() > 1e-4


@pytest.mark.parametrize("head_file", ["aesthetic_head.safetensors", "aesthetic_head.pth"])
def test_aesthetic_is_the_laion_mlp_on_normalised_image_embeddings(clip_dir, tmp_path, head_file):
    directory = tmp_path / "aesthetic"
    shutil.copytree(clip_dir, directory)
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in AestheticHead(in_features=8).state_dict().items()}
    if head_file.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(directory / head_file))
    else:
        torch.save(state, directory / head_file)

    reward = make_reward(f"aesthetic@{directory}", "cpu")
    images = _images(seed=2)
    scores = reward(images, PROMPTS, [{}] * 3)

    _, image, _ = _clip_embeds(clip_dir, images, PROMPTS)
    x = image / image.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):  # linear layers; dropout is the identity at evaluation
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert reward.name == "aesthetic" and scores.shape == (3,)
    torch.testing.assert_close(scores, x.squeeze(-1), rtol=0, atol=1e-5)


def test_aesthetic_head_must_exist_and_fit_the_clip_model(clip_dir, tmp_path):
    with pytest.raises(ConfigError, match="'aesthetic'.*no head file"):
        make_reward(f"aesthetic@{clip_dir}", "cpu")
    directory = tmp_path / "wide"
    shutil.copytree(clip_dir, directory)
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in AestheticHead(12).state_dict().items()},
        str(directory / "aesthetic_head.safetensors"),
    )
    with pytest.raises(ConfigError, match="12-d"):
        make_reward(f"aesthetic@{directory}", "cpu")


# ---------------------------------------------------------------------------------------------------------------
# OCR


def test_ocr_score_on_strings():
    assert ocr_score("abcd", "abcd") == 1.0
    assert ocr_score("", "abcd") == 0.0
    assert ocr_score("abxd", "abcd") == 0.75
    assert ocr_score("  A b\tCD\n", "abcd") == 1.0  # lower-cased, whitespace removed on both sides
    assert ocr_score("a much longer reading", "ab") == 0.0  # clipped at 0
    assert ocr_score("", "") == 1.0 and ocr_score("x", "") == 0.0
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0


def test_ocr_target_takes_the_first_quoted_span_or_the_metadata_text():
    assert ocr_target('a neon sign that reads "Open Late" at night') == "Open Late"
    assert ocr_target("a poster with 'SALE' and \"not this\"") == "SALE"
    assert ocr_target("the cat's sign says 'hi'") == "hi"  # an apostrophe inside a word is not a quote
    assert ocr_target('a sign "hello"', {"text": "override"}) == "override"
    assert ocr_target('a sign "hello"', {}) == "hello"
    with pytest.raises(RewardError, match="no quoted text"):
        ocr_target("a sign with nothing quoted")


@pytest.fixture(scope="module")
def ocr_dir(tmp_path_factory):
    """A tiny random VisionEncoderDecoderModel (ViT encoder, TrOCR decoder), a RoBERTa byte-level BPE tokenizer and a
    ViT image processor, saved as the separate files of a TrOCR checkpoint."""
    directory = tmp_path_factory.mktemp("ocr")
    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", *_byte_chars()])}
    tokenizer = transformers.RobertaTokenizer(*_write_bpe(directory, vocab))
    image_processor = _pil_class("ViTImageProcessor")(size={"height": 16, "width": 16})
    encoder = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8
    )
    decoder = transformers.TrOCRConfig(
        vocab_size=len(vocab),
        d_model=16,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 1, 2
    torch.manual_seed(0)
    transformers.VisionEncoderDecoderModel(config).save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    image_processor.save_pretrained(directory / "model")
    return directory / "model"


OCR_PROMPTS = ['a sign that says "Hello"', "a shop called 'abcd'", "a blank wall"]
OCR_METADATA = [{}, {}, {"text": "xyz"}]


def test_ocr_reward_scores_what_the_model_reads(ocr_dir):
    reward = make_reward(f"ocr@{ocr_dir}", "cpu")
    images = _images(seed=3)
    scores = reward(images, OCR_PROMPTS, OCR_METADATA)
    assert reward.name == "ocr" and scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()

    # The same reading done here: processor, greedy generate, decode; then 1 - distance / length.
    model = transformers.VisionEncoderDecoderModel.from_pretrained(ocr_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ocr_dir)
    pixels = transformers.AutoImageProcessor.from_pretrained(ocr_dir)(images=_pil_images(images), return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        ids = model.generate(pixel_values=pixels, max_new_tokens=reward.max_new_tokens, do_sample=False, num_beams=1)
    read = tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert reward.read(images) == read
    expected = [
        1.0 - min(1.0, levenshtein("".join(r.lower().split()), t) / max(1, len(t)))
        for r, t in zip(read, ["hello", "abcd", "xyz"], strict=True)
    ]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=0, atol=0)


def test_ocr_reward_with_a_known_reading(ocr_dir, monkeypatch):
    """generate replaced by one that returns the token ids of known texts: the decode and the score are exact."""
    reward = make_reward(f"ocr@{ocr_dir}", "cpu")
    texts = ["HEL LO", "abxd", ""]
    ids = reward.tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]  # with <s>, </s>, <pad>
    monkeypatch.setattr(reward.model, "generate", lambda **kwargs: torch.cat([torch.full((3, 1), 2), ids], 1))
    scores = reward(_images(seed=4), OCR_PROMPTS, OCR_METADATA)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.75, 0.0]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 prompts"):
        reward(_images(seed=4), OCR_PROMPTS[:2], OCR_METADATA[:2])


# ---------------------------------------------------------------------------------------------------------------
# Factory errors


def test_unknown_reward_names_the_choices():
    with pytest.raises(ConfigError, match="unknown reward 'sharpness'") as info:
        make_reward("sharpness", "cpu")
    assert all(name in str(info.value) for name in reward_names(("image",)))
    with pytest.raises(ConfigError, match="'jpeg_compressibility' has no model"):
        make_reward("jpeg_compressibility@somewhere", "cpu")
    with pytest.raises(ConfigError, match="'clip_score': empty path"):
        make_reward("clip_score@", "cpu")


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "aesthetic", "ocr"])
def test_a_path_that_does_not_load_is_a_one_line_config_error(name, tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError) as info:
        make_reward(f"{name}@{missing}", "cpu")
    assert f"reward {name!r}" in str(info.value) and str(missing) in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as info:
        make_reward(f"{name}@{empty}", "cpu")
    message = str(info.value)
    assert f"reward {name!r}" in message and str(empty) in message and "\n" not in message
