"""Tiny random-weight diffusers pipelines, built entirely from configs (no hub access).

``save_tiny_pipeline(family, directory)`` builds a few-MB pipeline of one of the supported model families with the
real component classes (transformer, VAE, scheduler, text encoders and tokenizers) and the structural quirks of the
released checkpoints (latent channels, packing, scheduler shifting, text-encoder layout), writes it with
``save_pretrained`` and returns the directory, so that ``DiffusionPipeline.from_pretrained(directory)`` loads it the
way a user's real model is loaded.

Tokenizers are built locally (``tiny_tokenizers.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_tokenizers import QWEN_SPECIAL_TOKENS, clip_tokenizer, qwen_tokenizer, t5_tokenizer

FAMILIES = ("sd3", "flux", "flux2_klein", "qwen_image")


def _vocab_size(tokenizer) -> int:
    return 8 * ((len(tokenizer) + 7) // 8)


# --------------------------------------------------------------------------------------------------------------------
# text encoders
# --------------------------------------------------------------------------------------------------------------------


def _clip_text_model(tokenizer, hidden_size: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=_vocab_size(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _t5_encoder(tokenizer, d_model: int, umt5: bool = False):
    """A 2-layer T5 v1.1 encoder (SD3 / FLUX.1's T5-XXL), or with ``umt5`` its UMT5 variant (Wan's)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(
        vocab_size=_vocab_size(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1 (the T5-XXL encoder of SD3 / FLUX.1)
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return model_class(config).eval()


def _qwen3_causal_lm(tokenizer, hidden_size: int, num_layers: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=_vocab_size(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen3ForCausalLM(config).eval()


def _qwen2_5_vl(tokenizer, hidden_size: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    num_heads = 4
    head_dim = hidden_size // num_heads
    # mrope_section splits head_dim / 2 rotary frequencies over (temporal, height, width); real: [16, 24, 24] for 128
    mrope = [head_dim // 8, head_dim // 8, head_dim // 2 - 2 * (head_dim // 8)]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": _vocab_size(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": num_heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": 1000000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [0],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


# --------------------------------------------------------------------------------------------------------------------
# VAEs
# --------------------------------------------------------------------------------------------------------------------

# four blocks -> 2 ** (4 - 1) = 8x spatial compression, like the real VAEs
_VAE_BLOCKS = (8, 8, 16, 16)


def _autoencoder_kl(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(_VAE_BLOCKS),
        block_out_channels=_VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def _autoencoder_kl_flux2():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=_VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
        sample_size=64,
        patch_size=(2, 2),
    ).eval()
    # non-trivial latent batch-norm statistics (the pipeline (de)normalises the patchified latents with them)
    channels = vae.bn.running_mean.numel()
    vae.bn.running_mean.copy_(0.1 * torch.randn(channels))
    vae.bn.running_var.copy_(torch.rand(channels) + 0.5)
    vae.bn.num_batches_tracked.fill_(1)
    return vae


def _autoencoder_kl_qwen_image():
    from diffusers import AutoencoderKLQwenImage

    # latents_mean / latents_std default to the real (Wan 2.1) 16-channel statistics
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


# --------------------------------------------------------------------------------------------------------------------
# pipelines
# --------------------------------------------------------------------------------------------------------------------


def _build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_1, clip_2, t5_dim = 16, 24, 48  # real: 768, 1280, 4096 (T5 width >= the concatenated CLIP widths)
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    text_encoder = _clip_text_model(tokenizer, clip_1, with_projection=True)
    text_encoder_2 = _clip_text_model(tokenizer_2, clip_2, with_projection=True)
    text_encoder_3 = _t5_encoder(tokenizer_3, t5_dim)
    heads, head_dim = 4, 8
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=t5_dim,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=clip_1 + clip_2,  # concatenated CLIP text_embeds (projection_dim = hidden here)
        out_channels=16,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),  # SD3.5 (MMDiT-X) style
        qk_norm="rms_norm",  # SD3.5 style
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3.5's scheduler config
    vae = _autoencoder_kl(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE factors
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_dim, t5_dim = 16, 32  # real: 768, 4096
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    text_encoder = _clip_text_model(tokenizer, clip_dim, with_projection=False)
    text_encoder_2 = _t5_encoder(tokenizer_2, t5_dim)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_dim,
        pooled_projection_dim=clip_dim,  # CLIPTextModel pooler_output
        guidance_embeds=True,  # FLUX.1-dev (guidance-distilled)
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, real: (16, 56, 56)
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    vae = _autoencoder_kl(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's VAE factors
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


# FLUX.2-klein stacks the Qwen3 hidden states of layers (9, 18, 27) by default (`text_encoder_out_layers`), so the
# tiny Qwen3 keeps 28 decoder layers (cheap at width 16) for the pipeline defaults to work.
FLUX2_KLEIN_TEXT_LAYERS = 28


def _build_flux2_klein():
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    qwen_dim = 16  # real (klein 4B): Qwen3-4B, 2560 -> joint_attention_dim 7680
    tokenizer = qwen_tokenizer()
    text_encoder = _qwen3_causal_lm(tokenizer, qwen_dim, FLUX2_KLEIN_TEXT_LAYERS)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,  # 32 latent channels x 2x2 patchify
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * qwen_dim,  # three stacked Qwen3 hidden-state layers
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),  # (T, H, W, L), sums to attention_head_dim, real: (32, 32, 32, 32)
        rope_theta=2000,
        guidance_embeds=False,  # klein has no guidance embedding
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.2's scheduler config (mu comes from compute_empirical_mu)
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    return Flux2KleinPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_autoencoder_kl_flux2(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        is_distilled=False,  # klein-base (real CFG with guidance_scale > 1); the 4-step distilled klein sets True
    )


def _build_qwen_image():
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    qwen_dim = 32  # real: Qwen2.5-VL-7B, 3584
    tokenizer = qwen_tokenizer()
    text_encoder = _qwen2_5_vl(tokenizer, qwen_dim)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels x 2x2 packing
        out_channels=16,  # proj_out emits patch_size**2 * 16 = 64 (packed) channels
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=qwen_dim,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, real: (16, 56, 56)
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's scheduler config
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return QwenImagePipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_autoencoder_kl_qwen_image(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )


_BUILDERS = {
    "sd3": _build_sd3,
    "flux": _build_flux,
    "flux2_klein": _build_flux2_klein,
    "qwen_image": _build_qwen_image,
}


def build_tiny_pipeline(family: str, seed: int = 0):
    """Build (without saving) the tiny pipeline of ``family``; deterministic given ``seed``."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}, expected one of {FAMILIES}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            return _BUILDERS[family]()


def save_tiny_pipeline(family: str, directory: Path, seed: int = 0) -> Path:
    """Build a tiny random-weight diffusers pipeline of ``family`` entirely from configs (transformer, VAE, scheduler,
    text encoders AND tokenizers built locally, no hub), ``pipeline.save_pretrained(directory)``, and return
    ``directory``. Deterministic given ``seed``."""
    directory = Path(directory)
    pipeline = build_tiny_pipeline(family, seed=seed)
    pipeline.save_pretrained(directory)
    return directory


def export_run_folder(tmp_path: Path, policy, task: str, rank: int, alpha: float) -> Path:
    """A finished run's folder as ``flowdppo export`` reads it (no training): config.yaml, final/ and one
    checkpoint; the model folder holds only model_index.json (the family, all the export reads of the model)."""
    import json

    from safetensors.torch import save_file

    from flowdppo.config import load_config, save_config
    from flowdppo.policies.lora import save_lora_adapter, trainable_state_dict

    run, model = tmp_path / "run", tmp_path / "model"
    (run / "final").mkdir(parents=True)
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": policy.pipeline_class.__name__}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    overrides = [f"task={task}", f"model={model}", f"prompts={prompts}", f"optim.lora_rank={rank}"]
    save_config(load_config(overrides=[*overrides, f"optim.lora_alpha={alpha}"]), run / "config.yaml")
    save_lora_adapter(policy, run / "final")
    checkpoint = run / "checkpoints" / "epoch_000001"
    checkpoint.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in trainable_state_dict(policy).items()}
    save_file(state, str(checkpoint / "trainable.safetensors"))
    (checkpoint / "state.json").write_text(json.dumps({"epoch": 1}))
    return run


def digits_run(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A digits run folder as export and eval read it (config.yaml and a nonzero final LoRA adapter, rank 4, alpha 8;
    no metrics, no samples), and the trained policy."""
    from flowdppo.config import load_config, save_config
    from flowdppo.policies.lora import make_trainable, save_lora_adapter
    from flowdppo.tasks.digits.policy import load_base_policy

    run = tmp_path / "digits"
    (run / "final").mkdir(parents=True)
    cfg = load_config(overrides=["optim.lora_rank=4", "optim.lora_alpha=8"])
    save_config(cfg, run / "config.yaml")
    policy = load_base_policy()
    make_trainable(policy, 4, 8.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    save_lora_adapter(policy, run / "final")
    return run, policy
