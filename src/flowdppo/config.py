"""Run configuration: typed dataclasses, one preset per method, YAML files and dotted overrides.

    cfg = load_config(method="flow_grpo", config_file="my.yaml", overrides=["loss.clip_range=2e-4"])

Precedence: method preset < YAML file < command-line overrides. An unknown key or an invalid value
raises ``ConfigError`` naming the key and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowdppo.algorithms import ALGORITHMS
from flowdppo.algorithms.awm import WEIGHTINGS
from flowdppo.algorithms.likelihood_free import TIMESTEP_MODES
from flowdppo.errors import ConfigError, did_you_mean, shown
from flowdppo.files import write_text_atomic
from flowdppo.losses import LOSSES
from flowdppo.overrides import build, flatten_keys, merge, parse_overrides, read_yaml, read_yaml_file, to_dict
from flowdppo.samplers import SAMPLERS, WINDOW_MODES, get_sampler, window_error
from flowdppo.sde import LOGPROB_CONVENTIONS, REDUCTIONS
from flowdppo.tasks.digits import UPSAMPLE_FACTORS
from flowdppo.tracking import check_backends


@dataclass
class SamplerConfig:
    kind: str = "flow_sde"
    """Kernel of the stochastic steps: "flow_sde" (Flow-GRPO), "cps", "dance_sde" (DanceGRPO) or "ode" (none)."""
    eta: float = 0.7
    """Noise level: flow_sde 0.7, cps 0.8, dance_sde 0.3 in the public recipes."""
    num_steps: int = 10
    """Steps of the sampling schedule (K)."""
    shift: float = 1.0
    """SD3 time shift of the digits schedule (1 = linear sigmas); a real model brings its own schedule."""
    guidance_scale: float = 1.0
    """Classifier-free guidance during rollout and replay (1 = off)."""
    guidance_scale_2: float = 0.0
    """Two-expert Wan 2.2 (T2V-A14B): guidance of the low-noise expert, transformer_2 (0: guidance_scale), as
    WanPipeline's guidance_scale_2; guidance runs at all only when guidance_scale > 1 (the pipeline's rule)."""
    group_shared_noise: bool = False
    """Start every sample of a group from the same initial noise (DanceGRPO)."""
    window_mode: str = "window"
    """Which steps are stochastic and trained: "window" (W consecutive, start drawn), "random" (k drawn),
    "progressive" (W consecutive sliding from lo toward later steps as training advances, MixGRPO), "all"."""
    window_size: int = 2
    """W for "window" and "progressive"; k for "random"."""
    window_range: list[int] = field(default_factory=lambda: [0, 5])
    """[lo, hi): step indices the window start ("window", "progressive") or the steps ("random") come from."""
    window_shift_every: int = 5
    """"progressive": epochs between two one-step moves of the window."""
    kl_to_base_steps: str = "all"
    """Steps the logged path KL to the base sums over: "all" stochastic-kernel steps (comparable across
    epochs, one extra base forward per step) or the epoch's "trained" steps (free with beta > 0)."""
    kl_kernel: str = "rollout"
    """Kernel the path KL to the base is measured in: "rollout" (the sampler's own, at its eta) or a named
    stochastic one at its default eta (an ODE rollout needs one; compare arms in one kernel)."""
    rollout_batch_size: int = 0
    """Samples per model call in rollouts, replays without gradients and decoding (0: the whole batch)."""
    logprob_convention: str = "gaussian"
    """"gaussian" (true density) or "cps" (the published CPS -(x - mean)^2, no variance)."""


@dataclass
class LossConfig:
    loss_mode: str = "flow_dppo"
    """One of flow_dppo, flow_grpo, flow_cps, grpo_guard, unconstrained (-A rho on every element: a control)."""
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
class NFTConfig:
    """DiffusionNFT (algorithm diffusion_nft)."""

    b: float = 1.0
    """Strength of the implicit policies v+- around the sampling policy (public: 1.0; 0.1 for OCR)."""
    adv_clip_max: float = 5.0
    """c in the optimality weight r = clip(A, -c, c) / (2c) + 1/2."""
    train_timesteps: int = 9
    """Noise levels each final sample is trained at."""
    timesteps: str = "schedule"
    """How they are drawn: "schedule" (distinct levels of the rollout schedule), "stratified", "uniform"."""
    old_decay_rate: float = 0.001
    """Sampling policy w_old <- d w_old + (1 - d) w after each update, d = min(rate * optimizer steps, max)."""
    old_decay_max: float = 0.5
    """Upper bound of d (0: roll out with the current weights)."""


@dataclass
class AWMConfig:
    """Advantage Weighted Matching (algorithm awm)."""

    clip_range: float = 1.0
    """PPO clip epsilon on the ratio of matching log-probs."""
    adv_clip_max: float = 5.0
    """Advantages clamped to +-adv_clip_max, then divided by it."""
    train_timesteps: int = 6
    """Noise levels each final sample is trained at."""
    timesteps: str = "stratified"
    """How they are drawn: "stratified" (one per stratum of the schedule's steps 1..K-1), "schedule", "uniform"."""
    weighting: str = "ghuber"
    """Log-prob surrogate: "ghuber" -s((mse + d)^p - d^p)/p, "t" -s mse, "uniform" -mse."""
    huber_p: float = 0.25
    """p of the ghuber weighting."""
    ema_kl: float = 1.0
    """Weight of mean((v - v_ema)^2) to the slowly-updated policy (0: off)."""
    ema_decay_rate: float = 0.001
    """Slow policy w_ema <- d w_ema + (1 - d) w after each update, d = min(rate * optimizer steps, max)."""
    ema_decay_max: float = 0.3


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
    video_frames: int = 4
    """text_to_video: frames an image reward scores, evenly spaced from first to last (0: every frame)."""
    video_aggregation: str = "mean"
    """text_to_video: an image reward's per-frame scores -> one per video: "mean" or "min"."""


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


@dataclass
class LoggingConfig:
    backends: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers: "tensorboard" (RUN/tensorboard) and / or "wandb" (pip install 'flowdppo[wandb]')."""
    project: str = "flowdppo"
    """W&B project."""
    run_name: str = ""
    """Tracker run name ("": the run folder's name)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""


@dataclass
class TrainConfig:
    method: str = "flow_dppo"
    """Preset the run started from (informational once resolved)."""
    algorithm: str = "policy_gradient"
    """How rollouts are trained on: "policy_gradient" (the loss.loss_mode of each step), "diffusion_nft", "awm"."""
    task: str = "digits"
    """What to train on: "digits" (built in) or "text_to_image" (a diffusers pipeline and a prompt file)."""
    model: str = ""
    """The base model: a folder (or, for text_to_image, a hub id); "" = the digits task's shipped model."""
    digits_upsample: int = 1
    """digits: 1 (the 8x8 task, latent (1, 8, 8)), 4 or 8: digits upsampled (bicubic, small random shifts) and
    pixel-unshuffled into a (u*u, 8, 8) latent (dim 1,024 / 4,096), pooled back to 8x8 for reward and evaluation.
    Each has a shipped base (``flowdppo digits pretrain --upsample U --out DIR`` re-creates it; model=DIR takes
    yours)."""
    digits_classes: list[int] = field(default_factory=list)
    """digits: the classes prompts are drawn from (empty: all ten). The others are held out: ``eval/*`` then
    measures the trained classes and ``eval_heldout/*`` the held-out ones (what training does to digits it never
    saw: forgetting)."""
    prompts: str = ""
    """text_to_image: prompt file, .txt (one per line) or .jsonl ("prompt" + metadata for the rewards)."""
    eval_prompts: int = 8
    """text_to_image: prompts held out of the file (seeded shuffle) for evaluation and sample grids."""
    resolution: int = 512
    """text_to_image: image height = width in pixels."""
    height: int = 0
    """text_to_video: frame height in pixels (0: resolution)."""
    width: int = 0
    """text_to_video: frame width in pixels (0: resolution)."""
    num_frames: int = 81
    """text_to_video: frames per video (Wan: 4k + 1)."""
    precision: str = "float32"
    """Dtype of the base model's weights: float32, bfloat16 or float16 (trained LoRA weights stay float32)."""
    embedded_guidance: float = 3.5
    """Guidance value fed to a guidance-distilled model's guidance embedding (FLUX.1-dev); others ignore it."""
    negative_prompt: str = ""
    """text_to_image: the unconditional branch of classifier-free guidance (sampler.guidance_scale > 1)."""
    text_encoders: str = "offload"
    """text_to_image: "keep" the text encoders on the device, "offload" them to the CPU between encodings of
    new prompts, or "free" them once every prompt of the file is encoded (at the start of the run)."""
    prompt_cache_mb: float = 4096.0
    """text_to_image: host memory for cached prompt embeddings; beyond it the least recently used go to disk."""
    vae_slicing: bool = False
    """text_to_video: decode a batch one video at a time (the VAE's enable_slicing)."""
    vae_tiling: bool = False
    """text_to_image: decode large images tile by tile (the VAE's enable_tiling): less memory, seams blended."""
    attention_backend: str = ""
    """text_to_image: the transformer's attention backend by diffusers' name (e.g. "flash", "_native_cudnn",
    "sage"; "" keeps the default, PyTorch's scaled_dot_product_attention)."""
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
    stall_epochs: int = 5
    """Stop after this many epochs in a row with nothing to learn: every group's rewards equal (no advantage), or a
    zero gradient norm (the policy did not move); a warning at the first (0: never stop)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    awm: AWMConfig = field(default_factory=AWMConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SDE = {"kind": "flow_sde", "eta": 0.7}
LIKELIHOOD_FREE = {"kind": "ode", "kl_kernel": "flow_sde"}  # path KL measured in Flow-SDE, as for the SDE arms
PRESETS: dict[str, dict[str, Any]] = {
    "flow_dppo": {"sampler": SDE, "loss": {"loss_mode": "flow_dppo"}},
    "flow_grpo": {"sampler": SDE, "loss": {"loss_mode": "flow_grpo", "clip_range": 1e-4}},
    "flow_cps": {
        "sampler": {"kind": "cps", "eta": 0.8, "logprob_convention": "cps"},
        "loss": {"loss_mode": "flow_cps", "clip_range": 1e-4},
    },
    "grpo_guard": {"sampler": SDE, "loss": {"loss_mode": "grpo_guard", "clip_range": 2e-6}},
    "flow_dppo_cps": {"sampler": {"kind": "cps", "eta": 0.8}, "loss": {"loss_mode": "flow_dppo"}},
    "unconstrained": {"sampler": SDE, "loss": {"loss_mode": "unconstrained"}},  # -A rho, no trust test: a control
    "dance_grpo": {"sampler": {"kind": "dance_sde", "eta": 0.3, "group_shared_noise": True},
                   "loss": {"loss_mode": "flow_grpo", "clip_range": 1e-4}},
    "diffusion_nft": {"algorithm": "diffusion_nft", "sampler": LIKELIHOOD_FREE, "loss": {"beta": 1e-4}},
    "awm": {"algorithm": "awm", "sampler": LIKELIHOOD_FREE, "loss": {"beta": 1e-4}},
}

ALGORITHM_SECTIONS = ("loss", "nft", "awm")  # config sections read by one algorithm or another
LARGEST = {"sampler.num_steps": 10_000, "group_size": 100_000, "prompts_per_epoch": 100_000, "epochs": 10_000_000,
           "eval_samples_per_class": 100_000, "optim.inner_epochs": 10_000}  # beyond: a typo, not a run
LARGEST_BATCH = 10_000_000
TEXT_ENCODER_PLACEMENTS = ("keep", "offload", "free")

def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the keys that take a name (read from the registries when asked)."""
    return {
        "sampler.kind": tuple(SAMPLERS),
        "sampler.window_mode": WINDOW_MODES,
        "sampler.logprob_convention": LOGPROB_CONVENTIONS,
        "sampler.kl_to_base_steps": ("all", "trained"),
        "sampler.kl_kernel": ("rollout", *(name for name, s in SAMPLERS.items() if s.stochastic)),
        "algorithm": tuple(ALGORITHMS),
        "loss.loss_mode": tuple(sorted(LOSSES)),
        "loss.kl_reduce": REDUCTIONS,
        "nft.timesteps": TIMESTEP_MODES,
        "awm.timesteps": TIMESTEP_MODES,
        "awm.weighting": WEIGHTINGS,
        "reward.aggregation": ("sum", "gdpo"),
        "reward.std_scope": ("batch", "group"),
        "reward.video_aggregation": ("mean", "min"),
        "optim.anchor": ("rollout", "replay"),
        "on_nonfinite": ("stop", "skip"),
        "method": tuple(PRESETS),
        "precision": ("float32", "bfloat16", "float16"),
        "text_encoders": TEXT_ENCODER_PLACEMENTS,
    }


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range and compatibility checks; raises ``ConfigError`` with the key and what is allowed."""
    flat = flatten_keys(to_dict(cfg))
    for key, allowed in choices().items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {shown(flat[key])}"
                              f"{did_you_mean(flat[key], allowed)}")
    if not 0 <= cfg.seed < 2**63:
        raise ConfigError(f"seed: must be in [0, 2^63), got {cfg.seed}")
    for key, most in LARGEST.items():
        if flat[key] > most:
            raise ConfigError(f"{key}: at most {most:,}, got {flat[key]:,}")
    if cfg.prompts_per_epoch * cfg.group_size > LARGEST_BATCH:
        raise ConfigError(f"prompts_per_epoch x group_size: at most {LARGEST_BATCH:,} samples per rollout, got "
                          f"{cfg.prompts_per_epoch * cfg.group_size:,}")
    positive = ["epochs", "prompts_per_epoch", "sampler.num_steps", "sampler.window_size", "optim.inner_epochs",
                "optim.minibatch_size", "optim.grad_accum", "optim.lr", "loss.kl_mask_threshold",
                "loss.clip_range", "loss.adv_clip_max", "sampler.shift", "sampler.guidance_scale",
                "eval_samples_per_class", "checkpoint_every", "keep_checkpoints", "eval_every",
                "consistency_tolerance", "max_nonfinite_in_a_row", "sampler.window_shift_every",
                "nft.adv_clip_max", "nft.train_timesteps", "awm.clip_range", "awm.adv_clip_max",
                "awm.train_timesteps", "awm.huber_p"]  # fmt: skip
    for key in positive:
        if not flat[key] > 0:
            raise ConfigError(f"{key}: must be > 0, got {shown(flat[key])}")
    for key in ("optim.weight_decay", "loss.beta", "optim.max_grad_norm", "optim.lora_rank", "eval_prompts",
                "resolution", "sampler.rollout_batch_size", "nft.old_decay_rate", "nft.old_decay_max",
                "awm.ema_kl", "awm.ema_decay_rate", "awm.ema_decay_max", "prompt_cache_mb", "height", "width",
                "num_frames", "reward.video_frames", "sampler.guidance_scale_2", "stall_epochs"):  # fmt: skip
        if flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {shown(flat[key])}")
    if cfg.digits_upsample not in UPSAMPLE_FACTORS:
        raise ConfigError(f"digits_upsample: must be one of {', '.join(map(str, UPSAMPLE_FACTORS))}; "
                          f"got {cfg.digits_upsample!r}")
    if cfg.digits_classes and (sorted(set(cfg.digits_classes)) != sorted(cfg.digits_classes)
                               or not set(cfg.digits_classes) <= set(range(10))):  # fmt: skip
        raise ConfigError(f"digits_classes: distinct digits 0-9, got {cfg.digits_classes!r}")
    if cfg.digits_classes and cfg.task != "digits":
        raise ConfigError(f"digits_classes: the digits task's; task {cfg.task} does not read it")
    if cfg.digits_upsample != 1 and cfg.task != "digits":
        raise ConfigError(f"digits_upsample: the digits task's; task {cfg.task} does not read it")
    if cfg.optim.lora_rank > 0 and cfg.optim.lora_alpha == 0:
        raise ConfigError("optim.lora_alpha: must not be 0 with LoRA (the update is alpha / rank x B A, so the policy "
                          "could never move); the usual choice is 2 x optim.lora_rank")
    if cfg.optim.fsdp and cfg.optim.lora_rank > 0:
        raise ConfigError(
            f"optim.fsdp: shards the full transformer, for full fine-tuning only; set optim.lora_rank=0 "
            f"(got {cfg.optim.lora_rank})"
        )
    if cfg.group_size < 2:
        raise ConfigError(f"group_size: must be >= 2 (group-relative advantages need a group), got {cfg.group_size}")
    s, sampler = cfg.sampler, get_sampler(cfg.sampler.kind)
    lo, hi = sampler.eta_range
    if sampler.stochastic and not lo < s.eta <= hi:
        raise ConfigError(f"sampler.eta: must be in ({lo}, {hi}] for sampler.kind {s.kind}, got {s.eta}")
    algorithm = ALGORITHMS[cfg.algorithm]
    problem = algorithm.config_error(cfg) or window_error(s)  # the most specific message first
    if not problem and s.logprob_convention not in sampler.logprob_conventions:
        problem = f"sampler.logprob_convention {s.logprob_convention} needs sampler.kind cps"
    if not problem and s.kl_kernel == "rollout" and not sampler.stochastic:
        problem = ("sampler.kl_kernel: an ode rollout has no stochastic kernel to measure the path KL to the base "
                   "in; set sampler.kl_kernel=flow_sde (or cps, dance_sde)")
    if not problem and cfg.optim.fsdp and not algorithm.supports_fsdp:
        problem = f"optim.fsdp: not supported by {cfg.algorithm} (its slow copy of the weights is not sharded)"
    if problem:
        raise ConfigError(problem)
    check_backends(cfg.logging.backends)
    if sum(cfg.reward.weights) == 0:
        raise ConfigError(f"reward.weights: must not sum to 0 (the logged reward is their weighted mean), got "
                          f"{cfg.reward.weights}")
    if len(cfg.reward.weights) != len(cfg.reward.names) or not cfg.reward.names:
        raise ConfigError(
            f"reward.weights: need one weight per reward name ({len(cfg.reward.names)} names, "
            f"{len(cfg.reward.weights)} weights)"
        )
    return cfg


def load_config(
    method: str | None = None, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Preset of ``method`` (default flow_dppo), then the YAML file, then the dotted overrides."""
    tree = merge(read_yaml(config_file), parse_overrides(overrides or []))
    method = method or tree.get("method", "flow_dppo")
    if not isinstance(method, str) or method not in PRESETS:
        raise ConfigError(f"method: must be one of {', '.join(PRESETS)}; got {shown(method)}"
                          f"{did_you_mean(method, PRESETS)}")
    user = {k: v for k, v in tree.items() if k != "method"}
    cfg = validate(build(TrainConfig, merge(merge({"method": method}, PRESETS[method]), user)))
    check_algorithm_keys(cfg, flatten_keys(user))
    return cfg


def check_algorithm_keys(cfg: TrainConfig, given: dict) -> None:
    """Refuse a setting of an algorithm section (``loss``, ``nft``, ``awm``) that ``cfg.algorithm`` does not
    read: it would silently do nothing."""
    reads = ALGORITHMS[cfg.algorithm].reads
    for key in given:
        if key.split(".")[0] in ALGORITHM_SECTIONS and not any(key == r or key.startswith(r) for r in reads):
            raise ConfigError(f"{key}: the {cfg.algorithm} algorithm does not use it (it reads "
                              f"{', '.join(r + '*' if r.endswith('.') else r for r in reads)}); remove it")


def resume_config(
    saved: dict, method: str | None = None, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """A run's saved config with what the command line gives on top (a resumed run refuses any change)."""
    tree = merge(merge(saved, read_yaml(config_file)), parse_overrides(overrides or []))
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


def config_from_dict(tree: dict) -> TrainConfig:
    """A validated config from a resolved mapping (e.g. a run's saved ``config.yaml``)."""
    return validate(build(TrainConfig, tree))


def save_config(cfg: TrainConfig, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = ["ConfigError", "PRESETS", "TrainConfig", "config_from_dict", "load_config", "resume_config", "save_config",
           "to_dict"]
