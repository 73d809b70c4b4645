"""End-to-end runs on the digits task: the reward moves, the alarms fire, the run folder is complete."""

import json
import math
import shutil

import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from flowdppo.algorithms.policy_gradient import PolicyGradient, replay_anchor
from flowdppo.cli import main
from flowdppo.config import load_config
from flowdppo.evaluate import evaluate_run, load_trained_policy
from flowdppo.policies.lora import make_trainable, trainable_parameters
from flowdppo.rollout import rollout
from flowdppo.samplers import trained_steps
from flowdppo.tasks.digits.policy import load_base_policy
from flowdppo.tasks.digits.task import DigitsTask
from flowdppo.trainer import ConsistencyError, train

FAST = ["prompts_per_epoch=10", "group_size=8", "eval_samples_per_class=10", "optim.lr=3e-3"]


def short_run(tmp_path, name, overrides, method="flow_dppo"):
    cfg = load_config(method, overrides=FAST + overrides)
    return train(cfg, tmp_path / name, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 8-epoch runs from the same seed: one maximising the classifier reward, one minimising it."""
    tmp = tmp_path_factory.mktemp("runs")
    common = ["epochs=8", "eval_every=8", "checkpoint_every=4"]
    up = short_run(tmp, "up", common)
    down = short_run(tmp, "down", common + ["reward.weights=[-1.0]"])
    return up, down


def test_reward_moves_with_the_reward_and_against_its_opposite(runs):
    up, down = runs
    base = up.load_json("base_eval.json")["eval/reward"]
    assert down.load_json("base_eval.json")["eval/reward"] == base  # same base, same eval noise
    final_up, final_down = up.rows()[-1]["eval/reward"], down.rows()[-1]["eval/reward"]
    assert final_up > base + 0.02, (base, final_up)
    assert final_down < base - 0.02, (base, final_down)
    assert up.rows()[-1]["kl_to_base"] > 0


def test_run_folder_files_exist_and_parse(runs):
    up, _ = runs
    path = up.path
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    assert cfg["loss"]["loss_mode"] == "flow_dppo" and cfg["epochs"] == 8
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(8))
    for key in ("reward_mean", "kl_to_base", "masked_fraction", "ratio_mean", "time_s", "kl_max", "grad_norm"):
        assert all(key in r for r in rows), key
    assert "eval/fid" in rows[-1] and "eval/accuracy" in rows[-1]
    for name in ("plots/curves.png", "plots/per_step.png", "samples.png", "final/pytorch_lora_weights.safetensors"):
        assert (path / name).stat().st_size > 0, name
    assert list((path / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (path / "checkpoints").iterdir()) == ["epoch_000004", "epoch_000008"]


def test_exported_lora_loads_in_a_stock_pipeline_and_reproduces_the_policy(runs):
    """``pipeline.load_lora_weights(final/)`` on a fresh base gives the trained policy's velocity."""
    up, _ = runs
    base_dir_policy = load_base_policy()
    pipe = StableDiffusion3Pipeline(
        transformer=base_dir_policy.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    x, sigma, cond = torch.randn(6, 1, 8, 8), torch.rand(6), torch.arange(6)
    before = base_dir_policy.velocity(x, sigma, cond)
    pipe.load_lora_weights(up.path / "final")
    after = base_dir_policy.velocity(x, sigma, cond)
    trained = load_trained_policy(up.path, DigitsTask(load_config()))
    torch.testing.assert_close(after, trained.velocity(x, sigma, cond))
    assert (after - before).abs().max() > 1e-4  # the adapter changes the model


def test_resume_continues_as_if_never_stopped(runs, tmp_path):
    """Drop the last checkpoint and its rows, resume: the metric rows come back identical."""
    up, _ = runs
    copy = tmp_path / "resumed"
    shutil.copytree(up.path, copy)
    shutil.rmtree(copy / "checkpoints" / "epoch_000008")
    shutil.rmtree(copy / "final")
    cfg = load_config(overrides=FAST + ["epochs=8", "eval_every=8", "checkpoint_every=4"])
    resumed = train(cfg, copy, resume=True, progress=False)
    drop = {"time_s"}
    original = [{k: v for k, v in r.items() if k not in drop} for r in up.rows()]
    again = [{k: v for k, v in r.items() if k not in drop} for r in resumed.rows()]
    assert again == original


def test_consistency_alarm_fires_when_rollout_and_replay_differ():
    cfg = load_config(overrides=FAST)
    task = DigitsTask(cfg)
    policy = task.policy
    make_trainable(policy, 4, 8.0, policy.lora_target_modules)
    cond, _ = task.prompts(2, 4, 0, 0)
    noise = torch.randn(8, 1, 8, 8)
    steps = trained_steps(cfg.sampler, 0, 0)
    traj = rollout(policy.velocity, cond, noise, task.sigmas(), cfg.sampler, steps, generator=torch.Generator())
    optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=1e-3)
    with torch.no_grad():  # the weights move between rollout and update: the anchor is stale
        for p in trainable_parameters(policy):
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(ConsistencyError, match="optim.anchor=replay"):
        PolicyGradient(cfg).update(policy, optimizer, traj, torch.randn(8), torch.Generator(), None, epoch=3)
    cfg.optim.anchor = "replay"  # recomputing the anchor with the current weights clears it
    PolicyGradient(cfg).update(policy, optimizer, traj, torch.randn(8), torch.Generator(), None, epoch=3)
    assert replay_anchor(policy, traj, cfg) is traj


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "x"), "loss.kl_mask_treshold=1e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean loss.kl_mask_threshold" in err
    assert main(["train", "--method", "ppo"]) == 2
    assert "method: must be one of" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method", ["flow_grpo", "flow_cps", "grpo_guard", "flow_dppo_cps", "dance_grpo", "diffusion_nft", "awm"]
)
def test_every_preset_trains(tmp_path, method):
    run = short_run(tmp_path, method, ["epochs=2", "eval_every=2", "optim.inner_epochs=2", "loss.beta=0.01"], method)
    rows = run.rows()
    assert len(rows) == 2 and all("ref_kl" in r for r in rows)
    assert rows[-1]["kl_to_base"] > 0


def test_full_finetuning_with_accumulation_and_replayed_anchor(tmp_path):
    overrides = [
        "epochs=2",
        "eval_every=2",
        "optim.lora_rank=0",
        "optim.grad_accum=2",
        "optim.anchor=replay",
        "loss.beta=0.01",
        "optim.lr=1e-4",
    ]
    run = short_run(tmp_path, "full", overrides)
    assert (run.path / "final" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert run.rows()[-1]["kl_to_base"] > 0 and run.rows()[-1]["ref_kl"] > 0
    results = evaluate_run(run.path, per_class=5)
    assert results["base"] != results["trained"]


@pytest.mark.parametrize("method,epochs", [("dance_grpo", 16), ("diffusion_nft", 8), ("awm", 8)])
def test_new_methods_raise_the_reward(tmp_path, method, epochs):
    """DanceGRPO learns slowest (one starting noise per group, a small eta): it gets twice the epochs."""
    run = short_run(tmp_path, method, [f"epochs={epochs}", f"eval_every={epochs}"], method)
    base, final = run.load_json("base_eval.json")["eval/reward"], run.rows()[-1]["eval/reward"]
    assert final > base + 0.05, (base, final)


@pytest.mark.parametrize("method", ["diffusion_nft", "awm"])
def test_likelihood_free_runs_resume_exactly_with_their_slow_weights(tmp_path, method):
    """The slow copy of the weights and the optimizer-step count are checkpointed: a resumed run is identical."""
    overrides = ["epochs=4", "eval_every=4", "checkpoint_every=2"]
    whole = short_run(tmp_path, "whole", overrides, method)
    assert (whole.path / "checkpoints" / "epoch_000002" / "algorithm.safetensors").is_file()
    copy = tmp_path / "resumed"
    shutil.copytree(whole.path, copy)
    shutil.rmtree(copy / "checkpoints" / "epoch_000004")
    shutil.rmtree(copy / "final")
    resumed = train(load_config(method, overrides=FAST + overrides), copy, resume=True, progress=False)
    rows = [{k: v for k, v in r.items() if k != "time_s"} for r in resumed.rows()]
    assert rows == [{k: v for k, v in r.items() if k != "time_s"} for r in whole.rows()]


def test_full_finetuning_reference_copies_only_the_transformer():
    """The frozen base of full fine-tuning is a copy of the transformer; the frozen rest is shared, not copied."""
    from flowdppo.policies.lora import reference_policy

    policy = DigitsTask(load_config(overrides=["optim.lora_rank=0"])).policy
    make_trainable(policy, 0, 1.0)
    reference = reference_policy(policy)
    assert reference.prompt_embeds is policy.prompt_embeds and reference.transformer is not policy.transformer
    assert not any(p.requires_grad for p in reference.parameters()) and policy.transformer.training is False
    x, sigma, cond = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(reference(x, sigma, cond), policy(x, sigma, cond), rtol=0, atol=1e-5)
        for p in policy.transformer.parameters():  # training moves the policy, not the reference
            p.mul_(1.1)
        assert (reference(x, sigma, cond) - policy(x, sigma, cond)).abs().max() > 1e-4


@pytest.mark.slow
def test_compiled_transformer_gives_the_same_training(tmp_path, monkeypatch):
    """optim.compile: torch.compile of the transformer (inductor on CPU) trains as the eager model does."""
    compiled = []
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self) or original(self))
    overrides = ["epochs=2", "eval_every=2"]
    eager = short_run(tmp_path, "eager", overrides).rows()
    assert not compiled
    fast = short_run(tmp_path, "compiled", overrides + ["optim.compile=true"]).rows()
    assert len(compiled) == 1 and compiled[0]._compiled_call_impl is not None  # the transformer, compiled
    for a, b in zip(eager, fast, strict=True):
        for key in ("reward_mean", "kl_to_base", "grad_norm", "loss", "eval/reward"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    """Recomputed activations give the gradients of stored ones: the same rows, within float rounding."""
    overrides = ["epochs=2", "eval_every=2", "optim.lora_rank=0", "optim.lr=1e-4"]
    plain = short_run(tmp_path, "plain", overrides).rows()
    checkpointed = short_run(tmp_path, "checkpointed", overrides + ["optim.gradient_checkpointing=true"]).rows()
    for a, b in zip(plain, checkpointed, strict=True):
        for key in ("reward_mean", "kl_to_base", "grad_norm", "loss", "eval/reward"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    policy = DigitsTask(load_config()).policy
    policy.enable_gradient_checkpointing()
    assert policy.transformer.gradient_checkpointing


@pytest.mark.parametrize(
    ("method", "per_sample", "extra"),
    [
        ("flow_dppo", 2, ["sampler.window_size=2"]),  # two trained SDE steps per sample
        ("diffusion_nft", 3, ["nft.train_timesteps=3", "nft.timesteps=stratified"]),  # three noise levels per sample
    ],
)
def test_rows_count_trained_elements_and_optimizer_steps(tmp_path, method, per_sample, extra):
    """4 prompts x 2 samples x ``per_sample`` elements, 2 passes; mini-batches of 4 elements, 2 per optimizer step:
    ``ceil(8 * per_sample / 4) / 2`` steps per pass (a last short window still steps)."""
    overrides = ["epochs=1", "prompts_per_epoch=4", "group_size=2", "eval_every=1000", "optim.inner_epochs=2"]
    overrides += ["optim.minibatch_size=4", "optim.grad_accum=2", *extra]
    row = train(load_config(method, overrides=overrides), tmp_path / "run", progress=False).rows()[0]
    elements = 4 * 2 * per_sample
    assert row["trained_elements"] == 2 * elements
    assert row["optimizer_steps"] == 2 * math.ceil(math.ceil(elements / 4) / 2)
