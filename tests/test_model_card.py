"""``flowdppo export`` writes a model card beside the adapter (``model_card.py``).

- a text-to-image run (tiny SD3, trained one epoch, evaluated with ``eval --prompts``): the card's YAML front matter
  has ``base_model``, ``library_name: diffusers``, ``license``, the tags; the protocol's measures appear with their
  CIs, the KL to the base with it; the sample grid it links and the files its snippets name exist; its diffusers
  snippet, run as written, loads the adapter into a fresh pipeline; exported again as ComfyUI into the same folder,
  the card shows both loaders; exported from a checkpoint, it says so;
- a digits run: ``library_name: flowdppo``, measures it never made are "not evaluated", and its flowdppo snippet
  loads the trained velocity;
- a README.md or samples.png of the user's in --out stays (the card is MODEL_CARD.md); a bad --license is one line;
- two experts (Wan 2.2 A14B): one ``load_lora_weights`` per file, the low-noise one into ``transformer_2``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_pipelines import digits_run, save_tiny_pipeline

from flowdppo.cli import main
from flowdppo.config import load_config
from flowdppo.model_card import loading_text
from flowdppo.protocol_report import format_interval

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A finished one-epoch LoRA run of the tiny SD3 pipeline, evaluated on a prompt file (RUN/eval/eval.json)."""
    root = tmp_path_factory.mktemp("card")
    model = save_tiny_pipeline("sd3", root / "sd3")
    (root / "train.txt").write_text("a red cat\ntwo dogs on a beach\na blue house\na green apple\n")
    (root / "eval.txt").write_text("a yellow car\na tree at night\n")
    run = root / "run"
    overrides = [
        "task=text_to_image",
        f"model={model}",
        f"prompts={root / 'train.txt'}",
        "eval_prompts=2",
        "resolution=32",
        "epochs=1",
        "prompts_per_epoch=2",
        "group_size=2",
        "eval_samples_per_class=1",
        "optim.minibatch_size=4",
        "optim.lr=1e-2",
        "reward.names=[jpeg_incompressibility]",
        "sampler.num_steps=3",
        "sampler.window_range=[0,1]",
    ]
    assert main(["train", "--out", str(run), "--no-progress", *overrides]) == 0
    assert main(["eval", str(run), "--prompts", str(root / "eval.txt"), "--samples-per-prompt", "2"]) == 0
    return run


def card_parts(path: Path) -> tuple[dict, str]:
    """The front matter (parsed with yaml) and the body of a model card."""
    text = path.read_text()
    match = re.fullmatch(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def code_blocks(body: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", body, re.S)


def test_an_image_export_has_a_card_with_measures_and_a_diffusers_snippet_that_loads(image_run, tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(["export", str(image_run), "--out", str(out), "--license", "openrail++"]) == 0
    assert f"model card: {out / 'README.md'}" in capsys.readouterr().out
    meta, body = card_parts(out / "README.md")
    config = yaml.safe_load((image_run / "config.yaml").read_text())
    assert meta["base_model"] == config["model"] and meta["library_name"] == "diffusers"
    assert meta["license"] == "openrail++" and meta["pipeline_tag"] == "text-to-image"
    assert {"flowdppo", "flow-dppo", "lora", "text-to-image"} <= set(meta["tags"])

    # the protocol's measures with their CIs, the KL to the base, the epochs, the reward
    result = json.loads((image_run / "eval" / "eval.json").read_text())
    stats = result["summary"]["jpeg_incompressibility"]
    row = " | ".join(format_interval(stats[k], signed=k == "difference") for k in ("base", "trained", "difference"))
    assert f"| jpeg_incompressibility | {row} |" in body and "95% bootstrap CI" in body
    last = json.loads((image_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"{last['eval/kl_to_base']:.4g} on the evaluation samples" in body
    assert "epochs trained: 1 of 1" in body and "`jpeg_incompressibility` (weight 1)" in body
    assert yaml.safe_load(code_blocks(body, "yaml")[0]) == config

    # the sample grid it links is the run's; the diffusers snippet, as written (on the CPU), loads the adapter
    grid = re.search(r"!\[[^\]]*\]\(([^)]+)\)", body).group(1)
    assert (out / grid).read_bytes() == (image_run / "samples.png").read_bytes()
    (snippet,) = code_blocks(body, "python")
    assert f"pipe.load_lora_weights({str(out)!r}, weight_name='pytorch_lora_weights.safetensors')" in snippet
    namespace: dict = {}
    exec(snippet.replace('pipe.to("cuda")', 'pipe.to("cpu")'), namespace)
    transformer = namespace["pipe"].transformer
    loaded = {k: v for k, v in transformer.state_dict().items() if "lora_B" in k}
    exported = {k: v for k, v in load_file(str(out / "pytorch_lora_weights.safetensors")).items() if "lora_B" in k}
    assert len(loaded) == len(exported) > 0
    assert any(v.abs().sum() > 0 for v in loaded.values())  # the trained update, not an empty adapter
    assert "flowdppo export RUN" in body and "--format comfyui" in body  # how to get the ComfyUI file

    # the ComfyUI file exported into the same folder: the card (rewritten, it is ours) shows both loaders
    assert main(["export", str(image_run), "--out", str(out), "--format", "comfyui"]) == 0
    _, body = card_parts(out / "README.md")
    (nodes,) = [json.loads(block) for block in code_blocks(body, "json")]
    assert [node["inputs"]["lora_name"] for node in nodes.values()] == ["comfyui_lora.safetensors"]
    assert all(node["class_type"] == "LoraLoaderModelOnly" for node in nodes.values())
    assert (out / "comfyui_lora.safetensors").is_file() and "load_lora_weights" in code_blocks(body, "python")[0]

    # from the newest checkpoint: the card says so (its measures are of final/)
    assert main(["export", str(image_run), "--out", str(tmp_path / "checkpoint"), "--checkpoint"]) == 0
    _, body = card_parts(tmp_path / "checkpoint" / "README.md")
    assert "its checkpoint `epoch_000001`, not its final weights" in body


def test_a_digits_card_says_what_was_not_evaluated_and_its_snippet_loads_the_policy(tmp_path):
    run, trained = digits_run(tmp_path)
    out = tmp_path / "lora"
    assert main(["export", str(run), "--out", str(out)]) == 0
    meta, body = card_parts(out / "README.md")
    assert meta["library_name"] == "flowdppo" and meta["license"] == "other" and "base_model" not in meta
    assert {"flowdppo", "flow-dppo", "lora", "digits"} <= set(meta["tags"])
    assert "Protocol with CIs: not evaluated" in body and "The run's own evaluation: not evaluated." in body
    assert "not evaluated on the evaluation samples" in body and "epochs trained: 0 of" in body
    assert "## Samples" not in body and not (out / "samples.png").exists()  # the run has no grid
    (snippet,) = code_blocks(body, "python")
    namespace: dict = {}
    exec(snippet, namespace)
    x, sigma, labels = torch.randn(2, *trained.latent_shape), torch.full((2,), 0.5), torch.tensor([3, 7])
    with torch.no_grad():
        torch.testing.assert_close(namespace["policy"](x, sigma, labels), trained(x, sigma, labels))


def test_a_users_readme_and_samples_stay_and_a_bad_license_is_one_line(image_run, tmp_path, capsys):
    out = tmp_path / "lora"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    (out / "samples.png").write_bytes(b"my picture")
    assert main(["export", str(image_run), "--out", str(out)]) == 0
    assert (out / "README.md").read_text() == "# my notes\n" and (out / "samples.png").read_bytes() == b"my picture"
    _, body = card_parts(out / "MODEL_CARD.md")
    assert "](card_samples.png)" in body and (out / "card_samples.png").is_file()
    capsys.readouterr()

    other = tmp_path / "other"
    assert main(["export", str(image_run), "--out", str(other), "--license", "Apache 2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--license: 'Apache 2' is not a license identifier" in err
    assert not other.exists()


def test_two_experts_load_each_file_into_its_transformer(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    cfg = load_config(overrides=["task=text_to_video", "model=Wan-AI/Wan2.2-T2V-A14B-Diffusers", f"prompts={prompts}"])
    files = {
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_transformer_2.safetensors",
        "comfyui_lora.safetensors",
        "comfyui_lora_transformer_2.safetensors",
    }
    text = loading_text(cfg, "lora", files)
    assert "DiffusionPipeline.from_pretrained('Wan-AI/Wan2.2-T2V-A14B-Diffusers'" in text
    assert "pipe.load_lora_weights('lora', weight_name='pytorch_lora_weights.safetensors')\n" in text
    assert (
        "pipe.load_lora_weights('lora', weight_name='pytorch_lora_weights_transformer_2.safetensors', "
        "load_into_transformer_2=True)" in text
    )
    (nodes,) = [json.loads(block) for block in code_blocks(text, "json")]
    assert sorted(node["inputs"]["lora_name"] for node in nodes.values()) == sorted(
        f for f in files if f.startswith("comfyui")
    )
    assert "on the low-noise model" in text
