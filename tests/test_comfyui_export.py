"""``flowdppo export --format comfyui`` against ComfyUI's own LoRA key conventions, on each family's tiny model.

ComfyUI's loader (``comfy/lora.py``: ``model_lora_keys_unet``, then ``load_lora``) keys a LoRA module by names it
derives from its own model of the family. Its rules, written out here as data (independently of the export code):

- every model: ``diffusion_model.<weight>`` and ``lora_unet_<weight, dots as underscores>`` for each weight of its
  own model;
- SD3 / SD3.5 (``comfy.utils.mmdit_to_diffusers``): ``transformer.<diffusers name>`` onto the MMDiT's fused
  ``joint_blocks.N`` weights (``MMDIT_BLOCK``);
- FLUX.1 and FLUX.2 (``flux_to_diffusers``): ``transformer.<diffusers name>`` onto ``double_blocks.N`` /
  ``single_blocks.N`` (``FLUX_DOUBLE``, ``FLUX_SINGLE``);
- Qwen-Image: its model has diffusers' names; also ``transformer.<name>`` and ``<name>``;
- Wan 2.1 / 2.2: its model has the original Wan names (``WAN_BLOCK``, ``WAN_TOP``; checked here against diffusers'
  converter of original Wan checkpoints), and only the generic keys.

A module's weights are ``<key>.lora_up.weight`` / ``.lora_down.weight`` or ``.lora_B.weight`` / ``.lora_A.weight``,
scaled by ``<key>.alpha`` / rank (1 without an alpha). Every exported key must load, every trained module be
patched once with ``W + (alpha / r) B A`` equal to peft's merged weight; Wan 2.2 A14B gets one file per expert, and
those files also load with diffusers' Wan LoRA loader (which reads the original names) and give the trained
velocity. A module with no ComfyUI name, or a model folder that cannot be read, is one line, exit 2, nothing
written.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from tiny_pipelines import build_tiny_pipeline, export_run_folder
from tiny_video_pipelines import build_tiny_wan_pipeline
from torch import nn

from flowdppo.cli import main
from flowdppo.policies.lora import (
    COMFYUI_FILE,
    experts,
    lora_file,
    make_trainable,
)
from flowdppo.policies.pipelines import FAMILIES as IMAGE_ADAPTERS
from flowdppo.policies.video import WanPolicy
from flowdppo.prompts import EmbeddingCache, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")

RANK, ALPHA = 4, 12.0  # scale alpha / r = 3: neither 1 (no alpha) nor 2
QKV = ("to_q", "to_k", "to_v")
# SD3 / SD3.5: diffusers' transformer_blocks.N.<name> -> ComfyUI's MMDiT joint_blocks.N.<weight>
MMDIT_BLOCK = {
    **{f"attn.{p}": "x_block.attn.qkv" for p in QKV},
    **{f"attn.add_{p[3]}_proj": "context_block.attn.qkv" for p in QKV},
    **{f"attn2.{p}": "x_block.attn2.qkv" for p in QKV},
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
}
# FLUX.1 / FLUX.2: transformer_blocks.N -> double_blocks.N, single_transformer_blocks.N -> single_blocks.N
FLUX_DOUBLE = {
    **{f"attn.{p}": "img_attn.qkv" for p in QKV},
    **{f"attn.add_{p[3]}_proj": "txt_attn.qkv" for p in QKV},
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
FLUX_SINGLE = {
    **{f"attn.{p}": "linear1" for p in QKV},
    "proj_mlp": "linear1",
    "proj_out": "linear2",
    "attn.to_qkv_mlp_proj": "linear1",
    "attn.to_out": "linear2",
    "norm.linear": "modulation.lin",
}
FLUX = {
    "transformer_blocks": ("double_blocks", FLUX_DOUBLE),
    "single_transformer_blocks": ("single_blocks", FLUX_SINGLE),
}
DIFFUSERS_MAPS = {"sd3": {"transformer_blocks": ("joint_blocks", MMDIT_BLOCK)}, "flux": FLUX, "flux2_klein": FLUX}
# Wan: diffusers' WanTransformer3DModel -> the original Wan names of ComfyUI's WanModel (blocks.N.<name>, top level)
WAN_BLOCK = {
    **{f"attn1.{p}": f"self_attn.{p[3]}" for p in QKV},
    "attn1.to_out.0": "self_attn.o",
    **{f"attn2.{p}": f"cross_attn.{p[3]}" for p in QKV},
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
WAN_TOP = {
    "patch_embedding": "patch_embedding",
    "proj_out": "head.head",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
}
IMAGE = ("sd3", "flux", "flux2_klein", "qwen_image")
WAN = ("wan21", "wan22_ti2v", "wan22_a14b")
HEIGHT, WIDTH, FRAMES = 32, 32, 5


def tiny(family: str):
    """The family's tiny policy (deterministic: a second call gives the same base weights)."""
    if family in WAN:
        return WanPolicy(build_tiny_wan_pipeline(family), HEIGHT, height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    pipeline = build_tiny_pipeline(family)
    return IMAGE_ADAPTERS[type(pipeline).__name__](pipeline, HEIGHT)


def weight_modules(transformer: nn.Module) -> dict[str, nn.Module]:
    """The modules with a LoRA-able weight (Linear, Conv), by name; a wrapped one by its base layer."""
    modules = {
        n: getattr(m, "base_layer", m)
        for n, m in transformer.named_modules()
        if not any(part == "base_layer" or part.startswith("lora_") for part in n.split("."))
    }
    return {n: m for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))}


def wan_original(name: str) -> str:
    if name in WAN_TOP:
        return WAN_TOP[name]
    blocks, index, rest = name.split(".", 2)
    assert blocks == "blocks", name
    return f"blocks.{index}.{WAN_BLOCK[rest]}"


def comfyui_key_map(family: str, transformer: nn.Module) -> dict[str, tuple[str, str]]:
    """The keys ComfyUI's loader maps for this model: ``{key: (ComfyUI weight, the diffusers module it is)}``."""
    names = list(weight_modules(transformer))
    own = {}  # its own weights by ComfyUI name (Wan: original, Qwen-Image: diffusers'); MMDiT / FLUX: DIFFUSERS_MAPS
    if family in WAN:
        own = {wan_original(n): n for n in names}
    elif family == "qwen_image":
        own = {n: n for n in names}
    key_map = {}
    for weight, module in own.items():
        key_map[f"diffusion_model.{weight}"] = key_map[f"lora_unet_{weight.replace('.', '_')}"] = (weight, module)
        if family == "qwen_image":
            key_map[f"transformer.{weight}"] = key_map[weight] = (weight, module)
    for kind, (comfy_kind, table) in DIFFUSERS_MAPS.get(family, {}).items():
        for i in range(len(getattr(transformer, kind, ()))):
            for name, weight in table.items():
                if f"{kind}.{i}.{name}" in names:
                    key_map[f"transformer.{kind}.{i}.{name}"] = (f"{comfy_kind}.{i}.{weight}", f"{kind}.{i}.{name}")
    return key_map


def comfyui_load(lora: dict, key_map: dict) -> tuple[dict[str, list], list[str]]:
    """ComfyUI's ``load_lora``: the patches ``(up, down, alpha)`` by diffusers module, and the keys it leaves
    ("lora key not loaded")."""
    patches, loaded = {}, set()
    for key, (_, module) in key_map.items():
        for up, down in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if key + up in lora:
                patches.setdefault(module, []).append((lora[key + up], lora[key + down], lora.get(f"{key}.alpha")))
                loaded |= {key + up, key + down, f"{key}.alpha"}
                break
    return patches, sorted(set(lora) - loaded)


def randomize_lora(policy) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in experts(policy).values():
            for name, param in module.named_parameters():
                if "lora_" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def run_folder(tmp_path, policy, family: str):
    """A finished run's folder as export reads it (``tiny_pipelines.export_run_folder``)."""
    return export_run_folder(tmp_path, policy, "text_to_video" if family in WAN else "text_to_image", RANK, ALPHA)


def test_the_wan_names_are_those_of_an_original_wan_checkpoint():
    """``WAN_BLOCK`` / ``WAN_TOP`` give every weight of the tiny Wan transformer the name it has in an original Wan
    checkpoint (what ComfyUI loads): diffusers' own converter of such checkpoints turns them back."""
    transformer = tiny("wan21").transformer
    modules = weight_modules(transformer)
    assert {n.split(".")[0] for n in modules} == {"patch_embedding", "condition_embedder", "blocks", "proj_out"}
    original = {f"{wan_original(n)}.{p}": t for n, m in modules.items() for p, t in m.named_parameters()}
    converted = convert_wan_transformer_to_diffusers(dict(original))
    assert sorted(converted) == sorted(f"{n}.{p}" for n, m in modules.items() for p, _ in m.named_parameters())


@pytest.mark.parametrize("family", [*IMAGE, *WAN])
def test_every_exported_key_is_one_comfyui_maps_and_patches_the_trained_update(family, tmp_path, capsys):
    policy = tiny(family)
    make_trainable(policy, RANK, ALPHA)  # the preset, text stream included
    randomize_lora(policy)
    run = run_folder(tmp_path, policy, family)
    every = experts(policy)
    assert len(every) == (2 if family == "wan22_a14b" else 1)
    for source in ([], ["--checkpoint"]):
        out = tmp_path / f"comfy{len(source)}"
        assert main(["export", str(run), "--out", str(out), "--format", "comfyui", *source]) == 0
        assert str(out / COMFYUI_FILE) in capsys.readouterr().out
        files = sorted(p.name for p in out.iterdir())
        assert files == sorted([*(lora_file(name, COMFYUI_FILE) for name in every), "README.md"])  # and the card
        for name, transformer in every.items():
            lora = load_file(str(out / lora_file(name, COMFYUI_FILE)))
            patches, not_loaded = comfyui_load(lora, comfyui_key_map(family, transformer))
            layers = {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer)}
            assert not_loaded == [] and len(lora) == 3 * len(layers)
            assert sorted(patches) == sorted(layers)  # every trained module, each once
            if family in WAN:  # 16 attention projections of the 2 blocks
                assert len(layers) == 16 and all(k.startswith("diffusion_model.blocks.") for k in lora)
            for module, [(up, down, alpha)] in patches.items():
                assert alpha.ndim == 0 and alpha.item() == ALPHA and down.shape[0] == RANK
                layer = layers[module]
                base = layer.get_base_layer().weight.detach()
                merged = copy.deepcopy(layer)
                merged.merge(adapter_names=["default"])  # peft's own merge
                ours = base + (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
                torch.testing.assert_close(ours, merged.get_base_layer().weight.detach(), atol=1e-6, rtol=1e-5)
                assert (ours - base).abs().max() > 1e-3


def velocity_at(policy, sigma: float, seed: int = 1):
    prompts = ["a red cat", "two dogs on a beach"]
    cond = make_batch([{"prompt": p} for p in prompts], 1, EmbeddingCache(policy.encode_prompts), policy.device)
    x = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return policy.velocity(x, torch.full((2,), sigma), cond)


def test_the_two_expert_files_load_in_diffusers_wan_loader_and_give_the_trained_velocity(tmp_path):
    """diffusers' Wan LoRA loader reads the original names (``diffusion_model.``) and the alpha tensors: each
    expert's file, the low-noise one into ``transformer_2``, gives the trained policy's velocity."""
    policy = tiny("wan22_a14b")
    make_trainable(policy, RANK, ALPHA)
    randomize_lora(policy)
    out = tmp_path / "comfy"
    assert (
        main(["export", str(run_folder(tmp_path, policy, "wan22_a14b")), "--out", str(out), "--format", "comfyui"]) == 0
    )
    fresh = build_tiny_wan_pipeline("wan22_a14b")
    fresh.load_lora_weights(str(out), weight_name=COMFYUI_FILE)
    fresh.load_lora_weights(
        str(out), weight_name=lora_file("transformer_2", COMFYUI_FILE), load_into_transformer_2=True
    )
    exported = WanPolicy(fresh, HEIGHT, height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    base = tiny("wan22_a14b")
    for sigma in (0.95, 0.5):  # either side of the boundary 0.875: each expert
        trained = velocity_at(policy, sigma)
        torch.testing.assert_close(velocity_at(exported, sigma), trained, atol=1e-6, rtol=1e-5)
        assert (trained - velocity_at(base, sigma)).abs().max() > 1e-4, sigma


def test_a_module_comfyui_cannot_name_or_an_unreadable_model_is_one_line_and_writes_nothing(tmp_path, capsys):
    policy = tiny("wan21")
    make_trainable(policy, RANK, ALPHA)
    run = run_folder(tmp_path, policy, "wan21")
    checkpoint = run / "checkpoints" / "epoch_000001" / "trainable.safetensors"
    state = load_file(str(checkpoint))
    state["blocks.0.norm2.lora_A.weight"] = torch.zeros(RANK, 8)  # no such module in ComfyUI's Wan model
    state["blocks.0.norm2.lora_B.weight"] = torch.zeros(8, RANK)
    save_file(state, str(checkpoint))
    out = tmp_path / "comfy"
    assert main(["export", str(run), "--out", str(out), "--format", "comfyui", "--checkpoint"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'blocks.0.norm2'" in err and "--format diffusers" in err
    assert not out.exists()

    (tmp_path / "model" / "model_index.json").unlink()  # the family cannot be told
    assert main(["export", str(run), "--out", str(out), "--format", "comfyui"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model" in err and str(tmp_path / "model") in err
    assert not out.exists()
