"""Will a recipe fit on one GPU? Parameter counts and the peak GPU memory of one training process, no weights read.

    flowdppo plan --config my.yaml optim.minibatch_size=8

Every model of the pipeline is built from its ``config.json`` on the meta device (tensors with a shape and a
dtype but no data), so a 20B-parameter model folder is planned on a laptop in seconds. The activation bytes are
measured, not guessed: one forward of the real transformer class through the policy adapter's own
``transformer_output``, on meta inputs of the shapes training feeds (``latent_shape``, the adapter's own text
encoding), under ``torch.autograd.graph.saved_tensors_hooks``, summing the tensors autograd keeps for the
backward pass. The rest is arithmetic:

    peak = weights + trainable state + copies + activations
    weights            sum over components on the device of params x bytes(precision)
                       (a fully fine-tuned transformer is cast to float32: 4 bytes per parameter)
    trainable state    trainable params x (4 master weight + 4 gradient + 8 Adam moments) bytes (the master weight
                       of full fine-tuning is the transformer itself, counted in weights)
    copies             full fine-tuning: a frozen float32 reference transformer (the base of the KL); DiffusionNFT
                       and AWM: a float32 slow copy of the trainable weights
    activations        saved tensors of one forward of minibatch_size x (2 if the family guides) rows; with
                       gradient checkpointing: the saved tensors outside the blocks + the inputs each block keeps
                       for its recomputation + the largest block's saved tensors (recomputed in the backward);
                       plus, estimated, the backward's gradients in flight: half the largest block's saved tensors
    offloaded encoders text_encoders=offload: the text encoders visit the GPU to encode new prompts, outside a
                       backward pass, so the peak takes the larger of them and the activations

Not modelled: the rollout's no-grad forwards and VAE decoding (``sampler.rollout_batch_size`` bounds them), the
optimizer step's temporaries, the CUDA context and allocator fragmentation (``RESERVED_GIB`` is set aside for
them), and FSDP sharding (``optim.fsdp`` divides the transformer's weights, gradients and Adam moments by the
process count).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from flowdppo.algorithms import ALGORITHMS
from flowdppo.algorithms.likelihood_free import LikelihoodFree
from flowdppo.config import task_options
from flowdppo.errors import ConfigError
from flowdppo.plan_meta import ActivationBytes, measure_activations, meta_policy, parameter_count
from flowdppo.plan_sources import is_shipped, plan_model
from flowdppo.policies.limits import GIB, human_bytes, sample_error
from flowdppo.policies.lora import chosen_experts, make_trainable, trainable_parameters
from flowdppo.policies.pipelines import PipelinePolicy, text_encoder_names
from flowdppo.tasks.text_to_image import DTYPES

PLANNED_TASKS = ("text_to_image", "text_to_video")
GPU_SIZES_GB = (24, 48, 80)
RESERVED_GIB = 1.5  # CUDA context, cuBLAS / cuDNN workspaces: not available to tensors
ADAM_BYTES = 4 + 4 + 8  # per trainable parameter: float32 master weight, gradient, two Adam moments
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the surface of the moon, highly detailed"
ON_GPU = {"keep": "yes", "offload": "encoding", "free": "no"}  # text_encoders placement -> the table's column
LORA_OPTION_RANK = 8  # the LoRA rank suggested for a full fine-tuning recipe that does not fit


# ---- the plan ----------------------------------------------------------------------------------------------------
@dataclass
class Component:
    name: str
    class_name: str
    params: int
    dtype: torch.dtype
    text_encoder: bool

    @property
    def bytes(self) -> int:
        return self.params * self.dtype.itemsize


@dataclass
class Recipe:
    """The settings the memory depends on (one option of ``fitting_options`` changes some of them)."""

    precision: str
    lora_rank: int
    minibatch_size: int
    gradient_checkpointing: bool
    text_encoders: str = "keep"
    """"keep" (on the GPU throughout), "offload" (on the GPU only while they encode new prompts) or "free" (dropped
    once every prompt is encoded, before training)."""


@dataclass
class Estimate:
    """Bytes of one process at the peak of a training step (``total``), by part."""

    recipe: Recipe
    weights: int
    trainable_state: int
    copies: int
    activations: int
    encoding: int
    """Offloaded text encoders, on the GPU while they encode new prompts (not during a backward pass)."""

    @property
    def total(self) -> int:
        return self.weights + self.trainable_state + self.copies + max(self.activations, self.encoding)


@dataclass
class Plan:
    model: str
    family: str
    components: list[Component]
    trainable: dict[int, int]
    """lora_rank -> trainable parameters (0: the whole transformer)."""
    rows_per_element: int
    text_tokens_prompt: str
    recipe: Recipe
    activations: dict[tuple[str, int], tuple[ActivationBytes, ActivationBytes]]
    """(precision, lora_rank) -> (without, with) checkpointing, at ``recipe.minibatch_size`` elements."""
    slow_copy: bool
    transformer_params: int
    text_encoder_choice: bool = False
    """Whether the config has ``text_encoders`` (keep / offload / free)."""
    trained_experts: list[str] = field(default_factory=lambda: ["transformer"])
    """The denoising networks trained (Wan 2.2 A14B: ``transformer`` and ``transformer_2``)."""

    def estimate(self, recipe: Recipe | None = None) -> Estimate:
        return estimate(self, recipe or self.recipe)


def plan_prompt(cfg) -> str:
    """The longest prompt of the recipe's prompt file (text length matters for Qwen-Image), else a typical one."""
    prompts = task_options(cfg).prompts
    if not prompts:
        return DEFAULT_PROMPT
    from flowdppo.prompts import load_prompts

    return max((r["prompt"] for r in load_prompts(prompts)), key=len)


def make_plan(cfg, variants: bool = True) -> Plan:
    """Count the pipeline's parameters and measure the recipe's activations, all on the meta device.

    ``variants``: also measure the settings ``fitting_options`` may suggest (bfloat16, LoRA)."""
    if cfg.task not in PLANNED_TASKS:
        raise ConfigError(
            f"plan: plans {' and '.join(PLANNED_TASKS)} recipes (a diffusers pipeline in model=); the {cfg.task} "
            "task's model is tiny and trains on a CPU"
        )
    if not cfg.model:
        raise ConfigError(f"model: the {cfg.task} task needs a diffusers pipeline folder or hub id")
    model, source = cfg.model, plan_model(cfg.model)  # a folder of configs (shipped for the recipes' hub ids), or an id
    cfg = replace(cfg, model=source)
    recipe = Recipe(
        cfg.precision,
        cfg.optim.lora_rank,
        cfg.optim.minibatch_size,
        cfg.optim.gradient_checkpointing,
        getattr(task_options(cfg), "text_encoders", "keep"),
    )
    prompt = plan_prompt(cfg)
    measured: dict[tuple[str, int], tuple[ActivationBytes, ActivationBytes]] = {}
    policy = meta_policy(cfg, DTYPES[recipe.precision])
    largest = max(GPU_SIZES_GB)  # one sample beyond the largest GPU planned: refused before its position tables
    problem = sample_error(
        policy,
        policy.guides(cfg.sampler.guidance_scale),
        usable_bytes(largest),
        f"the largest GPU planned ({largest} GB)",
    )
    if problem:
        raise ConfigError(problem)
    pipeline = policy.pipeline
    components = [
        Component(
            name,
            type(module).__name__,
            parameter_count(module),
            DTYPES[cfg.precision],
            name in text_encoder_names(pipeline),
        )
        for name, module in sorted(pipeline.components.items(), key=lambda item: component_order(item[0]))
        if isinstance(module, nn.Module)
    ]
    trained = list(chosen_experts(policy, cfg.optim.trained_experts))  # the experts a rank-0 recipe fine-tunes
    transformer_params = sum(parameter_count(getattr(policy, name)) for name in trained)
    rows = recipe.minibatch_size * (2 if policy.guides(cfg.sampler.guidance_scale) else 1)
    trainable = {}
    for precision, rank in plan_variants(recipe) if variants else [(recipe.precision, recipe.lora_rank)]:
        candidate = meta_policy(cfg, DTYPES[precision]) if (precision, rank) != plan_variants(recipe)[0] else policy
        make_trainable_as_train_does(candidate, cfg, rank)
        trainable[rank] = sum(p.numel() for p in trainable_parameters(candidate))
        measured[(precision, rank)] = measure_activations(candidate, rows, prompt)
    return Plan(
        model=f"{model} (its architecture as shipped with flowdppo)" if is_shipped(source) else model,
        family=type(pipeline).__name__,
        components=components,
        trainable=trainable,
        rows_per_element=rows // recipe.minibatch_size,
        text_tokens_prompt=prompt,
        recipe=recipe,
        activations=measured,
        slow_copy=issubclass(ALGORITHMS[cfg.algorithm], LikelihoodFree),
        transformer_params=transformer_params,
        text_encoder_choice=hasattr(task_options(cfg), "text_encoders"),
        trained_experts=trained,
    )


def component_order(name: str) -> tuple[int, str]:
    """The transformers first, then the text encoders, then the rest (the VAE)."""
    return (0 if name.startswith("transformer") else 1 if name.startswith("text_encoder") else 2, name)


def make_trainable_as_train_does(policy: PipelinePolicy, cfg, lora_rank: int) -> None:
    """``make_trainable`` with the recipe's LoRA settings and experts."""
    o = cfg.optim
    make_trainable(policy, lora_rank, o.lora_alpha, o.lora_target_modules, o.lora_text_stream, o.trained_experts)


def plan_variants(recipe: Recipe) -> list[tuple[str, int]]:
    """(precision, lora_rank) pairs to measure: the recipe's, and bfloat16 / LoRA when the recipe is not."""
    precisions = [recipe.precision] + (["bfloat16"] if recipe.precision == "float32" else [])
    ranks = [recipe.lora_rank] + ([LORA_OPTION_RANK] if recipe.lora_rank == 0 else [])
    return [(p, r) for r in ranks for p in precisions]


def estimate(plan: Plan, recipe: Recipe) -> Estimate:
    """Peak bytes of one process for ``recipe`` (see the module docstring for the formula).

    Activations scale linearly from the measured mini-batch to ``recipe.minibatch_size``."""
    full = recipe.lora_rank == 0
    dtype = DTYPES[recipe.precision]
    weights = sum(
        c.params * (4 if full and c.name in plan.trained_experts else dtype.itemsize)
        for c in plan.components
        if not c.text_encoder or recipe.text_encoders == "keep"
    )
    offloaded = recipe.text_encoders == "offload"
    encoding = sum(c.params * dtype.itemsize for c in plan.components if c.text_encoder and offloaded)
    trainable = plan.trainable[recipe.lora_rank]
    state = trainable * (ADAM_BYTES - 4 if full else ADAM_BYTES)  # full: the float32 weights are in ``weights``
    copies = (4 * plan.transformer_params if full else 0) + (4 * trainable if plan.slow_copy else 0)
    without, with_ = plan.activations[(recipe.precision, recipe.lora_rank)]
    measured = (with_ if recipe.gradient_checkpointing else without).peak
    activations = round(measured * recipe.minibatch_size / plan.recipe.minibatch_size)
    return Estimate(recipe, weights, state, copies, activations, encoding)


# ---- what fits -----------------------------------------------------------------------------------------------------
def usable_bytes(gpu_gb: int) -> int:
    return int((gpu_gb - RESERVED_GIB) * GIB)


def option_recipes(plan: Plan) -> list[tuple[list[str], Recipe]]:
    """The recipe with the changes that cut memory, fewest changes first: gradient checkpointing, bfloat16, LoRA."""
    recipe, options = plan.recipe, [([], plan.recipe)]
    changes = []
    if not recipe.gradient_checkpointing:
        changes.append(("optim.gradient_checkpointing=true", {"gradient_checkpointing": True}))
    if recipe.precision == "float32":
        changes.append(("precision=bfloat16", {"precision": "bfloat16"}))
    if recipe.lora_rank == 0:
        changes.append((f"optim.lora_rank={LORA_OPTION_RANK}", {"lora_rank": LORA_OPTION_RANK}))
    if recipe.text_encoders != "free" and plan.text_encoder_choice:
        changes.append(("text_encoders=free", {"text_encoders": "free"}))
    for mask in range(1, 2 ** len(changes)):
        chosen = [c for i, c in enumerate(changes) if mask >> i & 1]
        fields = {k: v for _, change in chosen for k, v in change.items()}
        options.append(([name for name, _ in chosen], replace(recipe, **fields)))
    return sorted(options, key=lambda option: len(option[0]))


def largest_minibatch(plan: Plan, recipe: Recipe, budget: int) -> int:
    """The largest ``minibatch_size`` <= the recipe's whose estimate fits in ``budget`` bytes (0: none)."""
    lo, hi = 0, recipe.minibatch_size  # the estimate grows with the mini-batch: bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if estimate(plan, replace(recipe, minibatch_size=mid)).total <= budget else (lo, mid - 1)
    return lo


def fitting_option(plan: Plan, gpu_gb: int) -> str:
    """What makes the recipe fit on one ``gpu_gb`` GB GPU: the fewest changes at the recipe's mini-batch, else the
    fewest changes with a smaller ``optim.minibatch_size``, else that nothing does."""
    budget = usable_bytes(gpu_gb)
    options = option_recipes(plan)
    for names, recipe in options:
        if estimate(plan, recipe).total <= budget:
            return "fits as is" if not names else "fits with " + " ".join(names)
    for names, recipe in options:
        size = largest_minibatch(plan, recipe, budget)
        if size:
            return "fits with " + " ".join([*names, f"optim.minibatch_size={size}"])
    smallest = min(estimate(plan, replace(r, minibatch_size=1)).total for _, r in options)
    return f"does not fit: even with every option and optim.minibatch_size=1 it needs {human_bytes(smallest)}"


# ---- the report ----------------------------------------------------------------------------------------------------
def format_plan(plan: Plan) -> str:
    """The component table, the peak estimate with and without gradient checkpointing, and what fits where."""
    recipe = plan.recipe
    lines = [f"{plan.family} at {plan.model}", ""]
    rows = [("component", "class", "params", "bytes", "on GPU")]
    for c in plan.components:
        nbytes = c.params * 4 if c.name in plan.trained_experts and recipe.lora_rank == 0 else c.bytes
        on_gpu = ON_GPU[recipe.text_encoders] if c.text_encoder else "yes"
        rows.append((c.name, c.class_name, f"{c.params:,}", human_bytes(nbytes), on_gpu))
    what = "full transformer" if recipe.lora_rank == 0 else f"LoRA r {recipe.lora_rank}"
    rows.append(("trainable", what, f"{plan.trainable[recipe.lora_rank]:,}", "float32", ""))
    lines += table(rows)
    guided = " x 2 (guidance: the unconditional branch is trained through too)" if plan.rows_per_element == 2 else ""
    lines += [
        "",
        f"peak GPU memory of one process: precision {recipe.precision}, optim.minibatch_size "
        f"{recipe.minibatch_size}{guided}",
    ]
    without = estimate(plan, replace(recipe, gradient_checkpointing=False))
    with_ = estimate(plan, replace(recipe, gradient_checkpointing=True))
    copies = "reference transformer (full fine-tuning)" if recipe.lora_rank == 0 else ""
    if plan.slow_copy:
        copies = " + ".join(filter(None, [copies, "slow copy of the trainable weights"]))
    rows = [("", "no checkpointing", "gradient checkpointing")]
    rows.append(("weights", human_bytes(without.weights), human_bytes(with_.weights)))
    state = (human_bytes(without.trainable_state), human_bytes(with_.trainable_state))
    rows.append(("trainable: weights, grads, Adam", *state))
    if copies:
        rows.append((copies, human_bytes(without.copies), human_bytes(with_.copies)))
    rows.append(("activations (measured)", human_bytes(without.activations), human_bytes(with_.activations)))
    if without.encoding:
        rows.append(("offloaded text encoders (encoding)", human_bytes(without.encoding), human_bytes(with_.encoding)))
    rows.append(
        (
            "peak" if not without.encoding else "peak (max of activations, encoding)",
            human_bytes(without.total),
            human_bytes(with_.total),
        )
    )
    lines += table(rows)
    current = "gradient checkpointing" if recipe.gradient_checkpointing else "no checkpointing"
    lines += ["", f"the recipe runs with {current}; on one GPU ({RESERVED_GIB} GiB kept for the CUDA context):"]
    lines += [f"  {gb} GB: {fitting_option(plan, gb)}" for gb in GPU_SIZES_GB]
    return "\n".join(lines)


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells, the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]).rstrip()
        for row in rows
    ]
