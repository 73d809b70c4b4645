"""Tiny random-weight Wan text-to-video pipelines, built entirely from configs (no hub access).

``save_tiny_wan_pipeline(directory, layout)`` builds a ``WanPipeline`` with the real component classes (UMT5 text
encoder and a locally built UMT5 tokenizer, ``WanTransformer3DModel`` with 3-D patches ``(1, 2, 2)``,
``AutoencoderKLWan``, ``UniPCMultistepScheduler`` with flow sigmas), saves it with ``save_pretrained`` and returns
the folder. Layouts:

- ``"wan21"``: Wan 2.1 T2V (one transformer; VAE 8x spatial, 4x temporal, the real 16-channel latent statistics,
  shift 3);
- ``"wan22_a14b"``: Wan 2.2 T2V-A14B (two experts: ``transformer`` for high noise, ``transformer_2`` below
  ``boundary_ratio`` 0.875, the released value; the Wan 2.1 VAE);
- ``"wan22_ti2v"``: Wan 2.2 TI2V-5B in text-to-video (``expand_timesteps``: per-token timesteps; its 48-channel
  residual VAE with 2x2 patchified pixels, 16x spatial compression; shift 5).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_pipelines import _t5_encoder
from tiny_tokenizers import t5_tokenizer

WAN_FLOW_SHIFT = 3.0  # Wan 2.1's 480p scheduler config (5.0 at 720p)
TI2V_FLOW_SHIFT = 5.0  # Wan 2.2 TI2V-5B's scheduler config
A14B_BOUNDARY = 0.875  # Wan 2.2 T2V-A14B's boundary_ratio
LAYOUTS = ("wan21", "wan22_a14b", "wan22_ti2v")
TEXT_DIM = 32  # real: 4096 (UMT5-XXL)


def umt5_tokenizer():
    """UMT5 (google/umt5-xxl) is a sentencepiece unigram tokenizer loaded as a T5 tokenizer: the tiny T5 one."""
    return t5_tokenizer()


def _transformer(channels: int):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # rotary split over (frames, height, width): 4 + 4 + 4
        in_channels=channels,
        out_channels=channels,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def _build_wan(layout: str = "wan21"):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    if layout not in LAYOUTS:
        raise ValueError(f"layout: one of {LAYOUTS}, got {layout!r}")
    tokenizer = umt5_tokenizer()
    if layout == "wan22_ti2v":
        # TI2V-5B's VAE: z 48, residual blocks, pixels patchified 2x2 (12 channels in and out), 16x spatial
        gen = torch.Generator().manual_seed(1)
        vae = AutoencoderKLWan(
            base_dim=8,
            decoder_base_dim=8,
            z_dim=48,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            latents_mean=(torch.randn(48, generator=gen) * 0.3).tolist(),
            latents_std=(torch.rand(48, generator=gen) + 0.5).tolist(),
        ).eval()
        transformer, channels, shift = _transformer(48), 48, TI2V_FLOW_SHIFT
    else:
        # latents_mean / latents_std default to the real Wan 2.1 statistics
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]
        ).eval()
        transformer, channels, shift = _transformer(16), 16, WAN_FLOW_SHIFT
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000
    )
    two = layout == "wan22_a14b"
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(tokenizer, TEXT_DIM, umt5=True),
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=_transformer(channels) if two else None,
        boundary_ratio=A14B_BOUNDARY if two else None,
        expand_timesteps=layout == "wan22_ti2v",
    )


def build_tiny_wan_pipeline(layout: str = "wan21", seed: int = 0):
    """Build (without saving) the tiny Wan pipeline of ``layout``; deterministic given ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            return _build_wan(layout)


def save_tiny_wan_pipeline(directory: Path, seed: int = 0, layout: str = "wan21") -> Path:
    """Build the tiny Wan pipeline of ``layout`` (deterministic given ``seed``), ``save_pretrained(directory)``,
    return it."""
    directory = Path(directory)
    build_tiny_wan_pipeline(layout, seed).save_pretrained(directory)
    return directory
