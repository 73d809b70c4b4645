"""Sizes a model or the machine cannot take, refused in one line before anything of that size is allocated.

- **Positions**: a transformer's position embedding covers a fixed number of patches per axis: SD3's
  ``pos_embed_max_size`` (its sin-cos table, cropped), Wan's ``rope_max_seq_len`` (its rotary table, per frame,
  row and column), Qwen-Image's 4096 rotary positions (centred on the image, half each way, the text's 512 after
  the image's half side). FLUX.1 and FLUX.2 compute their rotary embedding for any size.
- **Memory**: lower bounds of what one sample, one rollout call and one mini-batch allocate, against the memory
  free on the device (``torch.cuda.mem_get_info``; on the CPU the available RAM):

      forward of one sample    LIVE_COPIES x tokens x width x bytes(dtype)   (the hidden states, q, k and v of
                                                                               one attention call)
      training forward         blocks x tokens x width x bytes(dtype)       (each block keeps its input for the
                                                                               backward, with or without
                                                                               checkpointing)
      decoding                 C x height x width x frames x bytes          (the VAE decoder's last stage: C of
                                                                               its first block_out_channels /
                                                                               base_dim; at least float32 RGB)

  ``width`` is ``num_attention_heads x attention_head_dim``; a guided forward runs 2 rows per sample. The true
  peak is several times these (``flowdppo plan`` measures it): a refusal here is certain to be out of memory.
"""

from __future__ import annotations

from collections.abc import Callable

import psutil
import torch
from torch import nn

LIVE_COPIES = 4  # hidden states, q, k, v: alive together in every attention call
QWEN_MAX_TEXT_TOKENS = 512  # the text tokens QwenImagePipeline.__call__ allows (max_sequence_length)
GIB = 1024**3


def human_bytes(n: float) -> str:
    for unit, size in (("TiB", 1024 * GIB), ("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ---- positions ---------------------------------------------------------------------------------------------------
def position_limit(transformer: nn.Module) -> tuple[int, str] | None:
    """The most patches per axis the transformer's position embedding covers, and what sets it (None: any)."""
    config = transformer.config
    if config.get("pos_embed_max_size"):
        return config["pos_embed_max_size"], f"pos_embed_max_size {config['pos_embed_max_size']}"
    if config.get("rope_max_seq_len"):
        return config["rope_max_seq_len"], f"rope_max_seq_len {config['rope_max_seq_len']}"
    table = getattr(getattr(transformer, "pos_embed", None), "pos_freqs", None)
    if table is not None:  # Qwen-Image: half the image's side either way of the centre, then the text
        source = f"{len(table)} rotary positions, {QWEN_MAX_TEXT_TOKENS} of them for the text"
        return 2 * (len(table) - QWEN_MAX_TEXT_TOKENS), source
    return None


def positions_error(
    transformer: nn.Module, option: str, value: int, patches: int, largest: Callable[[int], int]
) -> str:
    """ "" if ``patches`` (``option = value`` in patches along one axis) fits the position embedding; else the line
    naming ``option`` and its largest value, ``largest(most patches)``."""
    limit = position_limit(transformer)
    if limit is None or patches <= limit[0]:
        return ""
    most, source = limit
    return (
        f"{option}: at most {largest(most):,} for this model (its position embedding covers {most:,} patches per "
        f"axis: {source}), got {value:,}"
    )


# ---- memory --------------------------------------------------------------------------------------------------------
def free_memory(device: torch.device | str) -> tuple[int, str] | None:
    """Bytes free for tensors on ``device`` and what they are (None: a device without memory, e.g. meta)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"GPU memory free on {device}"
    if device.type == "cpu":
        return psutil.virtual_memory().available, "RAM available"
    return None


def sample_bytes(policy) -> tuple[int, int, int]:
    """Lower bounds of one sample's (forward, training forward, decoded pixels) bytes (see the module docstring)."""
    config = policy.transformer.config
    width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    hidden = policy.tokens * width * policy.dtype.itemsize
    blocks = max(len(policy.shard_units()) // len(policy.experts), 1)
    vae = policy.vae.config
    channels = (vae.get("block_out_channels") or [vae.get("base_dim", 3)])[0]
    per_pixel = max(3 * 4, channels * policy.vae.dtype.itemsize)
    pixels = policy.resolution * getattr(policy, "width", policy.resolution) * getattr(policy, "num_frames", 1)
    return LIVE_COPIES * hidden, blocks * hidden, pixels * per_pixel


def size_options(policy) -> str:
    """The options that set one sample's size."""
    return "height / width / num_frames" if hasattr(policy, "num_frames") else "resolution"


def sample_error(policy, guided: bool, budget: int, where: str) -> str:
    """ "" if one sample fits in ``budget`` bytes (``where``: what they are); else the line naming the size options."""
    forward, train, pixels = sample_bytes(policy)
    need = max((1 + guided) * train, (1 + guided) * forward, pixels)
    if need <= budget:
        return ""
    return (
        f"{size_options(policy)}: one sample ({policy.tokens:,} tokens) needs at least {human_bytes(need)}, more "
        f"than the {human_bytes(budget)} of {where}; make it smaller"
    )


def memory_error(
    policy, guidance_scale: float, rows: int, rollout_batch_size: int, minibatch: int, processes: int = 1
) -> str:
    """ "" if one sample, a rollout call of ``rollout_batch_size`` (0: all ``rows`` of this process) and a mini-batch
    of ``minibatch`` elements (this process's share of ``optim.minibatch_size``, at least ``min(minibatch, rows)``)
    fit in the memory free on the policy's device; else the line naming the option to change and a value that fits
    the bound."""
    free = free_memory(policy.device)
    if free is None:
        return ""
    budget, where = free
    guided = policy.guides(guidance_scale)
    problem = sample_error(policy, guided, budget, where)
    if problem:
        return problem
    forward, train, pixels = sample_bytes(policy)
    per_sample = max((1 + guided) * forward, pixels)
    chunk = min(rollout_batch_size or rows, rows)
    if chunk * per_sample > budget:
        return (
            f"sampler.rollout_batch_size: a rollout call of {chunk:,} samples needs at least "
            f"{human_bytes(chunk * per_sample)}, more than the {human_bytes(budget)} of {where}; set "
            f"sampler.rollout_batch_size={budget // per_sample} or less"
        )
    elements = min(minibatch, rows)  # a rollout holds at least one element per sample
    per_element = (1 + guided) * train
    if elements * per_element > budget:
        return (
            f"optim.minibatch_size: a mini-batch of {elements:,} elements needs at least "
            f"{human_bytes(elements * per_element)}, more than the {human_bytes(budget)} of {where}; set "
            f"optim.minibatch_size={budget // per_element * processes} or less"
        )
    return ""
