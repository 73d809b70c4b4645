"""LoRA presets, adapter metadata and the ComfyUI export, on the tiny random-weight pipelines (no training).

- each family's preset wraps exactly the expected modules: the image stream's projections in every block of
  ``transformer_blocks`` and ``single_transformer_blocks``, the text stream's with ``text_stream``; nothing
  outside the blocks (FLUX.1's final ``proj_out``, klein's double-stream ``attn.to_out`` list);
- a nonzero ``lora_B`` in one kind of block alone changes the velocity (the single-stream blocks' LoRA acts);
- the saved adapter's metadata holds only ``r``, ``lora_alpha``, ``target_modules``, builds a ``LoraConfig``,
  and a fresh pipeline loaded from the file gives the adapter's velocity;
- ``flowdppo export --format comfyui`` writes ``lora_A`` / ``lora_B`` / ``alpha`` per module with
  ``W + (alpha / r) B A`` equal to peft's merged weight; an unknown format is one line, exit 2, nothing written.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_pipelines import FAMILIES, build_tiny_pipeline, export_run_folder

from flowdppo.cli import main
from flowdppo.config import load_config, save_config
from flowdppo.errors import ConfigError
from flowdppo.policies.lora import (
    COMFYUI_FILE,
    LORA_FILE,
    adapters_disabled,
    make_trainable,
    save_lora_adapter,
)
from flowdppo.policies.pipelines import FAMILIES as ADAPTERS
from flowdppo.prompts import EmbeddingCache, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")

RESOLUTION = 32
ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
TEXT = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
# what each preset must wrap, per kind of block (written out here, independently of the presets' names)
IMAGE_STREAM = {
    "sd3": {"transformer_blocks": (*ATTENTION, "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")},
    "flux": {
        "transformer_blocks": ATTENTION,
        "single_transformer_blocks": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out"),
    },
    "flux2_klein": {
        "transformer_blocks": ATTENTION,
        "single_transformer_blocks": ("attn.to_qkv_mlp_proj", "attn.to_out"),
    },
    "qwen_image": {"transformer_blocks": ATTENTION},
}


def tiny_policy(family: str):
    pipeline = build_tiny_pipeline(family)
    return ADAPTERS[type(pipeline).__name__](pipeline, RESOLUTION)


def wrapped(policy) -> set[str]:
    return {name for name, module in policy.transformer.named_modules() if isinstance(module, LoraLayer)}


def expected(transformer, blocks: dict[str, tuple[str, ...]]) -> set[str]:
    """Every ``kind.i.name`` that exists as a Linear in the transformer (wrapped by LoRA or not)."""
    modules = {n: getattr(m, "base_layer", m) for n, m in transformer.named_modules()}
    names = {
        f"{kind}.{i}.{name}"
        for kind, parts in blocks.items()
        for i in range(len(getattr(transformer, kind)))
        for name in parts
    }
    return {n for n in names if isinstance(modules.get(n), torch.nn.Linear)}


def velocity(policy, seed: int = 1) -> torch.Tensor:
    prompts = ["a red cat", "a blue house"]
    cond = make_batch([{"prompt": p} for p in prompts], 1, EmbeddingCache(policy.encode_prompts), policy.device)
    x = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return policy.velocity(x, torch.full((2,), 0.6), cond)


def randomize_lora(policy, scale: float = 0.1, only: str = "") -> None:
    """Nonzero A and B (B is zero at init) in the LoRA layers whose name starts with ``only``."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if "lora_" in name and name.startswith(only):
                param.copy_(scale * torch.randn(param.shape, generator=gen))


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_wrap_every_block_and_the_text_stream_on_request(family):
    image = tiny_policy(family)
    make_trainable(image, 4, 8.0, text_stream=False)
    transformer = image.transformer
    assert wrapped(image) == expected(transformer, IMAGE_STREAM[family])
    for kind in ("transformer_blocks", "single_transformer_blocks"):
        for i in range(len(getattr(transformer, kind, ()))):
            assert any(name.startswith(f"{kind}.{i}.") for name in wrapped(image)), f"{kind}.{i} has no LoRA"

    both = tiny_policy(family)
    make_trainable(both, 4, 8.0)  # the default: the text stream too
    text = expected(both.transformer, {"transformer_blocks": TEXT})
    assert len(text) >= 3 * len(both.transformer.transformer_blocks)  # add_q/k/v_proj in every joint block
    assert wrapped(both) == expected(both.transformer, IMAGE_STREAM[family]) | text
    assert not text & wrapped(image)


@pytest.mark.parametrize("family", ["flux", "flux2_klein", "sd3"])
def test_a_nonzero_lora_in_one_kind_of_block_changes_the_velocity(family):
    policy = tiny_policy(family)
    make_trainable(policy, 4, 8.0)
    base = velocity(policy)
    torch.testing.assert_close(velocity(policy), base, atol=0, rtol=0)  # B = 0: the adapter is a no-op
    for kind in ("transformer_blocks", "single_transformer_blocks"):
        if hasattr(policy.transformer, kind):
            randomize_lora(policy, only=f"{kind}.")
            assert (velocity(policy) - base).abs().max() > 1e-4, kind
            with adapters_disabled(policy):
                torch.testing.assert_close(velocity(policy), base, atol=0, rtol=0)
            randomize_lora(policy, scale=0.0, only=f"{kind}.")


@pytest.mark.parametrize("family", ["flux2_klein", "qwen_image"])
def test_metadata_holds_only_what_diffusers_needs_and_loads_in_a_fresh_pipeline(family, tmp_path):
    pipeline = build_tiny_pipeline(family)
    fresh = copy.deepcopy(pipeline)  # the same base weights, no adapter
    policy = ADAPTERS[type(pipeline).__name__](pipeline, RESOLUTION)
    make_trainable(policy, 4, 12.0)
    randomize_lora(policy)
    save_lora_adapter(policy, tmp_path)
    with safe_open(str(tmp_path / LORA_FILE), "pt") as f:
        packed = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    metadata = {k.removeprefix("transformer."): v for k, v in packed.items()}
    assert set(metadata) == {"r", "lora_alpha", "target_modules"} and len(packed) == 3
    assert (metadata["r"], metadata["lora_alpha"]) == (4, 12.0)
    assert (
        set(metadata["target_modules"])
        == wrapped(policy)
        == {k[len("transformer.") :].split(".lora_")[0] for k in keys}
    )
    config = LoraConfig(**metadata)
    assert config.r == 4 and config.lora_alpha == 12.0

    fresh.load_lora_weights(str(tmp_path))
    loaded = ADAPTERS[type(fresh).__name__](fresh, RESOLUTION)
    torch.testing.assert_close(velocity(loaded), velocity(policy), atol=1e-6, rtol=1e-5)


def run_folder(tmp_path, policy, rank: int, alpha: float):
    """A finished run's folder as export reads it (``tiny_pipelines.export_run_folder``)."""
    return export_run_folder(tmp_path, policy, "text_to_image", rank, alpha)


def test_comfyui_export_gives_peft_merged_weights(tmp_path, capsys):
    rank, alpha = 4, 12.0  # scale alpha / r = 3: neither 1 (no alpha) nor 2
    policy = tiny_policy("flux2_klein")
    make_trainable(policy, rank, alpha)
    randomize_lora(policy)
    run = run_folder(tmp_path, policy, rank, alpha)
    layers = {name: m for name, m in policy.transformer.named_modules() if isinstance(m, LoraLayer)}

    for source in ([], ["--checkpoint"]):
        out = tmp_path / f"comfy{len(source)}"
        assert main(["export", str(run), "--out", str(out), "--format", "comfyui", *source]) == 0
        assert str(out / COMFYUI_FILE) in capsys.readouterr().out
        tensors = load_file(str(out / COMFYUI_FILE))
        parts = ("lora_A.weight", "lora_B.weight", "alpha")
        assert set(tensors) == {f"transformer.{name}.{part}" for name in layers for part in parts}
        for name, layer in layers.items():
            key = f"transformer.{name}"
            a, b, file_alpha = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"], tensors[f"{key}.alpha"]
            assert file_alpha.ndim == 0 and file_alpha.item() == alpha and a.shape[0] == rank
            base = layer.get_base_layer().weight.detach()
            ours = base + (file_alpha / a.shape[0]) * (b @ a)  # what ComfyUI adds: alpha / rank, rank = A's rows
            merged = copy.deepcopy(layer)
            merged.merge(adapter_names=["default"])  # peft's own merge
            torch.testing.assert_close(ours, merged.get_base_layer().weight.detach(), atol=1e-6, rtol=1e-5)
            assert (ours - base).abs().max() > 1e-3


def test_unknown_export_format_is_one_line_and_writes_nothing(tmp_path, capsys):
    policy = tiny_policy("qwen_image")
    make_trainable(policy, 4, 8.0)
    run = run_folder(tmp_path, policy, 4, 8.0)
    out = tmp_path / "lora"
    assert main(["export", str(run), "--out", str(out), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--format" in err and "comfyui" in err
    assert not out.exists()


def test_an_explicit_target_that_names_no_module_is_refused():
    policy = tiny_policy("flux2_klein")
    with pytest.raises(ConfigError, match="to_qkv"):
        make_trainable(policy, 4, 8.0, ["to_q", "to_qkv"])  # to_qkv is no module (to_qkv_mlp_proj is)
    policy = tiny_policy("flux2_klein")
    make_trainable(policy, 4, 8.0, ["single_transformer_blocks.*.attn.to_out"])
    assert wrapped(policy) == {f"single_transformer_blocks.{i}.attn.to_out" for i in range(2)}
    assert all(re.fullmatch(r"single_transformer_blocks\.\d\.attn\.to_out", n) for n in wrapped(policy))


def eval_run(tmp_path, model, family: str, rank: int, alpha: float, name: str):
    """A run folder ``eval`` reads (config.yaml, final/) of a LoRA of ``rank``, ``alpha`` on ``model``."""
    from tiny_pipelines import save_tiny_pipeline

    from flowdppo.policies.pipelines import load_pipeline_policy

    if not model.is_dir():
        save_tiny_pipeline(family, model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    run = tmp_path / name
    cfg = load_config(
        overrides=[
            "task=text_to_image",
            f"model={model}",
            f"prompts={prompts}",
            "eval_prompts=1",
            f"resolution={RESOLUTION}",
            "reward.names=[jpeg_incompressibility]",
            f"optim.lora_rank={rank}",
            f"optim.lora_alpha={alpha}",
        ]
    )
    policy = load_pipeline_policy(str(model), RESOLUTION, torch.float32, "cpu")
    make_trainable(policy, rank, alpha)
    randomize_lora(policy)
    (run / "final").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    save_lora_adapter(policy, run / "final")
    return run


def test_eval_refuses_an_adapter_of_another_rank_alpha_or_model_in_one_line(tmp_path, capfd):
    sd3, flux = tmp_path / "sd3", tmp_path / "flux"
    run = eval_run(tmp_path, sd3, "sd3", 4, 8.0, "run")
    assert main(["eval", str(run), "--per-class", "1"]) == 0  # its own adapter: measured
    assert "eval/jpeg_incompressibility" in capfd.readouterr().out
    others = {
        "rank": (
            eval_run(tmp_path, sd3, "sd3", 2, 8.0, "rank2"),
            "an adapter of rank 2, but the run trained rank 4 (optim.lora_rank)",
        ),
        "alpha": (
            eval_run(tmp_path, sd3, "sd3", 4, 4.0, "alpha4"),
            "an adapter of lora_alpha 4, but the run trained 8 (optim.lora_alpha)",
        ),
        "model": (
            eval_run(tmp_path, flux, "flux", 4, 8.0, "flux"),
            "an adapter for another model or other target modules: ",
        ),
    }
    capfd.readouterr()
    final = run / "final" / LORA_FILE
    for case, (other, message) in others.items():
        final.write_bytes((other / "final" / LORA_FILE).read_bytes())
        assert main(["eval", str(run), "--per-class", "1"]) == 2, case
        captured = capfd.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"flowdppo: error: {final}: {message}"), (case, captured.err)
        assert "it is not this run's adapter" in err[0] and captured.out == "", case  # no peft warnings either
