"""The pinned text-to-image evaluation protocol (``flowdppo eval RUN --prompts FILE``, ``protocol.py``).

- on a 1-epoch run of the tiny SD3 pipeline: the result JSON holds the protocol (sampler, steps, CFG,
  resolution, seeds, prompt file hash and count, K, rewards, model and adapter fingerprints, versions) and every
  sample's scores; the same command twice gives identical scores; ``--report`` prints the same table with the
  model loaders patched to fail;
- a prompt's noise is ``sample_noise(seed, text, occurrence, k)``: prompts added to the file leave the others'
  noise (and scores) unchanged, and two copies of one prompt get different noise;
- the bootstrap CI against closed forms (two values) and the large-sample normal interval, its paired difference
  excluding 0 for a shift and including it for none;
- the model fingerprint follows the transformer's bytes and reads no hub-cache blob;
- bad inputs: one line, exit 2, before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_pipelines import save_tiny_pipeline

from flowdppo import protocol
from flowdppo.cli import main
from flowdppo.protocol import folder_fingerprint, sample_noise
from flowdppo.protocol_report import RESULT_FORMAT
from flowdppo.protocol_stats import bootstrap_mean_ci, excludes_zero, summarize
from flowdppo.tasks.text_to_image import TextToImageTask

pytestmark = pytest.mark.usefixtures("one_thread")

RESOLUTION = 32
TRAIN_PROMPTS = ["a red 'cat'", "two dogs on a beach", "a blue house", "a green apple"]
EVAL_PROMPTS = ["a red 'cat'", "a yellow car", "a red 'cat'"]  # a duplicate: its second copy has its own noise
MORE_PROMPTS = ["a purple cow", "a red 'cat'", "a yellow car", "a tree at night", "a red 'cat'"]  # EVAL's + 2 new
REWARDS = "jpeg_incompressibility,user_rewards:prompt_length"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 1-epoch LoRA run of the tiny SD3 pipeline (CFG 2 with a negative prompt)."""
    root = tmp_path_factory.mktemp("protocol")
    model = save_tiny_pipeline("sd3", root / "sd3")
    prompts = root / "train.txt"
    prompts.write_text("\n".join(TRAIN_PROMPTS) + "\n")
    out = root / "run"
    code = main(
        [
            "train",
            "--out",
            str(out),
            "--no-progress",
            "task=text_to_image",
            f"model={model}",
            f"prompts={prompts}",
            "eval_prompts=1",
            f"resolution={RESOLUTION}",
            "epochs=1",
            "prompts_per_epoch=2",
            "group_size=2",
            "eval_samples_per_class=1",
            "optim.minibatch_size=4",
            "optim.lr=1e-2",
            "reward.names=[jpeg_incompressibility, user_rewards:prompt_length]",
            "reward.weights=[1, 1]",
            "sampler.num_steps=3",
            "sampler.window_range=[0,1]",
            "sampler.guidance_scale=2.0",
            "negative_prompt=blurry",
        ]
    )
    assert code == 0
    return out


def prompt_file(folder: Path, name: str, prompts: list[str]) -> Path:
    path = folder / name
    path.write_text("\n".join(prompts) + "\n")
    return path


def evaluate(run: Path, prompts: Path, out: Path, capsys, *extra: str) -> tuple[dict, str]:
    capsys.readouterr()
    code = main(
        [
            "eval",
            str(run),
            "--prompts",
            str(prompts),
            "--rewards",
            REWARDS,
            "--samples-per-prompt",
            "2",
            "--out",
            str(out),
            *extra,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    return json.loads(out.read_text()), printed


def test_eval_writes_the_protocol_is_seeded_and_report_reprints_it(run, tmp_path, capsys, monkeypatch):
    prompts = prompt_file(tmp_path, "eval.txt", EVAL_PROMPTS)
    first, printed = evaluate(run, prompts, tmp_path / "first.json", capsys)
    second, _ = evaluate(run, prompts, tmp_path / "first.json", capsys, "--overwrite")  # replaces the first

    p = first["protocol"]
    assert first["format"] == RESULT_FORMAT and first["prompts"] == EVAL_PROMPTS
    assert (p["sampler"], p["steps"], p["guidance_scale"], p["resolution"]) == ("ode", 3, 2.0, RESOLUTION)
    assert (p["negative_prompt"], p["seed"], p["samples_per_prompt"]) == ("blurry", 0, 2)
    assert p["prompts_count"] == 3 and p["prompts_sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    assert p["rewards"] == REWARDS.split(",")
    assert p["bootstrap"]["resamples"] == 10_000 and p["bootstrap"]["seed"] == 0
    lora = run / "final" / "pytorch_lora_weights.safetensors"
    assert p["adapter"]["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    model = Path(p["model"]["model"])
    assert p["model"]["source"] == "folder" and p["model"]["sha256"] == folder_fingerprint(model)["sha256"]
    assert p["model"]["files"] >= 3 and p["model"]["weights"] == "file bytes"
    assert {"flowdppo", "torch", "diffusers"} <= p["versions"].keys()
    for policy in ("base", "trained"):
        for name in p["rewards"]:
            scores = np.asarray(first["scores"][policy][name])
            assert scores.shape == (3, 2) and np.isfinite(scores).all()
    assert first["summary"].keys() == set(p["rewards"])
    length = np.asarray(first["scores"]["base"]["user_rewards:prompt_length"]).mean(axis=1)
    assert first["summary"]["user_rewards:prompt_length"]["base"]["mean"] == pytest.approx(length.mean(), rel=1e-12)
    assert first["scores"]["base"] != first["scores"]["trained"]  # the adapter is on for "trained" only
    assert first["sample_seeds"][2] == [protocol.sample_seed(0, "a red 'cat'", 1, k) for k in (0, 1)]

    assert second["scores"] == first["scores"] and second["summary"] == first["summary"]  # seeded: bit for bit
    assert "user_rewards:prompt_length" in printed and "trained - base" in printed

    monkeypatch.chdir(tmp_path)  # also: no user_rewards import is needed to re-render
    no_model_loaded(monkeypatch)
    assert main(["eval", "--report", str(tmp_path / "first.json")]) == 0
    table = printed.rsplit("\nwrote ", 1)[0] + "\n"
    assert capsys.readouterr().out == table


def no_model_loaded(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    from diffusers import DiffusionPipeline

    monkeypatch.setattr("flowdppo.tasks.load_task", refuse)
    monkeypatch.setattr("flowdppo.tasks.text_to_image.load_pipeline_policy", refuse)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(DiffusionPipeline, "load_config", refuse)


def test_adding_prompts_leaves_each_prompts_noise_and_scores(run, tmp_path, capsys, monkeypatch):
    """The initial noise of (text, occurrence, k) is the same in a file with more prompts, in other positions."""
    seen: list[tuple[list[str], torch.Tensor]] = []
    generate = TextToImageTask.generate

    def recording(self, velocity, noise, cond):
        seen.append((list(cond.text), noise.clone()))
        return generate(self, velocity, noise, cond)

    monkeypatch.setattr(TextToImageTask, "generate", recording)
    small, _ = evaluate(run, prompt_file(tmp_path, "small.txt", EVAL_PROMPTS), tmp_path / "small.json", capsys)
    small_noise = noise_by_sample(seen)
    seen.clear()
    large, _ = evaluate(run, prompt_file(tmp_path, "large.txt", MORE_PROMPTS), tmp_path / "large.json", capsys)
    large_noise = noise_by_sample(seen)

    assert small_noise.keys() <= large_noise.keys() and len(large_noise) == 2 * len(MORE_PROMPTS)
    for key, noise in small_noise.items():
        assert torch.equal(noise, large_noise[key]), key
        assert torch.equal(noise, sample_noise(0, *key, noise.shape)), key  # a function of (seed, text, occ, k)
    assert not torch.equal(small_noise["a red 'cat'", 0, 0], small_noise["a red 'cat'", 1, 0])  # the duplicate

    where = {0: 1, 1: 2, 2: 4}  # EVAL_PROMPTS[i] is MORE_PROMPTS[where[i]] (same text, same occurrence)
    for policy in ("base", "trained"):
        for name in REWARDS.split(","):
            for i, j in where.items():
                np.testing.assert_allclose(
                    small["scores"][policy][name][i], large["scores"][policy][name][j], rtol=0, atol=1e-5
                )


def noise_by_sample(calls) -> dict[tuple[str, int, int], torch.Tensor]:
    """``{(text, occurrence, k): noise}`` from the recorded ``generate`` calls (prompt-major, k-minor rows)."""
    found: dict[tuple[str, int, int], torch.Tensor] = {}
    for texts, noise in calls:
        counts: dict[str, int] = {}
        for text, row in zip(texts, noise, strict=True):
            index = counts.get(text, 0)
            counts[text] = index + 1
            key = (text, index // 2, index % 2)  # 2 samples per prompt: the n-th row of a text is (n // 2, n % 2)
            assert key not in found or torch.equal(found[key], row)  # base and trained: the same noise
            found[key] = row
    return found


# --------------------------------------------------------------------------------------------------------------------
# the bootstrap
# --------------------------------------------------------------------------------------------------------------------


def test_bootstrap_of_two_values_has_its_closed_form():
    """Values (0, 1): a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so the 95% interval is
    [0, 1] and the 40% interval (quantiles 0.3, 0.7) is [1/2, 1/2]; one value: a zero-width interval."""
    assert bootstrap_mean_ci([0.0, 1.0]) == {"mean": 0.5, "low": 0.0, "high": 1.0}
    assert bootstrap_mean_ci([0.0, 1.0], confidence=0.4) == {"mean": 0.5, "low": 0.5, "high": 0.5}
    assert bootstrap_mean_ci([3.0]) == {"mean": 3.0, "low": 3.0, "high": 3.0}


def test_bootstrap_matches_the_normal_interval_and_is_seeded():
    """n = 400 normal values: the percentile interval ~ mean -/+ 1.96 sd / sqrt(n) (sd with 1/n: the bootstrap
    distribution's own), within 5% of the half-width; the same seed gives the same interval, any chunking."""
    values = np.random.default_rng(7).normal(2.0, 3.0, size=400)
    ci = bootstrap_mean_ci(values, resamples=20_000, seed=1)
    half = 1.959964 * values.std() / math.sqrt(values.size)
    assert ci["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert ci["low"] == pytest.approx(values.mean() - half, abs=0.05 * half)
    assert ci["high"] == pytest.approx(values.mean() + half, abs=0.05 * half)
    assert bootstrap_mean_ci(values, resamples=20_000, seed=1, chunk=7) == ci
    assert bootstrap_mean_ci(values, resamples=20_000, seed=2) != ci


def test_paired_difference_excludes_zero_for_a_shift_and_includes_it_for_none():
    """Per-prompt means of K = 3 samples; the difference is paired by prompt, so a 0.2 shift on prompts whose
    scores spread with sd 1 is found, and a zero-mean perturbation is not."""
    rng = np.random.default_rng(0)
    prompts = rng.normal(0.0, 1.0, size=(60, 1))
    base = prompts + rng.normal(0.0, 0.1, size=(60, 3))
    wiggle = rng.normal(0.0, 0.1, size=(60, 3))
    shifted, unchanged = base + 0.2 + wiggle, base + wiggle - wiggle.mean()
    for trained, shift in ((shifted, True), (unchanged, False)):
        scores = {"base": {"r": base.tolist()}, "trained": {"r": trained.tolist()}}
        stats = summarize(scores, ["r"], resamples=5_000)["r"]
        assert excludes_zero(stats["difference"]) is shift
        assert stats["difference"]["mean"] == pytest.approx(trained.mean() - base.mean(), abs=1e-12)
        assert stats["base"]["low"] < 0.0 < stats["base"]["high"]  # the prompts' spread: the unpaired CIs overlap 0
    assert summarize({"base": {"r": base.tolist()}, "trained": {"r": unchanged.tolist()}}, ["r"], resamples=5_000)["r"][
        "difference"
    ]["mean"] == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------------------------------


def test_model_fingerprint_follows_the_transformer_and_reads_no_hub_blob(run, tmp_path, monkeypatch):
    source = Path(protocol_model(run))
    copy = Path(shutil.copytree(source, tmp_path / "copy"))
    assert folder_fingerprint(copy) == folder_fingerprint(source)  # paths are relative to the folder
    weights = next((copy / "transformer").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert folder_fingerprint(copy)["sha256"] != folder_fingerprint(source)["sha256"]

    # a hub-cache snapshot: the weights file links to a blob named by its content's sha256
    blob = tmp_path / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir()
    shutil.move(weights, blob)
    os.symlink(blob, weights)
    read = []
    real = protocol.sha256_file
    monkeypatch.setattr(protocol, "sha256_file", lambda path: read.append(Path(path).name) or real(path))
    found = folder_fingerprint(copy)
    assert found["weights"] == "hub blob ids (content sha256)" and weights.name not in read and read


def protocol_model(run: Path) -> str:
    from flowdppo.evaluate import run_config

    return run_config(run).model


# --------------------------------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--prompts", "{tmp}/missing.txt"], "--prompts: no such file"),
        (["--prompts", "{tmp}"], "is a folder; give a prompt file: .txt (one prompt per line) or .jsonl"),
        (
            ["--prompts", "{tmp}/eval.txt", "--rewards", "jpeg_incompressibility,sharpness"],
            "--rewards: unknown reward 'sharpness'",
        ),
        (["--prompts", "{tmp}/eval.txt", "--rewards", "no_such_module:reward"], "--rewards: cannot import"),
        (["--prompts", "{tmp}/eval.txt", "--samples-per-prompt", "0"], "--samples-per-prompt: must be at least 1"),
        (["--prompts", "{tmp}/eval.txt", "--per-class", "3"], "--per-class:"),
        (["--samples-per-prompt", "2"], "--samples-per-prompt: only with --prompts"),
        (["--overwrite"], "--overwrite: replaces an --out result; give --out FILE.json"),
        (["--prompts", "{tmp}/eval.txt", "--out", "{tmp}/other.json"], "holds an earlier result; give --overwrite"),
        (["--prompts", "{tmp}/eval.txt", "--out", "{tmp}"], "is a folder; give a file name"),
        (["--report", "{tmp}/eval.txt"], "is not a flowdppo eval result (not JSON"),
        (["--report", "{tmp}/other.json"], "is not a flowdppo eval result"),
        (["--report", "{tmp}/missing.json"], "--report: no such file"),
        (["--report", "{tmp}/damaged.json"], "is a damaged eval result"),
    ],
)
def test_bad_inputs_are_one_line_before_any_model_loads(run, tmp_path, capsys, monkeypatch, arguments, message):
    prompt_file(tmp_path, "eval.txt", EVAL_PROMPTS)
    (tmp_path / "other.json").write_text(json.dumps({"base": {"eval/x": 1.0}}))
    damaged = dict.fromkeys(("run", "protocol", "prompts", "scores", "summary"), 3)
    (tmp_path / "damaged.json").write_text(json.dumps({"format": RESULT_FORMAT, **damaged}))
    no_model_loaded(monkeypatch)
    given = [a.format(tmp=tmp_path) for a in arguments]
    code = main(["eval", *([] if "--report" in given else [str(run)]), *given])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_run_without_final_weights_or_of_digits_is_one_line(run, tmp_path, capsys, monkeypatch):
    from flowdppo.config import load_config, save_config

    unfinished = Path(shutil.copytree(run, tmp_path / "unfinished", ignore=shutil.ignore_patterns("final")))
    digits = tmp_path / "digits"
    digits.mkdir()
    save_config(load_config(), digits / "config.yaml")
    prompts = prompt_file(tmp_path, "eval.txt", EVAL_PROMPTS)
    no_model_loaded(monkeypatch)
    for folder, message in ((unfinished, "has no final weights (final/)"), (digits, "is a digits run")):
        capsys.readouterr()
        assert main(["eval", str(folder), "--prompts", str(prompts)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_full_fine_tuning_run_compares_final_with_the_model(run, tmp_path, capsys):
    """optim.lora_rank=0: the trained policy is final/ (a whole pipeline), the base the run's model."""
    from flowdppo.evaluate import run_config

    cfg = run_config(run)
    out = tmp_path / "full"
    code = main(
        [
            "train",
            "--out",
            str(out),
            "--no-progress",
            "task=text_to_image",
            f"model={cfg.model}",
            f"text_to_image.prompts={cfg.text_to_image.prompts}",
            "eval_prompts=1",
            f"resolution={RESOLUTION}",
            "epochs=1",
            "prompts_per_epoch=2",
            "group_size=2",
            "eval_samples_per_class=1",
            "optim.minibatch_size=4",
            "optim.lr=1e-3",
            "optim.lora_rank=0",
            "reward.names=[user_rewards:prompt_length]",
            "sampler.num_steps=3",
            "sampler.window_range=[0,1]",
        ]
    )
    assert code == 0
    result, _ = evaluate(
        run=out, prompts=prompt_file(tmp_path, "eval.txt", EVAL_PROMPTS), out=tmp_path / "r.json", capsys=capsys
    )
    adapter = result["protocol"]["adapter"]
    assert adapter["path"] == str(out / "final") and adapter["sha256"] != result["protocol"]["model"]["sha256"]
    assert result["scores"]["base"] != result["scores"]["trained"]
