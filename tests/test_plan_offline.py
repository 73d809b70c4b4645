"""``flowdppo plan`` with no network (``plan_sources.py``).

- every recipe of ``examples/`` (SD3.5, FLUX.1, Qwen-Image, Wan 2.1, Wan 2.2 A14B with two experts) builds from the
  architecture configs shipped in the package, with the hub offline and no socket opened, with the published
  parameter counts; the CLI prints its estimate in a fresh process with ``HF_HUB_OFFLINE=1`` and an empty hub cache
  (SD3.5 here; every recipe with ``-m slow``);
- a hub id that is neither shipped nor cached fails at once in one line that names the cause (offline, or the hub
  not answering) and asks for a local folder, exit code 2; one in the hub cache is read from there.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flowdppo.cli import main
from flowdppo.config import load_config
from flowdppo.plan import format_plan, make_plan
from flowdppo.plan_meta import meta_policy, parameter_count
from flowdppo.plan_sources import plan_model, shipped_models
from flowdppo.policies.lora import experts

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
B = 1e9
# published sizes (billions of parameters) of each recipe's models: the shipped configs must build them
PUBLISHED = {
    "sd35_pickscore_flowdppo": {"transformer": 2.24, "text_encoder_3": 4.76, "text_encoder_2": 0.695},
    "flux_pickscore_clip_flowdppo": {"transformer": 11.9, "text_encoder_2": 4.76, "text_encoder": 0.123},
    "qwen_image_ocr_lora_flowdppo": {"transformer": 20.4, "text_encoder": 8.29},
    "wan21_t2v_flowdppo": {"transformer": 1.42, "text_encoder": 5.68},
    "wan22_t2v_a14b_flowdppo": {"transformer": 14.3, "transformer_2": 14.3, "text_encoder": 5.68},
}


@pytest.fixture
def no_network(monkeypatch):
    """The hub offline, and any socket connection refused."""
    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise AssertionError("plan opened a network connection")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_the_example_recipes_hub_ids_are_shipped():
    recipes = {p.stem: load_config(config_file=p) for p in sorted((ROOT / "examples").glob("*.yaml"))}
    assert set(recipes) == set(PUBLISHED)
    assert {cfg.model for cfg in recipes.values()} <= set(shipped_models())


def recipe_config(recipe: str, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes' prompt files are relative to the repository
    return load_config(config_file=f"examples/{recipe}.yaml")


@pytest.mark.parametrize("recipe", sorted(PUBLISHED))
def test_every_example_recipe_builds_offline_with_the_published_sizes(recipe, no_network, monkeypatch):
    cfg = recipe_config(recipe, monkeypatch)
    policy = meta_policy(replace(cfg, model=plan_model(cfg.model)), torch.bfloat16)
    for name, billions in PUBLISHED[recipe].items():
        assert parameter_count(getattr(policy.pipeline, name)) == pytest.approx(billions * B, rel=0.01), name
    if recipe.startswith("wan22"):  # two experts, switching at the released boundary
        assert list(experts(policy)) == ["transformer", "transformer_2"] and policy.boundary_ratio == 0.875


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(PUBLISHED))
def test_every_example_recipe_plans_offline(recipe, no_network, monkeypatch):
    cfg = recipe_config(recipe, monkeypatch)
    plan = make_plan(cfg)
    text = format_plan(plan)
    assert f"at {cfg.model} (its architecture as shipped with flowdppo)" in text
    assert "peak" in text and "80 GB: " in text
    if recipe.startswith("wan22"):  # both experts, each with its LoRA adapter
        assert plan.trained_experts == ["transformer", "transformer_2"] and "transformer_2" in text


def run_cli(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m flowdppo ARGS`` in a fresh process: hub offline, an empty hub cache, one thread."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flowdppo", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    return done, time.perf_counter() - start


def test_plan_prints_its_estimate_offline_and_an_unknown_hub_id_is_one_line(tmp_path):
    done, _ = run_cli(tmp_path, "plan", "--config", "examples/sd35_pickscore_flowdppo.yaml")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "peak (max of activations, encoding)" in done.stdout and "24 GB: " in done.stdout

    done, seconds = run_cli(tmp_path, "plan", "task=text_to_image", "model=someone/no-such-model")
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr[-2000:]
    assert "model: someone/no-such-model is neither a local folder nor in the Hugging Face cache" in err[0]
    assert "HF_HUB_OFFLINE is set" in err[0] and "give a local pipeline folder (model=PATH" in err[0]
    assert seconds < 300  # the start of a process that imports torch and diffusers, no retries (generous: loaded CI)


def test_a_hub_that_does_not_answer_is_named_at_once(monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    class NoRoute:
        def head(self, url, timeout):
            assert timeout <= 5
            raise OSError("Network is unreachable")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: NoRoute())
    assert main(["plan", "task=text_to_image", "model=someone/no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached (OSError: no network?)" in err


def test_a_cached_hub_id_is_read_from_the_cache(tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--someone--cached-model" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    (tmp_path / "models--someone--cached-model" / "refs").mkdir()
    (tmp_path / "models--someone--cached-model" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert plan_model("someone/cached-model") == str(snapshot)
    assert plan_model("stabilityai/stable-diffusion-3.5-medium").endswith("stabilityai--stable-diffusion-3.5-medium")
