"""Run configuration: typed dataclasses, one preset per method, YAML files and dotted overrides.

    cfg = load_config(method="flow_grpo", config_file="my.yaml", overrides=["loss.clip_range=2e-4"])

Precedence: method preset < YAML file < command-line overrides. An unknown key or an invalid value
raises ``ConfigError`` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowdppo.errors import ConfigError
from flowdppo.losses import LOSSES
from flowdppo.sde import LOGPROB_CONVENTIONS, REDUCTIONS
from flowdppo.tasks import TASKS


@dataclass
class SamplerConfig:
    sde_type: str = "sde"
    """Stochastic kernel of the trained steps: "sde" (Flow-SDE) or "cps"."""
    eta: float = 0.7
    """Noise level: Flow-SDE 0.7, CPS 0.8 in the public recipes."""
    num_steps: int = 10
    """Steps of the sampling schedule (K)."""
    shift: float = 1.0
    """SD3 time shift of the schedule (1 = linear sigmas)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance during rollout and replay (1 = off)."""
    window_mode: str = "window"
    """Which steps are stochastic and trained: "window" (W consecutive), "random" (k drawn), "all"."""
    window_size: int = 2
    """W for window_mode "window"; k for "random"."""
    window_range: list[int] = field(default_factory=lambda: [0, 5])
    """[lo, hi): step indices the window start ("window") or the steps ("random") are drawn from."""
    kl_to_base_steps: str = "all"
    """Steps the logged path KL to the base sums over: "all" stochastic-kernel steps (comparable across
    epochs, one extra base forward per step) or the epoch's "trained" steps (free with beta > 0)."""
    rollout_batch_size: int = 0
    """Samples per model call in rollouts, replays without gradients and decoding (0: the whole batch)."""
    logprob_convention: str = "gaussian"
    """"gaussian" (true density) or "cps" (the published CPS -(x - mean)^2, no variance)."""


@dataclass
class LossConfig:
    loss_mode: str = "flow_dppo"
    """One of flow_dppo, flow_grpo, flow_cps, grpo_guard."""
    kl_mask_threshold: float = 1e-5
    """Flow-DPPO threshold tau on the mean-reduced per-step KL."""
    clip_range: float = 1e-4
    """PPO ratio clip epsilon (flow_grpo, flow_cps, grpo_guard)."""
    adv_clip_max: float = 5.0
    """Advantage clamp of the clipping baselines."""
    kl_reduce: str = "mean"
    """Reduction of the per-step KL: "mean" (thresholds are calibrated for it) or "sum"."""
    add_kl_coefficient: bool = True
    """Divide the mean drift by 2 std^2 (True) or by 2 (False)."""
    beta: float = 0.0
    """Weight of the KL penalty to the frozen base (adapters disabled)."""


@dataclass
class RewardConfig:
    names: list[str] = field(default_factory=lambda: ["classifier_prob"])
    """Reward functions by name."""
    weights: list[float] = field(default_factory=lambda: [1.0])
    """One weight per reward."""
    aggregation: str = "sum"
    """Multi-reward advantages: "sum" (weighted sum) or "gdpo"."""
    std_scope: str = "batch"
    """Advantage std over the whole "batch" or each "group"."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    inner_epochs: int = 1
    """Passes over one rollout's elements."""
    minibatch_size: int = 64
    """Trained elements (sample, step) per backward pass (160 samples x 2 steps = 5 mini-batches)."""
    grad_accum: int = 1
    """Mini-batches per optimizer step."""
    lora_rank: int = 8
    """LoRA rank; 0 = full fine-tuning of the transformer."""
    lora_alpha: float = 16.0
    lora_target_modules: list[str] = field(default_factory=list)
    """Module names LoRA wraps (empty: the policy's attention projections)."""
    fsdp: bool = False
    """Shard the transformer with FSDP2 (``fully_shard``) across processes instead of DDP; full fine-tuning
    only (lora_rank 0). On one process it changes nothing."""
    anchor: str = "rollout"
    """Source of logp_old / mu_old: "rollout" (recorded) or "replay" (no-grad recompute before the update)."""


@dataclass
class TrainConfig:
    method: str = "flow_dppo"
    """Preset the run started from (informational once resolved)."""
    task: str = "digits"
    """What to train on: "digits" (built in) or "text_to_image" (a diffusers pipeline and a prompt file)."""
    model: str = ""
    """The base model: a folder (or, for text_to_image, a hub id); "" = the digits task's shipped model."""
    prompts: str = ""
    """text_to_image: prompt file, .txt (one per line) or .jsonl ("prompt" + metadata for the rewards)."""
    eval_prompts: int = 8
    """text_to_image: prompts held out of the file (seeded shuffle) for evaluation and sample grids."""
    resolution: int = 512
    """text_to_image: image height = width in pixels."""
    precision: str = "float32"
    """Dtype of the base model's weights: float32, bfloat16 or float16 (trained LoRA weights stay float32)."""
    embedded_guidance: float = 3.5
    """Guidance value fed to a guidance-distilled model's guidance embedding (FLUX.1-dev); others ignore it."""
    seed: int = 0
    epochs: int = 40
    """Rollout -> update iterations."""
    prompts_per_epoch: int = 10
    """Prompts (digit classes) per rollout; each is one group."""
    group_size: int = 16
    """Samples per prompt."""
    device: str = "cpu"
    eval_every: int = 10
    """Epochs between evaluations (in-domain and out-of-domain measures); the last epoch always."""
    eval_samples_per_class: int = 20
    """Samples per class (digits) or per held-out prompt (text_to_image) for the evaluation (ODE, fixed noise)."""
    consistency_tolerance: float = 1e-4
    """Largest |log rho| and D allowed on the first mini-batch of a rollout (same weights)."""
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    on_nonfinite: str = "stop"
    """A NaN/inf reward, advantage, loss or gradient norm: "stop" with a message, or "skip" the step."""
    max_nonfinite_in_a_row: int = 3
    """With on_nonfinite=skip, stop after this many skipped steps in a row."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


PRESETS: dict[str, dict[str, Any]] = {
    "flow_dppo": {"sampler": {"sde_type": "sde", "eta": 0.7}, "loss": {"loss_mode": "flow_dppo"}},
    "flow_grpo": {"sampler": {"sde_type": "sde", "eta": 0.7}, "loss": {"loss_mode": "flow_grpo", "clip_range": 1e-4}},
    "flow_cps": {
        "sampler": {"sde_type": "cps", "eta": 0.8, "logprob_convention": "cps"},
        "loss": {"loss_mode": "flow_cps", "clip_range": 1e-4},
    },
    "grpo_guard": {"sampler": {"sde_type": "sde", "eta": 0.7}, "loss": {"loss_mode": "grpo_guard", "clip_range": 2e-6}},
    "flow_dppo_cps": {"sampler": {"sde_type": "cps", "eta": 0.8}, "loss": {"loss_mode": "flow_dppo"}},
}

CHOICES: dict[str, tuple[str, ...]] = {
    "sampler.sde_type": ("sde", "cps"),
    "sampler.window_mode": ("window", "random", "all"),
    "sampler.logprob_convention": LOGPROB_CONVENTIONS,
    "sampler.kl_to_base_steps": ("all", "trained"),
    "loss.loss_mode": tuple(sorted(LOSSES)),
    "loss.kl_reduce": REDUCTIONS,
    "reward.aggregation": ("sum", "gdpo"),
    "reward.std_scope": ("batch", "group"),
    "optim.anchor": ("rollout", "replay"),
    "on_nonfinite": ("stop", "skip"),
    "method": tuple(PRESETS),
    "task": TASKS,
    "precision": ("float32", "bfloat16", "float16"),
}


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    tree[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=[1, 2]"]`` -> nested dict; values are parsed as YAML scalars / lists."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. loss.kl_mask_threshold=1e-4)")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation (int -> float allowed; 1e-4 strings from YAML parsed)."""
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(annotation) is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list):
            return [_coerce(v, item_type, key) for v in value]
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key}: expected {name}, got {value!r}")


def _build(cls: type, tree: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}; allowed: {', '.join(names)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a section of keys, got {value!r}")
            kwargs[key] = _build(annotation, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, annotation, dotted)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range and compatibility checks; raises ``ConfigError`` with the key and what is allowed."""
    flat = flatten_keys(to_dict(cfg))
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {flat[key]!r}")
    positive = ["epochs", "prompts_per_epoch", "sampler.num_steps", "sampler.window_size", "optim.inner_epochs",
                "optim.minibatch_size", "optim.grad_accum", "optim.lr", "loss.kl_mask_threshold",
                "loss.clip_range", "loss.adv_clip_max", "sampler.shift", "sampler.guidance_scale",
                "eval_samples_per_class", "checkpoint_every", "keep_checkpoints", "eval_every",
                "consistency_tolerance", "max_nonfinite_in_a_row"]  # fmt: skip
    for key in positive:
        if not flat[key] > 0:
            raise ConfigError(f"{key}: must be > 0, got {flat[key]!r}")
    for key in ("optim.weight_decay", "loss.beta", "optim.max_grad_norm", "optim.lora_rank", "eval_prompts",
                "resolution", "sampler.rollout_batch_size"):  # fmt: skip
        if flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {flat[key]!r}")
    if cfg.optim.fsdp and cfg.optim.lora_rank > 0:
        raise ConfigError(
            f"optim.fsdp: shards the full transformer, for full fine-tuning only; set optim.lora_rank=0 "
            f"(got {cfg.optim.lora_rank})"
        )
    if cfg.group_size < 2:
        raise ConfigError(f"group_size: must be >= 2 (group-relative advantages need a group), got {cfg.group_size}")
    s = cfg.sampler
    eta_range = {"sde": (0.0, 2.0), "cps": (0.0, 1.0)}[s.sde_type]
    if not eta_range[0] < s.eta <= eta_range[1]:
        raise ConfigError(f"sampler.eta: must be in ({eta_range[0]}, {eta_range[1]}] for sde_type {s.sde_type}")
    lo, hi = (s.window_range + [None, None])[:2]
    if len(s.window_range) != 2 or not 0 <= lo < hi:
        raise ConfigError(f"sampler.window_range: must be [lo, hi) with 0 <= lo < hi, got {s.window_range}")
    last_trainable = s.num_steps - 1 if s.sde_type == "sde" else s.num_steps - 2  # CPS's last step has std 0
    if s.window_mode != "all":
        top = hi - 1 + (s.window_size - 1 if s.window_mode == "window" else 0)
        if top > last_trainable or (s.window_mode == "random" and s.window_size > hi - lo):
            raise ConfigError(
                f"sampler.window_size/window_range: {s.window_mode} of {s.window_size} in [{lo}, {hi}) does not fit "
                f"the {s.num_steps}-step schedule (last trainable step {last_trainable})"
            )
    if cfg.loss.loss_mode == "grpo_guard" and s.sde_type != "sde":
        raise ConfigError("loss.loss_mode grpo_guard needs sampler.sde_type sde (its renormalisation is Flow-SDE's)")
    if cfg.loss.loss_mode == "flow_cps" and s.logprob_convention != "cps":
        raise ConfigError("loss.loss_mode flow_cps needs sampler.logprob_convention cps (the published CPS ratio)")
    if s.logprob_convention == "cps" and s.sde_type != "cps":
        raise ConfigError("sampler.logprob_convention cps needs sampler.sde_type cps")
    if len(cfg.reward.weights) != len(cfg.reward.names) or not cfg.reward.names:
        raise ConfigError(
            f"reward.weights: need one weight per reward name ({len(cfg.reward.names)} names, "
            f"{len(cfg.reward.weights)} weights)"
        )
    return cfg


def flatten_keys(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_yaml(config_file: str | Path | None) -> dict:
    if config_file is None:
        return {}
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of keys, got {type(tree).__name__}")
    return tree


def load_config(
    method: str | None = None, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Preset of ``method`` (default flow_dppo), then the YAML file, then the dotted overrides."""
    tree = _merge(_read_yaml(config_file), parse_overrides(overrides or []))
    method = method or tree.get("method", "flow_dppo")
    if method not in PRESETS:
        raise ConfigError(f"method: must be one of {', '.join(PRESETS)}; got {method!r}")
    tree = _merge(_merge({"method": method}, PRESETS[method]), {k: v for k, v in tree.items() if k != "method"})
    return validate(_build(TrainConfig, tree))


def resume_config(
    saved: dict, method: str | None = None, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """A run's saved config with what the command line gives on top (a resumed run refuses any change)."""
    tree = _merge(_merge(saved, _read_yaml(config_file)), parse_overrides(overrides or []))
    return config_from_dict(tree if method is None else {**tree, "method": method})


def config_from_dict(tree: dict) -> TrainConfig:
    """A validated config from a resolved mapping (e.g. a run's saved ``config.yaml``)."""
    return validate(_build(TrainConfig, tree))


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = ["ConfigError", "PRESETS", "TrainConfig", "config_from_dict", "load_config", "resume_config", "save_config",
           "to_dict"]
