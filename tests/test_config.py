"""Configs: presets, YAML + dotted overrides, and errors that name the key and the allowed values."""

import re

import pytest

from flowdppo.config import PRESETS, ConfigError, config_from_dict, load_config, to_dict


def test_presets_carry_the_public_defaults():
    dppo = load_config()
    assert (dppo.method, dppo.loss.loss_mode, dppo.loss.kl_mask_threshold) == ("flow_dppo", "flow_dppo", 1e-5)
    assert (dppo.sampler.kind, dppo.sampler.eta, dppo.algorithm) == ("flow_sde", 0.7, "policy_gradient")
    grpo = load_config("flow_grpo")
    assert (grpo.loss.loss_mode, grpo.loss.clip_range, grpo.loss.adv_clip_max) == ("flow_grpo", 1e-4, 5.0)
    cps = load_config("flow_cps")
    assert (cps.sampler.kind, cps.sampler.eta, cps.sampler.logprob_convention) == ("cps", 0.8, "cps")
    assert load_config("grpo_guard").loss.clip_range == 2e-6
    dppo_cps = load_config("flow_dppo_cps")
    assert (dppo_cps.sampler.kind, dppo_cps.loss.loss_mode) == ("cps", "flow_dppo")
    dance = load_config("dance_grpo")
    assert (dance.sampler.kind, dance.sampler.eta, dance.sampler.group_shared_noise) == ("dance_sde", 0.3, True)
    assert (dance.algorithm, dance.loss.loss_mode) == ("policy_gradient", "flow_grpo")
    nft = load_config("diffusion_nft")
    assert (nft.algorithm, nft.sampler.kind, nft.sampler.kl_kernel, nft.loss.beta) == (
        "diffusion_nft",
        "ode",
        "flow_sde",
        1e-4,
    )
    assert (nft.nft.b, nft.nft.adv_clip_max, nft.nft.train_timesteps, nft.nft.timesteps) == (1.0, 5.0, 9, "schedule")
    awm = load_config("awm")
    assert (awm.algorithm, awm.awm.clip_range, awm.awm.weighting, awm.awm.ema_kl) == ("awm", 1.0, "ghuber", 1.0)
    control = load_config("unconstrained")
    assert (control.loss.loss_mode, control.sampler.kind, control.sampler.eta) == ("unconstrained", "flow_sde", 0.7)
    assert set(PRESETS) == {
        "flow_dppo",
        "flow_grpo",
        "flow_cps",
        "grpo_guard",
        "flow_dppo_cps",
        "dance_grpo",
        "diffusion_nft",
        "awm",
        "dgpo",
        "crd",
        "opd",
        "unconstrained",
        "diffusion_dpo",
        "diffusion_dpo_offline",
        "sft",
        "rft",
    }


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: flow_grpo\nepochs: 7\nloss:\n  clip_range: 3e-4\noptim:\n  lr: 1e-3\n")
    cfg = load_config(
        config_file=path,
        overrides=["loss.clip_range=5e-4", "reward.names=[classifier_prob, ink]", "reward.weights=[1, 0.5]"],
    )
    assert cfg.method == "flow_grpo" and cfg.epochs == 7 and cfg.optim.lr == 1e-3
    assert cfg.loss.clip_range == 5e-4  # command line wins over the file
    assert cfg.reward.names == ["classifier_prob", "ink"] and cfg.reward.weights == [1.0, 0.5]
    assert config_from_dict(to_dict(cfg)) == cfg  # a saved config loads back identically


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["loss.kl_mask_treshold=1e-4"],
            "unknown config key 'loss.kl_mask_treshold' (did you mean loss.kl_mask_threshold?)",
        ),
        (["epochs=ten"], "epochs: expected int, got 'ten'"),
        (["loss.kl_mask_threshold=-1e-5"], "loss.kl_mask_threshold: must be > 0"),
        (["sampler.kind=euler"], "sampler.kind: must be one of flow_sde, cps, dance_sde, ode"),
        (["group_size=1"], "group_size: must be >= 2"),
        (["sampler.eta=3.0"], "sampler.eta: must be in"),
        (["sampler.window_size=9"], "does not fit the 10-step schedule"),
        (["sampler.window_mode=progressive", "sampler.window_range=[0, 10]"], "does not fit the 10-step schedule"),
        (["sampler.window_shift_every=0"], "sampler.window_shift_every: must be > 0"),
        (["reward.weights=[1, 2]"], "reward.weights: need one weight per reward name"),
        (["epochs"], "must look like key=value"),
        (["optim.fsdp=true"], "optim.fsdp: shards the full transformer, for full fine-tuning only"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "method,overrides,message",
    [
        ("flow_dppo", ["sampler.kind=ode"], "sampler.kind: flow_dppo trains per-step log-probabilities, which an ode"),
        (
            "diffusion_nft",
            ["loss.kl_mask_threshold=1e-4"],
            "loss.kl_mask_threshold: the diffusion_nft algorithm does not use it (it reads nft.*, loss.beta)",
        ),
        ("awm", ["loss.clip_range=0.2"], "loss.clip_range: the awm algorithm does not use it"),
        ("awm", ["nft.b=0.5"], "nft.b: the awm algorithm does not use it"),
        ("flow_dppo", ["awm.ema_kl=0.5"], "awm.ema_kl: the policy_gradient algorithm does not use it"),
        ("diffusion_nft", ["nft.b=0"], "nft.b: must be > 0"),
        ("diffusion_nft", ["nft.b=-1"], "nft.b: must be > 0"),
        ("diffusion_nft", ["nft.train_timesteps=11"], "nft.train_timesteps: schedule draws at most 10 levels"),
        (
            "awm",
            ["awm.train_timesteps=9"],
            "awm.train_timesteps: stratified draws at most 8 levels from a 10-step schedule at "
            "awm.timestep_fraction 0.9, got 9",
        ),
        ("awm", ["awm.timestep_fraction=1.5"], "awm.timestep_fraction: must be in (0, 1], got 1.5"),
        ("diffusion_nft", ["sampler.kl_kernel=rollout"], "sampler.kl_kernel: an ode rollout has no stochastic kernel"),
        ("diffusion_nft", ["optim.fsdp=true", "optim.lora_rank=0"], "optim.fsdp: not supported by diffusion_nft"),
        ("dance_grpo", ["sampler.eta=2.5"], "sampler.eta: must be in (0.0, 2.0] for sampler.kind dance_sde"),
        ("flow_dppo", ["sampler.logprob_convention=cps"], "sampler.logprob_convention cps needs sampler.kind cps"),
        ("diffusion_nft", ["nft.old_decay_max=2"], "nft.old_decay_max: must be in [0, 1]"),
        ("awm", ["awm.ema_decay_max=1.5"], "awm.ema_decay_max: must be in [0, 1]"),
        ("awm", ["awm.ema_decay_rate=-0.1"], "awm.ema_decay_rate: must be >= 0"),
        ("flow_dppo", ["optim.lora_alpha=0"], "optim.lora_alpha: must not be 0 with LoRA"),
        ("flow_dppo", ["stall_epochs=-1"], "stall_epochs: must be >= 0"),
        ("flow_dppo", ["sampler.kind=flow_sd"], "got 'flow_sd' (did you mean flow_sde?)"),
        ("flow_grp", [], "method: must be one of"),
    ],
)
def test_bad_sampler_algorithm_combinations_name_the_key(method, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(method, overrides=overrides)
    assert message in str(err.value)


def test_likelihood_free_methods_take_any_sampler_and_their_own_keys():
    cfg = load_config(
        "diffusion_nft", overrides=["sampler.kind=flow_sde", "sampler.kl_kernel=rollout", "nft.b=0.1", "loss.beta=0.01"]
    )
    assert (cfg.sampler.kind, cfg.nft.b, cfg.loss.beta) == ("flow_sde", 0.1, 0.01)
    assert load_config("awm", overrides=["sampler.kind=cps", "sampler.eta=0.8", "awm.weighting=t"]).awm.weighting == "t"


def test_incompatible_sampler_and_method():
    with pytest.raises(ConfigError, match="grpo_guard needs sampler.kind flow_sde"):
        load_config("grpo_guard", overrides=["sampler.kind=cps", "sampler.eta=0.8"])
    with pytest.raises(ConfigError, match="flow_cps needs sampler.logprob_convention cps"):
        load_config("flow_cps", overrides=["sampler.logprob_convention=gaussian"])
    with pytest.raises(ConfigError, match="method: must be one of"):
        load_config("ppo")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(config_file="missing.yaml")


def test_decays_at_their_bounds_and_lora_alpha_0_for_full_fine_tuning_load():
    assert load_config("diffusion_nft", overrides=["nft.old_decay_max=1"]).nft.old_decay_max == 1.0
    assert load_config("awm", overrides=["awm.ema_decay_max=0"]).awm.ema_decay_max == 0.0
    assert load_config(overrides=["optim.lora_rank=0", "optim.lora_alpha=0"]).optim.lora_alpha == 0.0  # not read
    with pytest.raises(ConfigError, match=r"got 'flow_grp' \(did you mean flow_grpo\?\)"):
        load_config("flow_grp")


def test_fsdp_is_for_full_fine_tuning():
    assert load_config(overrides=["optim.fsdp=true", "optim.lora_rank=0"]).optim.fsdp
    with pytest.raises(ConfigError, match=r"^optim.fsdp: .* set optim.lora_rank=0 \(got 4\)$"):
        load_config(overrides=["optim.fsdp=true", "optim.lora_rank=4"])


def test_each_task_reads_its_own_options_section_and_older_top_level_keys_still_work():
    assert (
        load_config(overrides=["digits_upsample=4", "digits_classes=[1, 2]"]).digits
        == load_config(overrides=["digits.upsample=4", "digits.classes=[1, 2]"]).digits
    )
    image = load_config(overrides=["task=text_to_image", "prompts=p.txt", "resolution=256"])
    assert (image.text_to_image.prompts, image.text_to_image.resolution) == ("p.txt", 256)
    video = load_config(overrides=["task=text_to_video", "prompts=p.txt", "height=480", "num_frames=9"])
    options = video.text_to_video
    assert (options.prompts, options.height, options.num_frames) == ("p.txt", 480, 9)
    assert video.text_to_image.prompts == ""  # the other task's section keeps its defaults
    # a run folder's config.yaml written before the sections existed resumes with the same values
    old = {k: v for k, v in to_dict(load_config()).items() if k not in ("digits", "text_to_image", "text_to_video")}
    assert config_from_dict({**old, "digits_upsample": 8, "prompts": "", "height": 0}).digits.upsample == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["task=text_to_image", "digits.upsample=4"],
            "digits.upsample: an option of the digits task; task text_to_image does not read it",
        ),
        (
            ["text_to_image.resolution=256"],
            "text_to_image.resolution: an option of the text_to_image task; task digits does not read it",
        ),
        (["digits.upsample=3"], "digits.upsample: must be one of 1, 4, 8; got 3"),
        (["digits.classes=[1, 1]"], "digits.classes: distinct digits 0-9"),
        (["task=text_to_image", "text_to_image.text_encoders=gpu"], "text_to_image.text_encoders: must be one of keep"),
        (["task=text_to_video", "text_to_video.num_frames=-1"], "text_to_video.num_frames: must be >= 0"),
        (["digits.shape=3"], "unknown config key 'digits.shape'"),
    ],
)
def test_task_options_are_checked_by_their_section(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=overrides)


@pytest.mark.parametrize("method, key", [("diffusion_nft", "nft.old_decay_max"), ("awm", "awm.ema_decay_max")])
def test_a_decay_above_one_is_refused(method, key):
    with pytest.raises(ConfigError, match=re.escape(f"{key}: must be in [0, 1] (the slow copy is d w_slow")):
        load_config(method, overrides=[f"{key}=1.5"])


def test_a_name_registered_twice_is_refused():
    from flowdppo import settings
    from flowdppo.algorithms.awm import AWM

    with pytest.raises(ConfigError, match="algorithm 'policy_gradient' is registered twice"):
        settings.register_algorithms({"policy_gradient": AWM})
