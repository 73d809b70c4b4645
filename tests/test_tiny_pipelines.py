"""The tiny pipelines of tests/tiny_pipelines.py save, load back through DiffusionPipeline and generate end to end."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_pipelines import FAMILIES, build_tiny_pipeline, save_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red 'cat'", "two dogs"]
HEIGHT, WIDTH = 64, 96  # non-square on purpose: catches swapped H / W in latent packing

PIPELINE_CLASSES = {
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "flux2_klein": "Flux2KleinPipeline",
    "qwen_image": "QwenImagePipeline",
}
CALL_KWARGS = {
    "sd3": {"guidance_scale": 4.5},  # real CFG (negative prompt "") like SD3.5
    "flux": {"guidance_scale": 3.5, "true_cfg_scale": 1.0},  # embedded guidance only
    "flux2_klein": {"guidance_scale": 4.0},  # klein-base: real CFG with the "" negative prompt
    "qwen_image": {"true_cfg_scale": 1.0},  # true CFG off (no negative prompt), no guidance embedding
}


def _encode(pipe, family: str, prompts: list[str]) -> list[torch.Tensor]:
    """The per-prompt conditioning tensors of ``encode_prompt`` (sequence embeddings first, then pooled ones)."""
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False
        )
        assert embeds.shape == (2, 77 + 256, pipe.transformer.config.joint_attention_dim)  # CLIP 77 + T5 256 tokens
        assert pooled.shape == (2, pipe.transformer.config.pooled_projection_dim)
        return [embeds, pooled]
    if family == "flux":
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None)
        assert embeds.shape == (2, 512, pipe.transformer.config.joint_attention_dim)  # T5, max_sequence_length 512
        assert pooled.shape == (2, pipe.transformer.config.pooled_projection_dim)  # CLIP pooler_output
        assert text_ids.shape == (512, 3) and not text_ids.any()
        return [embeds, pooled]
    if family == "flux2_klein":
        embeds, text_ids = pipe.encode_prompt(prompt=prompts)  # Qwen3 layers (9, 18, 27) stacked on channels
        assert embeds.shape == (2, 512, pipe.transformer.config.joint_attention_dim)
        assert text_ids.shape == (2, 512, 4)
        assert torch.equal(text_ids[0, :, 3], torch.arange(512))  # (T, H, W, L) coordinates, L = token index
        return [embeds]
    embeds, mask = pipe.encode_prompt(prompt=prompts)
    # the 34-token system prefix is dropped: what is left is the prompt + "<|im_end|>\n<|im_start|>assistant\n"
    lengths = [len(pipe.tokenizer(p).input_ids) + 5 for p in prompts]
    assert embeds.shape == (2, max(lengths), pipe.transformer.config.joint_attention_dim)
    assert mask is not None and mask.sum(dim=1).tolist() == lengths
    return [embeds]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_saves_loads_and_generates(family, tmp_path):
    from diffusers import DiffusionPipeline

    directory = save_tiny_pipeline(family, tmp_path / family, seed=0)
    assert directory == tmp_path / family
    model_index = json.loads((directory / "model_index.json").read_text())
    assert model_index["_class_name"] == PIPELINE_CLASSES[family]
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert size < 8 * 2**20

    pipe = DiffusionPipeline.from_pretrained(directory)
    assert type(pipe).__name__ == PIPELINE_CLASSES[family]
    pipe.set_progress_bar_config(disable=True)
    if family == "flux2_klein":  # the latent batch-norm statistics are non-trivial and survive the round trip
        assert not torch.allclose(pipe.vae.bn.running_var, torch.ones_like(pipe.vae.bn.running_var))

    with torch.no_grad():
        conditioning = _encode(pipe, family, PROMPTS)
    for tensor in conditioning:
        assert torch.isfinite(tensor).all()
        assert not torch.allclose(tensor[0], tensor[1]), "different prompts must give different embeddings"

    images = pipe(
        prompt=PROMPTS,
        num_inference_steps=2,
        height=HEIGHT,
        width=WIDTH,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **CALL_KWARGS[family],
    ).images
    assert images.shape == (2, 3, HEIGHT, WIDTH)
    assert torch.isfinite(images).all()
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_tokenizers_round_trip_and_tokenize(tmp_path):
    from diffusers import DiffusionPipeline

    directory = save_tiny_pipeline("sd3", tmp_path / "sd3")
    pipe = DiffusionPipeline.from_pretrained(directory)
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert tokenizer.model_max_length == 77
        ids = tokenizer(PROMPTS[0]).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        # CLIP's decoder turns every end-of-word marker into a space ("a red ' cat '"), as the real one does
        assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == PROMPTS[0].replace(" ", "")
    t5_ids = pipe.tokenizer_3(PROMPTS[0]).input_ids
    assert pipe.tokenizer_3.unk_token_id not in t5_ids and t5_ids[-1] == pipe.tokenizer_3.eos_token_id

    qwen = build_tiny_pipeline("qwen_image")
    prefix = qwen.prompt_template_encode.split("{}")[0]
    assert len(qwen.tokenizer(prefix).input_ids) == qwen.prompt_template_encode_start_idx == 34

    klein = build_tiny_pipeline("flux2_klein")
    text = klein.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[1]}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == f"<|im_start|>user\n{PROMPTS[1]}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    tokens = klein.tokenizer.convert_ids_to_tokens(klein.tokenizer(text).input_ids)
    assert tokens[:3] == ["<|im_start|>", "user", "Ċ"] and "<think>" in tokens and "</think>" in tokens


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, value in module.state_dict().items()
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic_given_seed(family):
    first = _weights(build_tiny_pipeline(family, seed=0))
    again = _weights(build_tiny_pipeline(family, seed=0))
    other = _weights(build_tiny_pipeline(family, seed=1))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["transformer.proj_out.weight"], other["transformer.proj_out.weight"])
