"""``flowdppo plan`` on the three recipes of examples/, with config-only pipeline folders of the real model sizes.

The recipes name hub models (SD3.5-Medium, FLUX.1-dev, Qwen-Image) that cannot be downloaded here. ``flowdppo plan``
builds every module on the meta device from its ``config.json`` alone, so a folder with ``model_index.json``, each
component's config (the scheduler's too) and tokenizer files plans exactly like the real model. This script writes
those folders with the published configs (sources in the comments next to each value), runs the plan of each recipe
as written (resolution, precision, LoRA rank, minibatch_size, guidance), prints it, and writes
``benchmarks/results/plan_recipes.json``.

Tokenizers are built locally (``tests/tiny_tokenizers.py``; no hub access). What matters for the activations is the
text sequence length the pipeline produces, which is the real one:

* SD3.5: CLIP pads to its ``model_max_length`` 77 and T5 to ``max_sequence_length`` 256: 77 + 256 = 333 tokens;
* FLUX.1: T5 pads to ``max_sequence_length`` 512 (the pipeline default): 512 tokens;
* Qwen-Image: the template's 34-token prefix is dropped, leaving the prompt's tokens plus the 5-token suffix
  (``<|im_end|>``, ``\\n``, ``<|im_start|>``, ``assistant``, ``\\n``), at most 512. The real Qwen2 byte-level BPE
  vocabulary (151,643 entries) cannot be downloaded; the local tokenizer gets one merge chain per word of the recipe's
  prompt file (a word with its leading space is one token, digits one token each, as Qwen2's pre-tokenizer splits
  them). This matches the real tokenizer on common lowercase English words; rarer or upper-case words (the OCR
  prompts' quoted text) the real BPE may split into 2-3 tokens, so the real text length can be a few tokens longer
  (about 1% of the 1024 + ~25 tokens the transformer sees at 512 px).

The model configs keep the real vocabulary sizes (49,408 CLIP, 32,128 T5, 152,064 Qwen2.5-VL): the parameter
counts are the real ones, whatever the local tokenizers' vocabularies.

    python benchmarks/plan_recipes.py                 # temporary folders, all three recipes
    python benchmarks/plan_recipes.py --models DIR    # keep the config-only folders in DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tiny_tokenizers: the local tokenizers of the test pipelines

import torch  # noqa: E402
from common import RESULTS_DIR, write_result  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from gpu_throughput import SD3_VAE, SD35_MEDIUM  # noqa: E402
from tiny_tokenizers import _to_byte_level, clip_tokenizer, qwen_tokenizer, t5_tokenizer  # noqa: E402

from flowdppo.config import load_config, task_options  # noqa: E402
from flowdppo.plan import GIB, GPU_SIZES_GB, estimate, fitting_option, format_plan, make_plan  # noqa: E402

RECIPES = {
    "sd35_medium": ("examples/sd35_pickscore_flowdppo.yaml", "stable-diffusion-3.5-medium"),
    "flux1_dev": ("examples/flux_pickscore_clip_flowdppo.yaml", "FLUX.1-dev"),
    "qwen_image": ("examples/qwen_image_ocr_lora_flowdppo.yaml", "Qwen-Image"),
}

# ---- published configs ---------------------------------------------------------------------------------------------
# SD35_MEDIUM (stable-diffusion-3.5-medium transformer/config.json) and SD3_VAE (its vae/config.json layout: 128/256/
# 512/512 channels, 2 layers per block, 16 latent channels, no quant convs, scaling 1.5305 / shift 0.0609) come from
# benchmarks/gpu_throughput.py; the counts they give (2.243 B, 83.8 M) are the published sizes.
#
# Not established exactly here (no hub access; none changes a parameter count or a tensor shape of training):
# the hub files' bookkeeping fields (_name_or_path, torch_dtype, dropout, initializer ranges); CLIP-G's pad/bos/eos
# token ids (taken from CLIP-L); the FLUX.1-dev vae/config.json file itself (its values are reconstructed from BFL's
# autoencoder parameters); the scheduler configs (taken from tests/tiny_pipelines.py, they do not enter the plan);
# the Qwen2 tokenizer's exact split of the prompt (see the module docstring).
# CLIP ViT-L/14 text tower: openai/clip-vit-large-patch14 config.json "text_config", as in
# stabilityai/stable-diffusion-3.5-medium text_encoder/config.json (CLIPTextModelWithProjection) and
# black-forest-labs/FLUX.1-dev text_encoder/config.json (CLIPTextModel). The layer sizes and activation also appear in
# Stability AI's SD3.5 reference code (github.com/Stability-AI/sd3.5 sd3_infer.py, CLIPL_CONFIG).
CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# OpenCLIP ViT-bigG/14 text tower as CLIPTextModelWithProjection: stable-diffusion-3.5-medium text_encoder_2/config.json
# (the SDXL text_encoder_2 config); sizes as in sd3_infer.py CLIPG_CONFIG (gelu, 1280, 5120, 20 heads, 32 layers).
# projection_dim 1280 (text_projection 1280 x 1280, no bias) is the published value; pad_token_id 1 is taken from the
# CLIP-L config (it does not change the parameter count).
CLIP_G = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# T5 v1.1 XXL encoder: google/t5-v1_1-xxl config.json, as in stable-diffusion-3.5-medium text_encoder_3/config.json and
# FLUX.1-dev text_encoder_2/config.json (T5EncoderModel); sizes also in sd3_infer.py T5_CONFIG.
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
    "is_encoder_decoder": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
# FLUX.1-dev transformer/config.json (quoted in several public repos, e.g. an Ascend FLUX.1-dev inference README
# and GGUF loaders of FLUX.1-dev derivatives): 19 double-stream + 38 single-stream blocks, 24 heads x 128.
FLUX1_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# FLUX.1 autoencoder (FLUX.1-dev vae/config.json): the SD3 VAE layout (128/256/512/512, 2 layers per block,
# 16 latent channels, no quant convs) with FLUX.1's scaling / shift factors (also in BFL's "ae" params:
# ch 128, ch_mult [1, 2, 4, 4], num_res_blocks 2, z_channels 16, scale 0.3611, shift 0.1159).
FLUX1_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
# Qwen-Image transformer/config.json (diffusers 0.34.0.dev0), as quoted by public Qwen-Image loaders.
QWEN_IMAGE = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
# Qwen-Image vae/config.json (AutoencoderKLQwenImage, the Wan 2.1 VAE layout with its 16-channel statistics).
QWEN_IMAGE_VAE = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": [
        -0.7571,
        -0.7089,
        -0.9113,
        0.1075,
        -0.1745,
        0.9653,
        -0.1517,
        1.5508,
        0.4134,
        -0.0715,
        0.5517,
        -0.3632,
        -0.1922,
        -0.9497,
        0.2503,
        -0.2921,
    ],
    "latents_std": [
        2.8184,
        1.4541,
        2.3275,
        2.6558,
        1.2196,
        1.7708,
        2.6052,
        2.0743,
        3.2687,
        2.1526,
        2.8652,
        1.5579,
        1.6382,
        1.1253,
        2.8251,
        1.916,
    ],
}
# Qwen-Image text_encoder/config.json: Qwen2.5-VL-7B-Instruct (Qwen2_5_VLForConditionalGeneration, lm_head untied).
# Text: 28 layers, 3584 wide, 28 heads / 4 KV heads, MLP 18944, vocab 152064 (Qwen/Qwen2.5-VL-7B-Instruct config.json;
# the same fields are checked against Qwen-Image-Edit's text_encoder/config.json by public loaders). Vision: 32
# blocks, 1280 wide, 16 heads, MLP 3420, merger to 3584, full attention in blocks 7/15/23/31.
QWEN25_VL_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 28,
    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
QWEN25_VL_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "hidden_act": "silu",
}
QWEN25_VL_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
# Scheduler configs (they do not change the memory): SD3.5's static shift 3.0; FLUX.1-dev's and Qwen-Image's dynamic
# shifting, as tests/tiny_pipelines.py has them.
SD35_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX1_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
QWEN_IMAGE_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}


# ---- writing a config-only folder ----------------------------------------------------------------------------------
def diffusers_config(folder: Path, class_name: str, config: dict) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"_class_name": class_name, "_diffusers_version": __import__("diffusers").__version__, **config}
    (folder / "config.json").write_text(json.dumps(payload, indent=2) + "\n")
    return "diffusers", class_name


def transformers_config(folder: Path, config) -> tuple[str, str]:
    config.save_pretrained(folder)
    return "transformers", config.architectures[0]


def scheduler(folder: Path, config: dict) -> tuple[str, str]:
    FlowMatchEulerDiscreteScheduler(**config).save_pretrained(folder)
    return "diffusers", "FlowMatchEulerDiscreteScheduler"


def tokenizer(folder: Path, tok) -> tuple[str, str]:
    tok.save_pretrained(folder)
    return "transformers", type(tok).__name__


def clip_config(values: dict, cls: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**values, architectures=[cls])


def t5_config():
    from transformers import T5Config

    return T5Config(**T5_XXL, architectures=["T5EncoderModel"])


def write_index(folder: Path, pipeline: str, components: dict[str, tuple[str, str]]) -> Path:
    index = {"_class_name": pipeline, "_diffusers_version": __import__("diffusers").__version__}
    index.update({name: list(spec) for name, spec in sorted(components.items())})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def write_sd35_medium(folder: Path) -> Path:
    return write_index(
        folder,
        "StableDiffusion3Pipeline",
        {
            "transformer": diffusers_config(folder / "transformer", "SD3Transformer2DModel", SD35_MEDIUM),
            "vae": diffusers_config(folder / "vae", "AutoencoderKL", SD3_VAE),
            "scheduler": scheduler(folder / "scheduler", SD35_SCHEDULER),
            "text_encoder": transformers_config(
                folder / "text_encoder", clip_config(CLIP_L, "CLIPTextModelWithProjection")
            ),
            "text_encoder_2": transformers_config(
                folder / "text_encoder_2", clip_config(CLIP_G, "CLIPTextModelWithProjection")
            ),
            "text_encoder_3": transformers_config(folder / "text_encoder_3", t5_config()),
            "tokenizer": tokenizer(folder / "tokenizer", clip_tokenizer()),
            "tokenizer_2": tokenizer(folder / "tokenizer_2", clip_tokenizer()),
            "tokenizer_3": tokenizer(folder / "tokenizer_3", t5_tokenizer()),
        },
    )


def write_flux1_dev(folder: Path) -> Path:
    return write_index(
        folder,
        "FluxPipeline",
        {
            "transformer": diffusers_config(folder / "transformer", "FluxTransformer2DModel", FLUX1_DEV),
            "vae": diffusers_config(folder / "vae", "AutoencoderKL", FLUX1_VAE),
            "scheduler": scheduler(folder / "scheduler", FLUX1_SCHEDULER),
            "text_encoder": transformers_config(folder / "text_encoder", clip_config(CLIP_L, "CLIPTextModel")),
            "text_encoder_2": transformers_config(folder / "text_encoder_2", t5_config()),
            "tokenizer": tokenizer(folder / "tokenizer", clip_tokenizer()),
            "tokenizer_2": tokenizer(folder / "tokenizer_2", t5_tokenizer()),
        },
    )


QWEN_PRETOKEN = re.compile(r"[^\r\n\w]?[^\W\d_]+| ?[^\s\w]+[\r\n]*|\d|\s+")  # Qwen2's split, ASCII approximation


def qwen_prompt_tokenizer(prompts: list[str]):
    """The local Qwen tokenizer plus one merge chain per pre-token of ``prompts`` (each becomes one token)."""
    base = qwen_tokenizer()
    with tempfile.TemporaryDirectory(prefix="qwen_tok_") as tmp:
        return _grown_qwen_tokenizer(base, Path(tmp), prompts)


def _grown_qwen_tokenizer(base, folder: Path, prompts: list[str]):
    from transformers import Qwen2Tokenizer

    base.save_pretrained(folder)
    state = json.loads((folder / "tokenizer.json").read_text())
    vocab = state["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    known = set(merges)
    for prompt in prompts:
        for piece in QWEN_PRETOKEN.findall(prompt):
            word = _to_byte_level(piece)
            for i in range(1, len(word)):
                merge = (word[:i], word[i])
                if merge not in known:
                    known.add(merge)
                    merges.append(merge)
                if word[: i + 1] not in vocab:
                    vocab[word[: i + 1]] = max(vocab.values()) + 1
    specials = [t["content"] for t in state.get("added_tokens", [])]
    shift = {}
    for token in specials:  # keep the added tokens after the grown vocabulary
        vocab.pop(token, None)
    for token in specials:
        shift[token] = vocab[token] = max(vocab.values()) + 1
    for added in state.get("added_tokens", []):
        added["id"] = shift[added["content"]]
    state["model"]["vocab"] = vocab
    state["model"]["merges"] = [list(m) for m in merges]
    (folder / "tokenizer.json").write_text(json.dumps(state))
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    tok = Qwen2Tokenizer.from_pretrained(folder)
    tok.chat_template = base.chat_template
    return tok


def write_qwen_image(folder: Path, prompts: list[str]) -> Path:
    from transformers import Qwen2_5_VLConfig

    tok = qwen_prompt_tokenizer(prompts)
    text = Qwen2_5_VLConfig(
        text_config=QWEN25_VL_TEXT,
        vision_config=QWEN25_VL_VISION,
        tie_word_embeddings=False,
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        **QWEN25_VL_IDS,
    )
    return write_index(
        folder,
        "QwenImagePipeline",
        {
            "transformer": diffusers_config(folder / "transformer", "QwenImageTransformer2DModel", QWEN_IMAGE),
            "vae": diffusers_config(folder / "vae", "AutoencoderKLQwenImage", QWEN_IMAGE_VAE),
            "scheduler": scheduler(folder / "scheduler", QWEN_IMAGE_SCHEDULER),
            "text_encoder": transformers_config(folder / "text_encoder", text),
            "tokenizer": tokenizer(folder / "tokenizer", tok),
        },
    )


# ---- the plans -----------------------------------------------------------------------------------------------------
def recipe_prompts(config_file: str) -> list[str]:
    from flowdppo.prompts import load_prompts

    cfg = load_config(config_file=config_file)
    prompts = task_options(cfg).prompts
    return [r["prompt"] for r in load_prompts(prompts)] if prompts else []


def text_tokens(cfg, prompt: str) -> int:
    """The text sequence length the recipe's pipeline produces for ``prompt`` (its own encoding, on the meta
    device, as the plan runs it)."""
    from flowdppo.plan import DTYPES
    from flowdppo.plan_meta import meta_policy, prompt_embeddings

    embeds = prompt_embeddings(meta_policy(cfg, DTYPES[cfg.precision]), 1, prompt)
    return embeds["prompt_embeds"].shape[1]


def summarise(cfg, config_file: str, hub_id: str, plan, tokens: int, seconds: float) -> dict:
    recipe = plan.recipe
    without = estimate(plan, replace(recipe, gradient_checkpointing=False))
    with_ = estimate(plan, replace(recipe, gradient_checkpointing=True))
    components = {
        c.name: {"class": c.class_name, "params": c.params, "text_encoder": c.text_encoder} for c in plan.components
    }

    def parts(e) -> dict:
        return {
            "weights_gib": e.weights / GIB,
            "trainable_state_gib": e.trainable_state / GIB,
            "copies_gib": e.copies / GIB,
            "activations_gib": e.activations / GIB,
            "offloaded_encoders_gib": e.encoding / GIB,
            "peak_gib": e.total / GIB,
        }

    return {
        "recipe": config_file,
        "model": hub_id,
        "pipeline": plan.family,
        "resolution": task_options(cfg).resolution,
        "text_tokens": tokens,
        "precision": recipe.precision,
        "lora_rank": recipe.lora_rank,
        "minibatch_size": recipe.minibatch_size,
        "rows_per_element": plan.rows_per_element,
        "text_encoders": recipe.text_encoders,
        "gradient_checkpointing_in_recipe": recipe.gradient_checkpointing,
        "plan_prompt": plan.text_tokens_prompt,
        "components": components,
        "transformer_params": plan.transformer_params,
        "text_encoder_params": sum(c.params for c in plan.components if c.text_encoder),
        "trainable_params": plan.trainable[recipe.lora_rank],
        "without_checkpointing": parts(without),
        "with_checkpointing": parts(with_),
        "fits": {f"{gb}GB": fitting_option(plan, gb) for gb in GPU_SIZES_GB},
        "plan_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, help="folder for the config-only pipelines (default: a temporary one)")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    os.chdir(ROOT)  # the recipes' prompt files are relative to the repository root
    torch.set_grad_enabled(True)
    if args.models:
        run(args, args.models)
    else:
        with tempfile.TemporaryDirectory(prefix="plan_recipes_") as tmp:
            run(args, Path(tmp))


def run(args: argparse.Namespace, root: Path) -> None:
    writers = {
        "sd35_medium": lambda f, c: write_sd35_medium(f),
        "flux1_dev": lambda f, c: write_flux1_dev(f),
        "qwen_image": lambda f, c: write_qwen_image(f, recipe_prompts(c)),
    }
    results = {}
    for name in args.recipes:
        config_file, folder_name = RECIPES[name]
        hub_id = load_config(config_file=config_file).model
        folder = writers[name](root / folder_name, config_file)
        start = time.perf_counter()
        cfg = load_config(config_file=config_file, overrides=[f"model={folder}"])
        plan = make_plan(cfg)
        seconds = time.perf_counter() - start
        tokens = text_tokens(cfg, plan.text_tokens_prompt)
        print(f"== {config_file} ({hub_id}): {tokens} text tokens, planned in {seconds:.0f} s")
        print(format_plan(plan).replace(str(folder), f"{folder} (config-only {hub_id})"))
        print(flush=True)
        results[name] = summarise(cfg, config_file, hub_id, plan, tokens, seconds)
    path = write_result(
        "plan_recipes",
        {
            "note": "flowdppo plan on config-only folders of the real model sizes (meta device, no weights); "
            "estimates, not GPU measurements",
            "config_folders": str(args.models) if args.models else "a temporary folder (--models DIR keeps them)",
            "recipes": results,
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
