"""A tiny random-weight Wan 2.1 text-to-video pipeline, built entirely from configs (no hub access).

``save_tiny_wan_pipeline(directory)`` builds a ``WanPipeline`` with the real component classes (UMT5 text encoder
and a locally built UMT5 tokenizer, ``WanTransformer3DModel`` with 3-D patches ``(1, 2, 2)``, ``AutoencoderKLWan``
with 8x spatial and 4x temporal compression and the real 16-channel latent statistics, and Wan 2.1's
``UniPCMultistepScheduler`` with flow sigmas, shift 3), saves it with ``save_pretrained`` and returns the folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_pipelines import _t5_encoder
from tiny_tokenizers import t5_tokenizer

WAN_FLOW_SHIFT = 3.0  # Wan 2.1's 480p scheduler config (5.0 at 720p)


def umt5_tokenizer():
    """UMT5 (google/umt5-xxl) is a sentencepiece unigram tokenizer loaded as a T5 tokenizer: the tiny T5 one."""
    return t5_tokenizer()


def _build_wan():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    text_dim = 32  # real: 4096 (UMT5-XXL)
    tokenizer = umt5_tokenizer()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # rotary split over (frames, height, width): 4 + 4 + 4
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    # latents_mean / latents_std default to the real Wan 2.1 statistics
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()  # fmt: skip
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=WAN_FLOW_SHIFT, num_train_timesteps=1000)  # fmt: skip
    return WanPipeline(tokenizer=tokenizer, text_encoder=_t5_encoder(tokenizer, text_dim, umt5=True), vae=vae,
                       scheduler=scheduler, transformer=transformer)  # fmt: skip


def save_tiny_wan_pipeline(directory: Path, seed: int = 0) -> Path:
    """Build the tiny Wan 2.1 pipeline (deterministic given ``seed``), ``save_pretrained(directory)``, return it."""
    directory = Path(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            pipeline = _build_wan()
    pipeline.save_pretrained(directory)
    return directory
