"""``flowdppo plan``: parameter counts and activation memory from meta-device models, checked against real models.

- the activation bytes the plan measures on the meta device (saved tensors of one forward) agree with the
  memory a real forward + backward allocates on CPU, measured independently with ``torch.profiler``
  (``profile_memory``): the bytes held at the end of the forward within 5%, the peak of forward + backward
  within 10%, for SD3 (latents ``(B, C, h, w)``) and FLUX.1 (packed tokens);
- gradient checkpointing gives a lower measured peak than without (the same gradients are checked in
  ``test_trainer.py``);
- ``flowdppo plan`` on a saved tiny pipeline prints the counts (the transformer's equals ``sum(p.numel())`` of
  the loaded model), and a missing model folder is one line and exit code 2.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from tiny_pipelines import save_tiny_pipeline
from torch.profiler import ProfilerActivity, profile, record_function

from flowdppo.cli import main
from flowdppo.config import load_config
from flowdppo.plan import DEFAULT_PROMPT, make_plan, make_trainable_as_train_does
from flowdppo.policies.pipelines import load_pipeline_policy

pytestmark = pytest.mark.usefixtures("one_thread")

RESOLUTION, ROWS = 32, 4
FAMILIES = ("sd3", "flux")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan_pipelines")
    return {family: save_tiny_pipeline(family, root / family) for family in FAMILIES}


def recipe(model: Path, *overrides: str):
    return load_config(
        overrides=[
            "task=text_to_image",
            f"model={model}",
            f"resolution={RESOLUTION}",
            f"optim.minibatch_size={ROWS}",
            *overrides,
        ]
    )


def measured_bytes(policy, checkpointing: bool) -> tuple[int, int]:
    """(held at the end of the forward, peak of forward + backward) in bytes above the start, from the profiler's
    allocation events of one training forward + backward of ``ROWS`` rows on CPU."""
    if checkpointing:
        policy.enable_gradient_checkpointing()
    encode = getattr(policy, "encode_text", policy.encode_prompts)
    with torch.no_grad():
        embeds = {k: t.expand(ROWS, *t.shape[1:]).contiguous() for k, t in encode([DEFAULT_PROMPT]).items()}
        x, sigma = torch.randn(ROWS, *policy.latent_shape), torch.full((ROWS,), 0.5)
        policy.transformer_output(x, sigma, embeds)  # caches (rotary tables) made once, as in training
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("training_forward"):
            out = policy.transformer_output(x, sigma, embeds)
        out.float().square().mean().backward()
    events = prof.profiler.kineto_results.events()
    forward_end = max(e.end_ns() for e in events if e.name() == "training_forward")
    level = peak = held = 0
    for start, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        level += nbytes
        peak = max(peak, level)
        held = level if start <= forward_end else held
    return held, peak


@pytest.mark.parametrize("family", FAMILIES)
def test_estimated_activations_match_a_measured_cpu_backward(family, model_dirs):
    cfg = recipe(model_dirs[family])
    plan = make_plan(cfg, variants=False)
    estimates = dict(zip((False, True), plan.activations[("float32", cfg.optim.lora_rank)], strict=True))
    peaks = {}
    for checkpointing, estimate in estimates.items():
        policy = load_pipeline_policy(str(model_dirs[family]), RESOLUTION, torch.float32, "cpu")
        make_trainable_as_train_does(policy, cfg, cfg.optim.lora_rank)
        held, peaks[checkpointing] = measured_bytes(policy, checkpointing)
        assert held == pytest.approx(estimate.kept, rel=0.05), (family, checkpointing)
        assert peaks[checkpointing] == pytest.approx(estimate.peak, rel=0.10), (family, checkpointing)
    assert peaks[True] < 0.9 * peaks[False]  # checkpointing: a lower measured peak
    assert estimates[True].peak < estimates[False].peak


def test_plan_prints_the_counts_of_the_loaded_model(model_dirs, tmp_path, capsys):
    model = model_dirs["flux"]
    config = tmp_path / "recipe.yaml"
    config.write_text(
        yaml.safe_dump(
            {"task": "text_to_image", "model": str(model), "resolution": RESOLUTION, "sampler": {"guidance_scale": 3.0}}
        )
    )
    assert main(["plan", "--config", str(config), "optim.minibatch_size=4", "optim.lora_rank=0"]) == 0
    out = capsys.readouterr().out
    loaded = load_pipeline_policy(str(model), RESOLUTION, torch.float32, "cpu")
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        count = sum(p.numel() for p in getattr(loaded.pipeline, name).parameters())
        assert f" {count:,} " in out, name
    assert "full transformer" in out and "x 2 (guidance" in out and "reference transformer" in out
    assert "24 GB: fits as is" in out and "activations (measured)" in out


def test_plan_of_a_missing_model_folder_is_one_line(tmp_path, capsys):
    code = main(["plan", "task=text_to_image", f"model={tmp_path / 'no_such_model'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no_such_model" in err


@pytest.mark.parametrize(
    ("family", "override", "message"),
    [
        (
            "sd3",
            "resolution=2048",
            r"resolution: at most 512 for this model \(its position embedding covers 32 patches "
            r"per axis: pos_embed_max_size 32\), got 2,048",
        ),
        (
            "flux",
            "resolution=1048576",
            r"resolution: one sample \(4,294,967,296 tokens\) needs at least [\d.]+ TiB, more "
            r"than the 78.50 GiB of the largest GPU planned \(80 GB\); make it smaller",
        ),
        (
            "flux",
            "optim.lora_rank=1000000000",
            r"optim\.lora_rank: at most 32 for these layers \(.* is 32 -> 32: a higher "
            r"rank adds nothing\), got 1,000,000,000",
        ),
    ],
)
def test_absurd_sizes_are_one_line_before_anything_is_allocated(model_dirs, capsys, family, override, message):
    code = main(["plan", "task=text_to_image", f"model={model_dirs[family]}", override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
