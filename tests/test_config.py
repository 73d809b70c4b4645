"""Configs: presets, YAML + dotted overrides, and errors that name the key and the allowed values."""

import pytest

from flowdppo.config import PRESETS, ConfigError, config_from_dict, load_config, to_dict


def test_presets_carry_the_public_defaults():
    dppo = load_config()
    assert (dppo.method, dppo.loss.loss_mode, dppo.loss.kl_mask_threshold) == ("flow_dppo", "flow_dppo", 1e-5)
    assert (dppo.sampler.sde_type, dppo.sampler.eta) == ("sde", 0.7)
    grpo = load_config("flow_grpo")
    assert (grpo.loss.loss_mode, grpo.loss.clip_range, grpo.loss.adv_clip_max) == ("flow_grpo", 1e-4, 5.0)
    cps = load_config("flow_cps")
    assert (cps.sampler.sde_type, cps.sampler.eta, cps.sampler.logprob_convention) == ("cps", 0.8, "cps")
    assert load_config("grpo_guard").loss.clip_range == 2e-6
    dppo_cps = load_config("flow_dppo_cps")
    assert (dppo_cps.sampler.sde_type, dppo_cps.loss.loss_mode) == ("cps", "flow_dppo")
    assert set(PRESETS) == {"flow_dppo", "flow_grpo", "flow_cps", "grpo_guard", "flow_dppo_cps"}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: flow_grpo\nepochs: 7\nloss:\n  clip_range: 3e-4\noptim:\n  lr: 1e-3\n")
    cfg = load_config(config_file=path, overrides=["loss.clip_range=5e-4", "reward.names=[classifier_prob, ink]",
                                                   "reward.weights=[1, 0.5]"])  # fmt: skip
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
        (["sampler.sde_type=euler"], "sampler.sde_type: must be one of sde, cps"),
        (["group_size=1"], "group_size: must be >= 2"),
        (["sampler.eta=3.0"], "sampler.eta: must be in"),
        (["sampler.window_size=9"], "does not fit the 10-step schedule"),
        (["reward.weights=[1, 2]"], "reward.weights: need one weight per reward name"),
        (["epochs"], "must look like key=value"),
        (["optim.fsdp=true"], "optim.fsdp: shards the full transformer, for full fine-tuning only"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)


def test_incompatible_sampler_and_method():
    with pytest.raises(ConfigError, match="grpo_guard needs sampler.sde_type sde"):
        load_config("grpo_guard", overrides=["sampler.sde_type=cps", "sampler.eta=0.8"])
    with pytest.raises(ConfigError, match="flow_cps needs sampler.logprob_convention cps"):
        load_config("flow_cps", overrides=["sampler.logprob_convention=gaussian"])
    with pytest.raises(ConfigError, match="method: must be one of"):
        load_config("ppo")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(config_file="missing.yaml")


def test_fsdp_is_for_full_fine_tuning():
    assert load_config(overrides=["optim.fsdp=true", "optim.lora_rank=0"]).optim.fsdp
    with pytest.raises(ConfigError, match=r"^optim.fsdp: .* set optim.lora_rank=0 \(got 4\)$"):
        load_config(overrides=["optim.fsdp=true", "optim.lora_rank=4"])
