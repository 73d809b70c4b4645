"""Run configuration: the run's keys and the parts' sections composed into one typed ``TrainConfig``.

    cfg = load_config(method="flow_grpo", config_file="my.yaml", overrides=["loss.clip_range=2e-4"])

Precedence: method preset < YAML file < command-line overrides. Each part declares and checks its own section
(``settings.Section``: ``sampler`` in samplers.py, ``loss`` / ``nft`` / ``awm`` in their algorithm's file, ``digits``
/ ``text_to_image`` / ``text_to_video`` in their task, ``reward``, ``logging``); this module composes them from the
registries (``flowdppo.settings``), loads YAML and overrides, and checks what spans parts. An unknown key or an
invalid value raises ``ConfigError`` naming the key and what is allowed; keys of older releases (``digits_upsample``,
``prompts``, ...) are read into their section.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

import yaml

from flowdppo import settings
from flowdppo.errors import ConfigError, did_you_mean, shown
from flowdppo.files import write_text_atomic
from flowdppo.overrides import build, flatten_keys, merge, parse_overrides, read_yaml, read_yaml_file, to_dict
from flowdppo.settings import ALGORITHMS, PRESETS, SECTIONS, TASKS, Section, require

LARGEST = {
    "group_size": 100_000,
    "prompts_per_epoch": 100_000,
    "epochs": 10_000_000,
    "eval_samples_per_class": 100_000,
}  # beyond: a typo, not a run
LARGEST_BATCH = 10_000_000
MAX_INNER_EPOCHS = 10_000
PRECISIONS = ("float32", "bfloat16", "float16")


@dataclass
class OptimConfig(Section):
    """The update's settings (``optim.*``): optimizer, mini-batches, LoRA, memory."""

    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient norm clipping (0: no clipping)."""
    inner_epochs: int = 1
    """Passes over one rollout's elements."""
    minibatch_size: int = 64
    """Trained elements (sample, step) per backward pass (160 samples x 2 steps = 5 mini-batches)."""
    grad_accum: int = 1
    """Mini-batches per optimizer step."""
    lora_rank: int = 8
    """LoRA rank; 0 = full fine-tuning of the transformer."""
    lora_alpha: float = 16.0
    """LoRA scale alpha: the update is (alpha / rank) B A (exports carry it: metadata, ComfyUI's alpha tensors)."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Module names LoRA wraps, matched as peft does (a module whose name ends with the name; ``*`` is one block
    index, e.g. "single_transformer_blocks.*.attn.to_out"). Empty: the model family's preset, the image stream's
    attention projections in every block (SD3, Qwen-Image: to_q, to_k, to_v, to_out.0; FLUX.1: those and the
    single-stream blocks' proj_out; FLUX.2-klein: the double-stream blocks' to_q / to_k / to_v / to_out.0 and the
    single-stream blocks' to_qkv_mlp_proj and to_out), plus the text stream with lora_text_stream."""
    trained_experts: list[str] = field(default_factory=list)
    """Two-expert models (Wan 2.2 T2V-A14B): which experts get a LoRA adapter (or, with lora_rank 0, are fine-tuned):
    "transformer" (high noise), "transformer_2" (low noise); empty: every expert."""
    lora_text_stream: bool = True
    """With the preset: also the joint attention's text-stream projections (add_q_proj, add_k_proj, add_v_proj,
    to_add_out) of every double-stream block; false: the image stream only. Not read with lora_target_modules."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass: less memory, more compute."""
    compile: bool = False
    """torch.compile the transformer's forward (in place, on first use; the first epochs pay the compile time)."""
    fsdp: bool = False
    """Shard the transformer with FSDP2 (``fully_shard``) across processes instead of DDP; full fine-tuning
    only (lora_rank 0). On one process it changes nothing."""
    anchor: str = "rollout"
    """Source of logp_old / mu_old: "rollout" (recorded) or "replay" (no-grad recompute before the update)."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        return {"anchor": ("rollout", "replay")}

    def check(self, prefix: str = "optim.") -> None:
        self.check_choices(prefix)
        require(self, prefix, "> 0", "lr", "inner_epochs", "minibatch_size", "grad_accum")
        require(self, prefix, ">= 0", "weight_decay", "max_grad_norm", "lora_rank")
        if self.inner_epochs > MAX_INNER_EPOCHS:
            raise ConfigError(f"{prefix}inner_epochs: at most {MAX_INNER_EPOCHS:,}, got {self.inner_epochs:,}")
        if self.lora_rank > 0 and self.lora_alpha == 0:
            raise ConfigError(
                f"{prefix}lora_alpha: must not be 0 with LoRA (the update is alpha / rank x B A, so the "
                f"policy could never move); the usual choice is 2 x {prefix}lora_rank"
            )
        if self.fsdp and self.lora_rank > 0:
            raise ConfigError(
                f"{prefix}fsdp: shards the full transformer, for full fine-tuning only; set "
                f"{prefix}lora_rank=0 (got {self.lora_rank})"
            )


@dataclass
class RunConfig(Section):
    """The run's own keys (top level); the parts' sections are composed on top into ``TrainConfig``."""

    method: str = "flow_dppo"
    """Preset the run started from (informational once resolved)."""
    algorithm: str = "policy_gradient"
    """How rollouts are trained on: "policy_gradient" (the loss.loss_mode of each step), "diffusion_nft", "awm"."""
    task: str = "digits"
    """What to train on: "digits" (built in), "text_to_image" (a diffusers pipeline and a prompt file) or
    "text_to_video"; the task reads its own options section (``digits.*``, ``text_to_image.*``, ...)."""
    model: str = ""
    """The base model: a folder (or, for text_to_image, a hub id); "" = the digits task's shipped model."""
    precision: str = "float32"
    """Dtype of the base model's weights: float32, bfloat16 or float16 (trained LoRA weights stay float32)."""
    seed: int = 0
    """Seed of the rollout noise, the prompt order and the mini-batch order."""
    epochs: int = 40
    """Rollout -> update iterations."""
    prompts_per_epoch: int = 10
    """Prompts (digit classes) per rollout; each is one group."""
    group_size: int = 16
    """Samples per prompt."""
    device: str = "cpu"
    """Torch device of a one-process run ("cpu", "cuda", "cuda:1"); several processes take one GPU each."""
    eval_every: int = 10
    """Epochs between evaluations (in-domain and out-of-domain measures); the last epoch always."""
    eval_samples_per_class: int = 20
    """Samples per class (digits) or per held-out prompt (text_to_image) for the evaluation (ODE, fixed noise)."""
    consistency_tolerance: float = 1e-4
    """Largest |log rho| and D allowed on the first mini-batch of a rollout (same weights)."""
    checkpoint_every: int = 10
    """Epochs between resumable checkpoints (RUN/checkpoints/epoch_N); the last epoch always."""
    keep_checkpoints: int = 2
    """Checkpoints kept (the oldest are deleted)."""
    on_nonfinite: str = "stop"
    """A NaN/inf reward, advantage, loss or gradient norm: "stop" with a message, or "skip" the step."""
    max_nonfinite_in_a_row: int = 3
    """With on_nonfinite=skip, stop after this many skipped steps in a row."""
    stall_epochs: int = 5
    """Stop after this many epochs in a row with nothing to learn: every group's rewards equal (no advantage), or a
    zero gradient norm (the policy did not move); a warning at the first (0: never stop)."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        return {
            "algorithm": tuple(ALGORITHMS),
            "task": tuple(TASKS),
            "on_nonfinite": ("stop", "skip"),
            "method": tuple(PRESETS),
            "precision": PRECISIONS,
        }


_composed: dict[int, type] = {}


def section_types() -> dict[str, type]:
    """Every section of ``TrainConfig`` by its key: ``optim``, then the registered ones (``flowdppo.settings``)."""
    return {"optim": OptimConfig, **SECTIONS}


def train_config_type() -> type:
    """``TrainConfig``: ``RunConfig``'s keys, then one field a registered section (composed anew after a part
    registers)."""
    settings.check_plugins()
    version = settings.version()
    if version not in _composed:
        cls = make_dataclass(
            "TrainConfig",
            [(name, section, field(default_factory=section)) for name, section in section_types().items()],
            bases=(RunConfig,),
        )
        cls.__module__ = __name__
        cls.__doc__ = "The resolved configuration of a run: the run's keys and every part's section."
        _composed.clear()
        _composed[version] = cls
    return _composed[version]


def __getattr__(name: str) -> Any:
    if name == "TrainConfig":
        return train_config_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def task_options(cfg: Any) -> Any:
    """The options section of the run's task (``cfg.digits``, ``cfg.text_to_image``, ...)."""
    return getattr(cfg, cfg.task)


def validate(cfg: Any) -> Any:
    """Every section's own checks, then the run's keys and the checks across parts; raises ``ConfigError`` with
    the key and what is allowed."""
    for section in fields(cfg):
        value = getattr(cfg, section.name)
        if isinstance(value, Section):
            value.check(f"{section.name}.")
    cfg.check_choices("")
    if not 0 <= cfg.seed < 2**63:
        raise ConfigError(f"seed: must be in [0, 2^63), got {cfg.seed}")
    for key, most in LARGEST.items():
        if getattr(cfg, key) > most:
            raise ConfigError(f"{key}: at most {most:,}, got {getattr(cfg, key):,}")
    if cfg.prompts_per_epoch * cfg.group_size > LARGEST_BATCH:
        raise ConfigError(
            f"prompts_per_epoch x group_size: at most {LARGEST_BATCH:,} samples per rollout, got "
            f"{cfg.prompts_per_epoch * cfg.group_size:,}"
        )
    require(
        cfg,
        "",
        "> 0",
        "epochs",
        "prompts_per_epoch",
        "eval_samples_per_class",
        "checkpoint_every",
        "keep_checkpoints",
        "eval_every",
        "consistency_tolerance",
        "max_nonfinite_in_a_row",
    )
    require(cfg, "", ">= 0", "stall_epochs")
    if cfg.group_size < 2:
        raise ConfigError(f"group_size: must be >= 2 (group-relative advantages need a group), got {cfg.group_size}")
    algorithm = ALGORITHMS[cfg.algorithm]
    problem = algorithm.config_error(cfg) or cfg.sampler.combination_error()  # the most specific message first
    if not problem and cfg.optim.fsdp and not algorithm.supports_fsdp:
        problem = f"optim.fsdp: not supported by {cfg.algorithm} (its slow copy of the weights is not sharded)"
    if problem:
        raise ConfigError(problem)
    return cfg


def algorithm_sections() -> set[str]:
    """The sections some algorithm declares (``loss``, ``nft``, ``awm``, ...)."""
    return {name for algorithm in ALGORITHMS.values() for name in getattr(algorithm, "sections", {})}


def algorithm_reads(algorithm: type, key: str) -> bool:
    """Whether ``algorithm`` reads the dotted ``key`` of an algorithm section (its ``reads``: keys, or prefixes
    ending in a dot)."""
    return any(key == r or key.startswith(r) for r in algorithm.reads)


def check_given_keys(cfg: Any, given: dict) -> None:
    """Refuse a key the run would not read: a setting of an algorithm section ``cfg.algorithm`` does not use, or of
    another task's options section; it would silently do nothing."""
    reads = ALGORITHMS[cfg.algorithm].reads
    owned = algorithm_sections()
    for key in given:
        section = key.split(".")[0]
        if section in owned and not algorithm_reads(ALGORITHMS[cfg.algorithm], key):
            raise ConfigError(
                f"{key}: the {cfg.algorithm} algorithm does not use it (it reads "
                f"{', '.join(r + '*' if r.endswith('.') else r for r in reads)}); remove it"
            )
        if section in TASKS and section != cfg.task:
            raise ConfigError(
                f"{key}: an option of the {section} task; task {cfg.task} does not read it (set "
                f"task={section}, or use {cfg.task}.* options)"
            )


def upgrade_keys(tree: dict) -> dict:
    """Keys of older releases read into the section that holds them now: ``digits_upsample`` -> ``digits.upsample``,
    ``prompts`` -> ``<task>.prompts`` (the run's task when it has the key, else the first task that does)."""
    task = tree.get("task", RunConfig.task)
    out: dict = {}
    for key, value in tree.items():
        targets = settings.ALIASES.get(key) if key not in {f.name for f in fields(RunConfig)} else None
        if targets:
            section, name = next(((s, n) for s, n in targets if s == task), targets[0])
            out = merge(out, {section: {name: value}})
        else:
            out = merge(out, {key: value})
    return out


def load_config(
    method: str | None = None, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> Any:
    """Preset of ``method`` (default flow_dppo), then the YAML file, then the dotted overrides."""
    tree = merge(upgrade_keys(read_yaml(config_file)), upgrade_keys(parse_overrides(overrides or [])))
    method = method or tree.get("method", "flow_dppo")
    if not isinstance(method, str) or method not in PRESETS:
        raise ConfigError(
            f"method: must be one of {', '.join(PRESETS)}; got {shown(method)}{did_you_mean(method, PRESETS)}"
        )
    user = {k: v for k, v in tree.items() if k != "method"}
    cfg = validate(build(train_config_type(), merge(merge({"method": method}, PRESETS[method]), user)))
    check_given_keys(cfg, flatten_keys(user))
    return cfg


def resume_config(
    saved: dict, method: str | None = None, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> Any:
    """A run's saved config with what the command line gives on top (a resumed run refuses any change)."""
    tree = merge(
        merge(upgrade_keys(saved), upgrade_keys(read_yaml(config_file))), upgrade_keys(parse_overrides(overrides or []))
    )
    return config_from_dict(tree if method is None else {**tree, "method": method})


def saved_config(run_dir: Path, what: str) -> dict:
    """A run folder's ``config.yaml`` as a mapping; missing, empty or broken: one line naming it."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{what}: {run_dir} is not a run folder (no config.yaml)")
    tree = read_yaml_file(path, what)
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"{what}: {path} is empty or not a mapping of keys; restore it or start a new run")
    return tree


def config_from_dict(tree: dict) -> Any:
    """A validated config from a resolved mapping (e.g. a run's saved ``config.yaml``, older keys upgraded)."""
    return validate(build(train_config_type(), upgrade_keys(tree)))


def save_config(cfg: Any, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = [
    "ConfigError",
    "PRESETS",
    "RunConfig",
    "OptimConfig",
    "config_from_dict",
    "load_config",
    "resume_config",
    "section_types",
    "save_config",
    "task_options",
    "to_dict",
    "train_config_type",
]
