"""The pipeline of a recipe on the meta device, and the activation bytes of one training forward, measured there.

Every model of the pipeline is built from its ``config.json`` on the meta device (tensors with a shape and a
dtype but no data): no weights are read. ``measure_activations`` runs one forward of the real transformer class
through the policy adapter's own ``transformer_output``, on meta inputs of the shapes training feeds, under
``torch.autograd.graph.saved_tensors_hooks``, summing the tensors autograd keeps for the backward pass.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flowdppo.config import task_options
from flowdppo.errors import ConfigError
from flowdppo.plan_sources import TOKENIZER_SPEC, stand_in_tokenizer
from flowdppo.policies.lora import experts, trained_experts
from flowdppo.policies.pipelines import PipelinePolicy


# ---- the pipeline on the meta device -----------------------------------------------------------------------------
def meta_component(model: str, name: str, library: str, class_name: str, dtype: torch.dtype):
    """One pipeline component: a module built from its ``config.json`` on the meta device in ``dtype`` (no weights
    read), or the real scheduler / tokenizer (small files; a shipped architecture's stand-in tokenizer)."""
    cls = getattr(importlib.import_module(library), class_name)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        if (Path(model) / name / TOKENIZER_SPEC).is_file():
            return stand_in_tokenizer(Path(model) / name)
        return cls.from_pretrained(model, subfolder=name)
    try:
        if library == "diffusers":
            config = cls.load_config(model, subfolder=name)
        else:
            config = cls.config_class.from_pretrained(model, subfolder=name)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model: cannot read the config of {model}/{name} ({err})") from err
    build = partial(cls.from_config, config) if library == "diffusers" else partial(cls._from_config, config)
    try:  # every tensor made on meta: a position table (SD3.5's 226M-entry pos_embed) is not computed
        with torch.device("meta"), init_empty_weights():
            module = build()
    except Exception:  # a model whose construction reads tensor values (a real error raises again below)
        with init_empty_weights():  # parameters on meta; buffers are real and moved below
            module = build()
    if hasattr(module, "tie_weights"):  # shared embeddings, as from_pretrained ties them (T5's shared / embed_tokens)
        module.tie_weights()
    nn.Module.to(module, device="meta", dtype=dtype)  # nn.Module's own .to: no "keep in float32" warnings
    return module.requires_grad_(False).eval()


def meta_pipeline(model: str, dtype: torch.dtype, family: type[PipelinePolicy]) -> DiffusionPipeline:
    """The pipeline of ``model`` (a folder or hub id of the adapter ``family``) with every module on the meta device,
    from configs alone; its settings (Wan 2.2's ``boundary_ratio``) as ``from_pretrained`` passes them."""
    index = DiffusionPipeline.load_config(model)
    accepted = inspect.signature(family.pipeline_class.__init__).parameters
    components = {}
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(spec, (list, tuple)) or len(spec) != 2:
            if name in accepted:
                components[name] = spec
            continue
        library, class_name = spec
        components[name] = None if class_name is None else meta_component(model, name, library, class_name, dtype)
    return family.pipeline_class(**components)


def meta_policy(cfg, dtype: torch.dtype) -> PipelinePolicy:
    """The recipe's policy adapter around a meta-device pipeline (frozen; ``make_trainable`` as ``train`` does), built
    as its task builds it (``policy_options``: a video's size, a second expert's guidance)."""
    from flowdppo.tasks import task_class

    task, options = task_class(cfg), task_options(cfg)
    family = task.policy_class(cfg)  # a one-line error for a folder that is not a pipeline of the task
    kwargs = {k: v for k, v in task.policy_options(cfg).items() if k not in ("families", "task")}
    pipeline = meta_pipeline(cfg.model, dtype, family)
    return family(pipeline, options.resolution, embedded_guidance=options.embedded_guidance, **kwargs)


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


def efficient_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
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
    x = torch.empty((rows, *policy.latent_shape), dtype=policy.dtype, device="meta")
    sigma = torch.full((rows,), 0.5, device="meta")
    forward = training_forward(policy)
    embeds = prompt_embeddings(policy, rows, prompt)
    with torch.no_grad(), GPUAttention():
        forward(x, sigma, embeds)  # caches (rotary tables) are made here, as in a training run

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
    every = experts(policy).values()
    checkpointing = [m for e in every for m in e.modules() if getattr(m, "_gradient_checkpointing_func", None)]
    for module in checkpointing:
        module._gradient_checkpointing_func = recording(module._gradient_checkpointing_func)
    with saved_tensor_bytes(outside.__setitem__) as created:
        forward(x, sigma, embeds)
    for expert in every:
        expert.disable_gradient_checkpointing()

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
        forward(x, sigma, embeds)
    for hook in hooks:
        hook.remove()

    largest = max((sum(b.values()) for b in per_block.values()), default=0)
    without = ActivationBytes(saved=sum(saved.values()), largest_block=largest)
    if not blocks:  # the model has no diffusers checkpointing: it saves as much with it "on"
        return without, without
    inputs = {k: v for k, v in block_inputs.items() if k not in outside}
    return without, ActivationBytes(sum(outside.values()), sum(inputs.values()), largest, largest)


def training_forward(policy: PipelinePolicy) -> Callable:
    """The measured forward: ``policy.transformer_output``, or with several experts (Wan) one trained expert's
    ``expert_output`` (the experts share one architecture; which one a noise level takes is read from tensor values,
    which the meta device does not have)."""
    if not hasattr(policy, "expert_output"):
        return policy.transformer_output
    return partial(policy.expert_output, next(iter(trained_experts(policy).values())))


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
