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

import importlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flowdppo.algorithms import ALGORITHMS
from flowdppo.algorithms.likelihood_free import LikelihoodFree
from flowdppo.config import task_options
from flowdppo.errors import ConfigError
from flowdppo.policies.limits import GIB, human_bytes, sample_error
from flowdppo.policies.lora import make_trainable, trainable_parameters
from flowdppo.policies.pipelines import PipelinePolicy, pipeline_policy_class, text_encoder_names
from flowdppo.tasks.text_to_image import DTYPES

GPU_SIZES_GB = (24, 48, 80)
RESERVED_GIB = 1.5  # CUDA context, cuBLAS / cuDNN workspaces: not available to tensors
ADAM_BYTES = 4 + 4 + 8  # per trainable parameter: float32 master weight, gradient, two Adam moments
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the surface of the moon, highly detailed"
ON_GPU = {"keep": "yes", "offload": "encoding", "free": "no"}  # text_encoders placement -> the table's column
LORA_OPTION_RANK = 8  # the LoRA rank suggested for a full fine-tuning recipe that does not fit


# ---- the pipeline on the meta device -----------------------------------------------------------------------------
def meta_component(model: str, name: str, library: str, class_name: str, dtype: torch.dtype):
    """One pipeline component: a module built from its ``config.json`` on the meta device in ``dtype`` (no weights
    read), or the real scheduler / tokenizer (small files)."""
    cls = getattr(importlib.import_module(library), class_name)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return cls.from_pretrained(model, subfolder=name)
    try:
        if library == "diffusers":
            config = cls.load_config(model, subfolder=name)
        else:
            config = cls.config_class.from_pretrained(model, subfolder=name)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model: cannot read the config of {model}/{name} ({err})") from err
    with init_empty_weights():  # parameters on meta; buffers are real, small, and moved below
        module = cls.from_config(config) if library == "diffusers" else cls._from_config(config)
    if hasattr(module, "tie_weights"):  # shared embeddings, as from_pretrained ties them (T5's shared / embed_tokens)
        module.tie_weights()
    nn.Module.to(module, device="meta", dtype=dtype)  # nn.Module's own .to: no "keep in float32" warnings
    return module.requires_grad_(False).eval()


def meta_pipeline(model: str, dtype: torch.dtype) -> DiffusionPipeline:
    """The pipeline of ``model`` (folder or hub id) with every module on the meta device, from configs alone."""
    family = pipeline_policy_class(model)  # a one-line error for a folder that is not a supported pipeline
    index = DiffusionPipeline.load_config(model)
    components = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)) or len(spec) != 2:
            continue
        library, class_name = spec
        components[name] = None if class_name is None else meta_component(model, name, library, class_name, dtype)
    return family.pipeline_class(**components)


def meta_policy(cfg, dtype: torch.dtype) -> PipelinePolicy:
    """The recipe's policy adapter around a meta-device pipeline (frozen; ``make_trainable`` as ``train`` does)."""
    pipeline, options = meta_pipeline(cfg.model, dtype), task_options(cfg)
    return pipeline_policy_class(cfg.model)(pipeline, options.resolution, embedded_guidance=options.embedded_guidance)


def parameter_count(module: nn.Module | None) -> int:
    """``sum(p.numel())`` over the module's (deduplicated) parameters; 0 for an absent component."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())


# ---- activations, measured on the meta device -----------------------------------------------------------------
@dataclass
class ActivationBytes:
    """Bytes a forward keeps for the backward pass (unique storages; parameters, buffers, other tensors the modules
    hold and the inputs excluded), and what the backward adds."""

    saved: int
    """Tensors autograd saves (with checkpointing: those outside the checkpointed blocks)."""
    block_inputs: int = 0
    """With checkpointing: the inputs each checkpointed block keeps to recompute its forward."""
    recomputed: int = 0
    """With checkpointing: the largest block's saved tensors, alive again while it is recomputed in the backward."""
    largest_block: int = 0
    """The largest block's saved tensors (without checkpointing)."""

    @property
    def kept(self) -> int:
        """What the forward leaves for the backward: the peak of the forward pass."""
        return self.saved + self.block_inputs

    @property
    def working(self) -> int:
        """Gradients in flight while one block runs its backward: estimated as half its saved tensors (within a few
        per cent of the measured peak on the tiny models of every family)."""
        return self.largest_block // 2

    @property
    def peak(self) -> int:
        return self.kept + self.recomputed + self.working


class GPUAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as a GPU runs it: the memory-efficient kernel, which saves q, k, v, the
    output and the log-sum-exp (on the meta device PyTorch would pick the math path and save the full attention
    matrix, which no GPU kernel keeps)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return efficient_attention(*args, **kwargs)


def efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False):  # fmt: skip
    """``F.scaled_dot_product_attention`` through ``aten._scaled_dot_product_efficient_attention``."""
    q, k, v = query, key, value
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, -float("inf"))
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, q.requires_grad or k.requires_grad or v.requires_grad, dropout_p, is_causal, scale=scale
    )
    return out[0]


def storage_key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


class CreatedStorages(TorchDispatchMode):
    """Records the storage of every tensor an operation allocates inside the block (not views of its inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        self.keys.update({storage_key(t) for t in tree_flatten(out)[0] if isinstance(t, Tensor)} - inputs)
        return out


@contextmanager
def saved_tensor_bytes(on_save: Callable[[int, int], None]):
    """Inside the block, ``on_save(key, nbytes)`` for every tensor autograd saves whose storage an operation inside
    the block created: parameters, buffers, inputs and tensors cached by an earlier forward (rotary tables) are the
    model's or the caller's memory, not activations. ``key`` identifies the storage, so a tensor saved twice, or two
    views of one tensor, count once."""
    created = CreatedStorages()

    def pack(t: Tensor) -> Tensor:
        key = storage_key(t)
        if key in created.keys:
            on_save(key, t.untyped_storage().nbytes())
        return t

    with GPUAttention(), created, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield created.keys


def measure_activations(policy: PipelinePolicy, rows: int, prompt: str) -> tuple[ActivationBytes, ActivationBytes]:
    """Activation bytes of one training forward of ``rows`` transformer rows, (without, with) gradient checkpointing.

    One meta-device forward of ``policy.transformer_output`` with diffusers' checkpointing on, recording the
    blocks it checkpoints and the tensors each keeps for recomputation; then one with it off, attributing each
    saved tensor to the block that saved it."""
    transformer = policy.transformer
    x = torch.empty((rows, *policy.latent_shape), dtype=policy.dtype, device="meta")
    sigma = torch.full((rows,), 0.5, device="meta")
    embeds = prompt_embeddings(policy, rows, prompt)
    with torch.no_grad(), GPUAttention():
        policy.transformer_output(x, sigma, embeds)  # caches (rotary tables) are made here, as in a training run

    outside: dict[int, int] = {}
    block_inputs: dict[int, int] = {}
    blocks: list[nn.Module] = []

    def recording(func):
        def run(block, *args):
            blocks.append(block)
            for t in tree_flatten(args)[0]:
                if isinstance(t, Tensor) and storage_key(t) in created:
                    block_inputs[storage_key(t)] = t.untyped_storage().nbytes()
            return func(block, *args)

        return run

    policy.enable_gradient_checkpointing()
    checkpointing = [m for m in transformer.modules() if getattr(m, "_gradient_checkpointing_func", None)]
    for module in checkpointing:
        module._gradient_checkpointing_func = recording(module._gradient_checkpointing_func)
    with saved_tensor_bytes(outside.__setitem__) as created:
        policy.transformer_output(x, sigma, embeds)
    transformer.disable_gradient_checkpointing()

    saved: dict[int, int] = {}
    per_block: dict[int, dict[int, int]] = {}
    current: list[nn.Module | None] = [None]

    def on_save(key: int, nbytes: int) -> None:
        saved[key] = nbytes
        if current[0] is not None:
            per_block.setdefault(id(current[0]), {})[key] = nbytes

    hooks = []
    for block in set(blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a: current.__setitem__(0, m)))
        hooks.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    with saved_tensor_bytes(on_save):
        policy.transformer_output(x, sigma, embeds)
    for hook in hooks:
        hook.remove()

    largest = max((sum(b.values()) for b in per_block.values()), default=0)
    without = ActivationBytes(saved=sum(saved.values()), largest_block=largest)
    if not blocks:  # the model has no diffusers checkpointing: it saves as much with it "on"
        return without, without
    inputs = {k: v for k, v in block_inputs.items() if k not in outside}
    return without, ActivationBytes(sum(outside.values()), sum(inputs.values()), largest, largest)


def prompt_embeddings(policy: PipelinePolicy, rows: int, prompt: str) -> dict[str, Tensor]:
    """The adapter's own text encoding of ``prompt`` on the meta pipeline, repeated to ``rows`` rows.

    Meta tensors have no values, so two reads of values are answered as they are for one prompt alone, which is
    not padded: a scalar read from a mask (``if mask.all()``) is true (``MetaScalarsAreOne``), and a pipeline
    that drops padded tokens with ``_extract_masked_hidden`` (Qwen-Image) keeps every token. Only the shapes of
    the result are used."""
    pipeline = policy.pipeline
    if hasattr(pipeline, "_extract_masked_hidden"):
        pipeline._extract_masked_hidden = lambda hidden, mask: list(hidden)
    encode = getattr(policy, "encode_text", policy.encode_prompts)
    with torch.no_grad(), MetaScalarsAreOne():
        embeds = encode([prompt])
    return {k: t.expand(rows, *t.shape[1:]).contiguous() for k, t in embeds.items()}


class MetaScalarsAreOne(TorchDispatchMode):
    """A Python scalar read from a meta tensor (``.item()``, ``bool(t.all())``) is 1 (True)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return True if args[0].dtype == torch.bool else 1
        return func(*args, **(kwargs or {}))


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
    if cfg.task != "text_to_image":
        raise ConfigError(f"plan: plans task=text_to_image recipes (a diffusers pipeline in model=); the {cfg.task} "
                          "task's model is tiny and trains on a CPU")  # fmt: skip
    if not cfg.model:
        raise ConfigError("model: the text_to_image task needs a diffusers pipeline folder or hub id")
    recipe = Recipe(cfg.precision, cfg.optim.lora_rank, cfg.optim.minibatch_size, cfg.optim.gradient_checkpointing,
                    getattr(cfg, "text_encoders", "keep"))  # fmt: skip
    prompt = plan_prompt(cfg)
    measured: dict[tuple[str, int], tuple[ActivationBytes, ActivationBytes]] = {}
    policy = meta_policy(cfg, DTYPES[recipe.precision])
    largest = max(GPU_SIZES_GB)  # one sample beyond the largest GPU planned: refused before its position tables
    problem = sample_error(policy, policy.guides(cfg.sampler.guidance_scale), usable_bytes(largest),
                           f"the largest GPU planned ({largest} GB)")  # fmt: skip
    if problem:
        raise ConfigError(problem)
    pipeline = policy.pipeline
    components = [
        Component(name, type(module).__name__, parameter_count(module), DTYPES[cfg.precision],
                  name in text_encoder_names(pipeline))  # fmt: skip
        for name, module in sorted(pipeline.components.items(), key=lambda item: component_order(item[0]))
        if isinstance(module, nn.Module)
    ]
    transformer_params = parameter_count(policy.transformer)
    rows = recipe.minibatch_size * (2 if policy.guides(cfg.sampler.guidance_scale) else 1)
    trainable = {}
    for precision, rank in plan_variants(recipe) if variants else [(recipe.precision, recipe.lora_rank)]:
        candidate = meta_policy(cfg, DTYPES[precision]) if (precision, rank) != plan_variants(recipe)[0] else policy
        make_trainable_as_train_does(candidate, cfg, rank)
        trainable[rank] = sum(p.numel() for p in trainable_parameters(candidate))
        measured[(precision, rank)] = measure_activations(candidate, rows, prompt)
    return Plan(
        model=cfg.model,
        family=type(pipeline).__name__,
        components=components,
        trainable=trainable,
        rows_per_element=rows // recipe.minibatch_size,
        text_tokens_prompt=prompt,
        recipe=recipe,
        activations=measured,
        slow_copy=issubclass(ALGORITHMS[cfg.algorithm], LikelihoodFree),
        transformer_params=transformer_params,
        text_encoder_choice=hasattr(cfg, "text_encoders"),
    )


def component_order(name: str) -> tuple[int, str]:
    """The transformer first, then the text encoders, then the rest (the VAE)."""
    return (0 if name == "transformer" else 1 if name.startswith("text_encoder") else 2, name)


def make_trainable_as_train_does(policy: PipelinePolicy, cfg, lora_rank: int) -> None:
    """``make_trainable`` with the recipe's LoRA settings (``optim.lora_text_stream`` where the config has it)."""
    text_stream = (cfg.optim.lora_text_stream,) if hasattr(cfg.optim, "lora_text_stream") else ()
    make_trainable(policy, lora_rank, cfg.optim.lora_alpha, cfg.optim.lora_target_modules, *text_stream)


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
    weights = sum(c.params * (4 if full and c.name == "transformer" else dtype.itemsize)
                  for c in plan.components if not c.text_encoder or recipe.text_encoders == "keep")  # fmt: skip
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
        nbytes = c.params * 4 if c.name == "transformer" and recipe.lora_rank == 0 else c.bytes
        on_gpu = ON_GPU[recipe.text_encoders] if c.text_encoder else "yes"
        rows.append((c.name, c.class_name, f"{c.params:,}", human_bytes(nbytes), on_gpu))
    what = "full transformer" if recipe.lora_rank == 0 else f"LoRA r {recipe.lora_rank}"
    rows.append(("trainable", what, f"{plan.trainable[recipe.lora_rank]:,}", "float32", ""))
    lines += table(rows)
    guided = " x 2 (guidance: the unconditional branch is trained through too)" if plan.rows_per_element == 2 else ""
    lines += ["", f"peak GPU memory of one process: precision {recipe.precision}, optim.minibatch_size "
              f"{recipe.minibatch_size}{guided}"]  # fmt: skip
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
    rows.append(("peak" if not without.encoding else "peak (max of activations, encoding)",
                 human_bytes(without.total), human_bytes(with_.total)))  # fmt: skip
    lines += table(rows)
    current = "gradient checkpointing" if recipe.gradient_checkpointing else "no checkpointing"
    lines += ["", f"the recipe runs with {current}; on one GPU ({RESERVED_GIB} GiB kept for the CUDA context):"]
    lines += [f"  {gb} GB: {fitting_option(plan, gb)}" for gb in GPU_SIZES_GB]
    return "\n".join(lines)


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells, the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))])
            .rstrip() for row in rows]  # fmt: skip
