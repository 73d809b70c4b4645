"""VLM-judged rewards on a tiny random-weight Qwen2.5-VL saved with its processor and loaded back by path:
``vlm_yes_prob`` against the model's own forward on each (image, question), the mean over questions, the error for
prompts without questions, ``vlm_ocr`` against a greedy decode done here."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipelines import _qwen2_5_vl
from tiny_tokenizers import qwen_tokenizer

from flowdppo.cli import _one_line
from flowdppo.errors import ConfigError, RewardError
from flowdppo.rewards.ocr import levenshtein, normalize_text
from flowdppo.rewards.registry import make_reward
from flowdppo.rewards.vlm import DEFAULT_QUESTION, OCR_QUESTION, mean_per_image, single_token_id, yes_probability

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")

# Qwen2-VL's chat template, reduced to one user turn of images and texts and the generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PIXELS = 4 * 28 * 28  # every image becomes 2 x 2 merged patches: 4 image tokens


def chat(question: str) -> str:
    """The chat text written out by hand (what the template must render)."""
    return f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def _video_processor_stub():
    """transformers 5 builds a Qwen2.5-VL processor only with its video processor, which needs torchvision; where
    torchvision is missing (this CPU environment: no build of it matches torch 2.13 CPU), a stub stands in for it.
    Images never use the video processor."""
    if transformers.utils.is_torchvision_available():
        yield None
        return
    from transformers import processing_utils
    from transformers.models.auto import video_processing_auto
    from transformers.video_processing_utils import VideoProcessorMixin

    class StubVideoProcessor(VideoProcessorMixin):
        merge_size, temporal_patch_size = 2, 2

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(processing_utils.transformers_module, "VideoProcessorMixin", VideoProcessorMixin, raising=False)
        patch.setattr(
            video_processing_auto.AutoVideoProcessor,
            "from_pretrained",
            classmethod(lambda cls, *args, **kwargs: StubVideoProcessor()),
        )
        yield StubVideoProcessor


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, _video_processor_stub):
    """A tiny random Qwen2.5-VL, its byte-level BPE tokenizer (``Yes`` and ``No`` single tokens, as in Qwen's
    vocabulary), image processor and chat template, saved with save_pretrained."""
    directory = tmp_path_factory.mktemp("vlm") / "model"
    tokenizer = qwen_tokenizer()
    tokenizer.add_tokens(["Yes", "No"])
    image_processor_class = getattr(transformers, "Qwen2VLImageProcessorPil", transformers.Qwen2VLImageProcessor)
    image_processor = image_processor_class(min_pixels=PIXELS, max_pixels=PIXELS)
    video_processor = (_video_processor_stub or transformers.Qwen2VLVideoProcessor)()
    processor = transformers.Qwen2_5_VLProcessor(
        image_processor, tokenizer, video_processor=video_processor, chat_template=CHAT_TEMPLATE
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _qwen2_5_vl(tokenizer, 32)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 20, 24, generator=torch.Generator().manual_seed(seed))


def _pil(images: torch.Tensor) -> list[Image.Image]:
    arrays = np.clip(np.round(images.numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8)
    return [Image.fromarray(a.transpose(1, 2, 0)) for a in arrays]


def _load(directory):
    processor = transformers.AutoProcessor.from_pretrained(directory)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(directory).eval()
    return processor, model


# ---------------------------------------------------------------------------------------------------------------
# pure functions


def test_yes_probability_is_the_softmax_renormalised_over_yes_and_no():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    p = logits.softmax(-1)
    torch.testing.assert_close(yes_probability(logits, 3, 7), p[:, 3] / (p[:, 3] + p[:, 7]), rtol=0, atol=1e-6)
    values, owners = torch.tensor([0.2, 0.4, 1.0, 0.3, 0.5, 0.7]), torch.tensor([0, 0, 1, 2, 2, 2])
    torch.testing.assert_close(mean_per_image(values, owners, 3), torch.tensor([0.3, 1.0, 0.5]))
    with pytest.raises(ConfigError, match="'Yes' into 3 tokens"):
        single_token_id(qwen_tokenizer(), "Yes")  # byte-level without a merge for it


# ---------------------------------------------------------------------------------------------------------------
# vlm_yes_prob

PROMPTS = ["a red cat", "a dark night", "three apples"]
QUESTIONS = [["Is there a cat?", "Is the cat red?"], "Is it dark?", ["Are there apples?", "Are there three?", "Red?"]]


def _expected_yes_prob(directory, images: torch.Tensor, questions: list[list[str]]) -> torch.Tensor:
    """Each (image, question) on its own, unpadded: the softmax of the last position's logits, P(Yes) / (P(Yes) +
    P(No)); the mean over each image's questions."""
    processor, model = _load(directory)
    yes, no = processor.tokenizer.convert_tokens_to_ids("Yes"), processor.tokenizer.convert_tokens_to_ids("No")
    means = []
    for image, qs in zip(_pil(images), questions, strict=True):
        probs = []
        for question in qs:
            inputs = processor(text=[chat(question)], images=[image], return_tensors="pt")
            with torch.no_grad():
                p = model(**inputs).logits[0, -1].double().softmax(-1)
            probs.append(float(p[yes] / (p[yes] + p[no])))
        means.append(sum(probs) / len(probs))
    return torch.tensor(means, dtype=torch.float32)


def test_vlm_yes_prob_is_the_mean_two_token_probability_over_the_prompt_questions(vlm_dir):
    reward = make_reward(f"vlm_yes_prob@{vlm_dir}", "cpu")
    images = _images()
    metadata = [{"questions": q} for q in QUESTIONS]
    scores = reward(images, PROMPTS, metadata)

    questions = [[q] if isinstance(q, str) else q for q in QUESTIONS]
    expected = _expected_yes_prob(vlm_dir, images, questions)
    assert reward.name == "vlm_yes_prob" and scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=0, atol=2e-6)

    per_question = reward(images[[0, 0]], PROMPTS[:1] * 2, [{"questions": [q]} for q in questions[0]])
    assert (per_question[0] - per_question[1]).abs() > 1e-4  # the answer depends on the question
    torch.testing.assert_close(per_question.mean(), scores[0], rtol=0, atol=2e-6)
    reward.batch_size = 2  # 6 (image, question) pairs in 3 padded batches
    torch.testing.assert_close(reward(images, PROMPTS, metadata), scores, rtol=0, atol=2e-6)


def test_prompts_without_questions_are_a_one_line_error_unless_the_default_question_is_asked(vlm_dir):
    images = _images(2, seed=1)
    reward = make_reward(f"vlm_yes_prob@{vlm_dir}", "cpu")
    for metadata in ([{"questions": ["Is it red?"]}, {}], None, [{"questions": []}, {"questions": []}]):
        with pytest.raises(RewardError, match="has no 'questions'") as info:
            reward(images, PROMPTS[:2], metadata)
        message = _one_line(info.value)  # what `flowdppo train` prints before exiting with code 2
        assert "vlm_yes_prob" in message and "\n" not in message and "vlm_yes_prob_default_question" in message
    with pytest.raises(RewardError, match="list of non-empty strings"):
        reward(images, PROMPTS[:2], [{"questions": [1, 2]}, {"questions": ["ok"]}])

    default = make_reward(f"vlm_yes_prob_default_question@{vlm_dir}", "cpu")
    assert default.name == "vlm_yes_prob_default_question"
    asked = [{"questions": [DEFAULT_QUESTION.format(prompt=p)]} for p in PROMPTS[:2]]
    mixed = [{}, {"questions": ["Is it dark?"]}]  # the prompt's own questions still come first
    scores = default(images, PROMPTS[:2], mixed)  # padded with other rows than below: equal to float rounding
    torch.testing.assert_close(scores[0], reward(images, PROMPTS[:2], asked)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(scores[1], reward(images, PROMPTS[:2], [asked[0], mixed[1]])[1], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# vlm_ocr

OCR_PROMPTS = ['a sign that says "Hello"', "a shop called 'abcd'", "a blank wall"]
OCR_METADATA = [{}, {}, {"text": "xyz"}]


def test_vlm_ocr_scores_the_greedy_reading_by_edit_distance(vlm_dir):
    reward = make_reward(f"vlm_ocr@{vlm_dir}", "cpu")
    reward.max_new_tokens = 6
    images = _images(seed=2)
    scores = reward(images, OCR_PROMPTS, OCR_METADATA)

    # The same reading done here: the chat written out, left-padded, greedy generate, the new tokens decoded.
    processor, model = _load(vlm_dir)
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=[chat(OCR_QUESTION)] * 3, images=_pil(images), padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False, num_beams=1)
    read = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reward.read(images) == read and any(read)
    targets = ["hello", "abcd", "xyz"]
    expected = [1 - min(1, levenshtein(normalize_text(r), t) / len(t)) for r, t in zip(read, targets, strict=True)]
    assert reward.name == "vlm_ocr" and scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=0)


def test_vlm_ocr_with_a_known_reading(vlm_dir, monkeypatch):
    """generate replaced by one that appends the token ids of known texts: the slicing, decode and score are exact."""
    reward = make_reward(f"vlm_ocr@{vlm_dir}", "cpu")
    tokenizer = reward.vlm.processor.tokenizer
    tokenizer.padding_side = "right"
    answers = tokenizer(["HEL LO<|im_end|>", "abxd<|im_end|>", "<|im_end|>"], padding=True, return_tensors="pt")
    tokenizer.padding_side = "left"
    monkeypatch.setattr(
        reward.vlm.model, "generate", lambda **kwargs: torch.cat([kwargs["input_ids"], answers["input_ids"]], 1)
    )
    scores = reward(_images(seed=3), OCR_PROMPTS, OCR_METADATA)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.75, 0.0]), rtol=0, atol=0)
    with pytest.raises(RewardError, match="^reward 'vlm_ocr': prompt 'a blank wall' has no quoted text"):
        reward(_images(seed=3), OCR_PROMPTS, [{}, {}, {}])


# ---------------------------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("name", ["vlm_yes_prob", "vlm_yes_prob_default_question", "vlm_ocr"])
def test_a_folder_that_does_not_load_is_a_one_line_config_error(name, tmp_path):
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(ConfigError) as info:
            make_reward(f"{name}@{folder}", "cpu")
        message = str(info.value)
        assert f"reward {name!r}" in message and str(folder) in message and "\n" not in message


# ---------------------------------------------------------------------------------------------------------------
# HPSv2.1 (open_clip)

TINY_OPEN_CLIP = {  # ViT-H-14's layout at toy width: embed 8, vision 1 layer width 16, text 1 layer width 16
    "embed_dim": 8,
    "vision_cfg": {"image_size": 28, "layers": 1, "width": 16, "head_width": 8, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
HPS_MEAN, HPS_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not CLIP's, so that the folder's preprocess_cfg is used


def test_hpsv2_without_open_clip_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` raises ImportError
    with pytest.raises(ConfigError) as info:
        make_reward(f"hpsv2@{tmp_path}", "cpu")
    message = _one_line(info.value)
    assert message.startswith("reward 'hpsv2' needs open_clip") and "pip install 'flowdppo[hps]'" in message


def _hps_reference_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's evaluation transform written with torchvision: ToTensor, the longer side resized to ``size`` (bicubic,
    on the tensor), zero-padded to a centred square, Normalize."""
    functional = pytest.importorskip("torchvision.transforms.functional")
    out = []
    for image in _pil(images):
        x = functional.to_tensor(image)
        height, width = x.shape[1:]
        scale = size / max(height, width)
        new = (round(height * scale), round(width * scale))
        x = functional.resize(x, list(new), functional.InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = size - new[0], size - new[1]
        x = functional.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        out.append(functional.normalize(x, HPS_MEAN, HPS_STD))
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(20, 24), (40, 30), (28, 28)])  # up-scaled, down-scaled, as is
def test_hps_pixels_match_the_reference_transform(shape):
    from flowdppo.rewards.hps import hps_pixels

    images = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(5))
    expected = _hps_reference_pixels(images, 28)
    torch.testing.assert_close(hps_pixels(images, 28, HPS_MEAN, HPS_STD), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "HPS_v2.1_compressed.pt"])
def test_hpsv2_is_the_cosine_of_the_open_clip_embeddings(tmp_path, weights):
    open_clip = pytest.importorskip("open_clip")
    directory = tmp_path / "hps"
    directory.mkdir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.model.CLIP(**TINY_OPEN_CLIP).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(directory / weights))
    else:  # the released checkpoint's layout: {"state_dict": ...} with DDP's "module." prefixes
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, directory / weights)
    config = {"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": {"mean": list(HPS_MEAN), "std": list(HPS_STD)}}
    (directory / "open_clip_config.json").write_text(json.dumps(config))

    reward = make_reward(f"hpsv2@{directory}", "cpu")
    images = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(6))
    scores = reward(images, PROMPTS, [{}] * 3)

    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=77)(PROMPTS)
    with torch.no_grad():  # the reference: diag(image_features @ text_features.T) of the normalised features
        image_features, text_features, logit_scale = model(_hps_reference_pixels(images, 28), tokens)
    expected = torch.diagonal(image_features @ text_features.T)
    assert reward.name == "hpsv2" and scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert (reward(images, ["x", "y", "z"], None) - scores).abs().max() > 1e-4  # the score depends on the prompt


def test_train_with_prompts_without_questions_exits_2_with_one_line(vlm_dir, tmp_path, capsys):
    """`flowdppo train` with vlm_yes_prob on a .jsonl prompts file whose second prompt has no questions."""
    from tiny_pipelines import save_tiny_pipeline

    from flowdppo.cli import main

    model = save_tiny_pipeline("sd3", tmp_path / "sd3")
    prompts = tmp_path / "prompts.jsonl"
    records = [{"prompt": "a red cat", "questions": ["Is there a cat?"]}, {"prompt": "a dog"}] * 2
    prompts.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    capsys.readouterr()  # the saving's progress bars
    code = main(
        [
            "train",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "task=text_to_image",
            f"model={model}",
            f"prompts={prompts}",
            "eval_prompts=0",
            "resolution=32",
            "epochs=1",
            "prompts_per_epoch=4",
            "group_size=2",
            "optim.minibatch_size=4",
            "sampler.num_steps=2",
            "sampler.window_range=[0,1]",
            f"reward.names=[vlm_yes_prob@{vlm_dir}]",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("flowdppo: error: reward 'vlm_yes_prob': prompt 'a dog' has no 'questions'")
