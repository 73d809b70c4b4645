"""Teachers of on-policy distillation (``opd``): LoRA adapters on the run's base model, found, checked, loaded, routed.

A teacher (an entry of ``opd.teachers``) is a run folder, whose ``final/`` adapter is taken once its config is
checked against the run (same task, base model and latent size; trained with LoRA), or an adapter on its own: a
``.safetensors`` file or a folder holding ``pytorch_lora_weights.safetensors`` (a ``flowdppo export`` folder), of
which only the modules and their shapes can be checked. Each is loaded, frozen, as its own peft adapter
``teacher_<k>`` beside the student's ``default`` one on the same network (diffusers' ``load_lora_adapter``), so the
base weights are held once; a fully fine-tuned student, which has no adapter of its own, carries them on a frozen
copy of its transformer (``reference_policy``).

Routing (``opd.route``, one entry per teacher): the prompts a teacher teaches, as comma-separated prompts (digits:
the classes, ``"0,1,2,3,4"``), a prompt file (``.txt`` / ``.jsonl``), or ``""``: every prompt no other entry names.
A digits prompt is its class as text (``"7"``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor, nn

from flowdppo.config import config_from_dict, saved_config, task_options
from flowdppo.errors import ConfigError, cut, shown
from flowdppo.policies.lora import ADAPTER_NAME, LORA_FILE, PREFIX, experts, layer_sides, lora_files
from flowdppo.prompts import load_prompts
from flowdppo.runs import CONFIG_FILE

TEACHER_PREFIX = "teacher_"  # the adapter name of teacher k: teacher_<k>
LATENT_KEYS = ("upsample", "resolution", "height", "width", "num_frames")  # task options that set the latent size
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights keeps rank, alpha and modules
PROMPT_FILES = (".txt", ".jsonl")


def adapter_files(path: Path, cfg: Any) -> dict[str, Path]:
    """The adapter files of the teacher ``path`` by expert (``lora_files``); a run folder is first checked against
    the run ``cfg`` (``check_same_base``)."""
    where = f"opd.teachers: {path}"
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConfigError(f"{where} is not a LoRA file (.safetensors), a LoRA folder or a run folder")
        return {"transformer": path}
    if not path.is_dir():
        raise ConfigError(f"opd.teachers: no such run folder or LoRA file {shown(str(path))}")
    if (path / CONFIG_FILE).is_file():
        check_same_base(path, config_from_dict(saved_config(path, "opd.teachers")), cfg)
        files = lora_files(path / "final")
        if not files:
            raise ConfigError(
                f"{where} has no final adapter ({path / 'final' / LORA_FILE}): did the run finish? (or write one "
                f"from its newest checkpoint with `flowdppo export {path} --checkpoint --out DIR` and give DIR)"
            )
        return files
    files = lora_files(path)
    if not files:
        raise ConfigError(f"{where} holds neither a run ({CONFIG_FILE}) nor a LoRA adapter ({LORA_FILE})")
    return files


def check_same_base(path: Path, teacher: Any, cfg: Any) -> None:
    """The teacher run ``teacher`` (its config) trained a LoRA adapter of the student's base: same task, same model,
    same latent size (``LATENT_KEYS`` of the task's options)."""
    where = f"opd.teachers: {path}"
    fix = "a teacher must be a LoRA adapter of this run's base model"
    if teacher.task != cfg.task:
        raise ConfigError(f"{where} trained task {teacher.task}, this run task {cfg.task}; {fix}")
    if not same_model(teacher.model, cfg.model):
        raise ConfigError(
            f"{where} was trained on model {shown(teacher.model or 'the shipped base')}, this run on "
            f"{shown(cfg.model or 'the shipped base')}; {fix}"
        )
    theirs, ours = task_options(teacher), task_options(cfg)
    for key in LATENT_KEYS:
        if hasattr(ours, key) and getattr(theirs, key) != getattr(ours, key):
            raise ConfigError(
                f"{where} has the latents of {cfg.task}.{key}={getattr(theirs, key)}, this run "
                f"{cfg.task}.{key}={getattr(ours, key)}; a teacher must share the student's base and latent size"
            )
    if teacher.optim.lora_rank == 0:
        raise ConfigError(
            f"{where} fine-tuned the whole transformer (optim.lora_rank=0); a teacher must be a LoRA adapter "
            "(train it with optim.lora_rank > 0)"
        )


def same_model(a: str, b: str) -> bool:
    """Two ``model`` values name the same base: equal, or the same folder."""
    return a == b or (bool(a) and bool(b) and Path(a).is_dir() and Path(a).resolve() == Path(b).resolve())


def read_adapter(file: Path) -> tuple[dict[str, Tensor], dict | None]:
    """A diffusers LoRA file's transformer weights and metadata, ``transformer.`` prefix removed."""
    try:
        with safe_open(str(file), "pt") as f:
            metadata = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
            weights = {k.removeprefix(PREFIX): f.get_tensor(k) for k in f.keys() if k.startswith(PREFIX)}
    except Exception as err:  # safetensors / json errors on a truncated or foreign file
        raise ConfigError(f"opd.teachers: {file}: unreadable ({type(err).__name__}: {cut(str(err))})") from err
    if not weights:
        raise ConfigError(f"opd.teachers: {file} holds no transformer LoRA weights (keys {PREFIX}...)")
    return weights, {k.removeprefix(PREFIX): v for k, v in metadata.items()} or None


def shape_mismatch(module: nn.Module, weights: dict[str, Tensor]) -> str:
    """How an adapter's weights do not fit the layers of ``module`` (a module it lacks, other sides), or ""."""
    layers = dict(module.named_modules())
    for key, w in weights.items():
        name, _, part = key.partition(".lora_")
        layer = layers.get(name)
        if layer is None:
            return f"its module {name} is not in this model"
        sides = layer_sides(getattr(layer, "base_layer", layer))
        side, got = (0, w.shape[1]) if part.startswith("A") else (1, w.shape[0])
        if sides is not None and w.ndim >= 2 and sides[side] != got:
            return f"{name} is {sides[0]} -> {sides[1]} in this model, the adapter's {key} is {tuple(w.shape)}"
    return ""


def load_teacher(host: nn.Module, name: str, files: dict[str, Path], source: str, shared: bool) -> None:
    """Load the adapter ``files`` (by expert) onto ``host`` as the frozen adapter ``name``. ``shared``: ``host`` is
    the student, whose own ``default`` adapter stays the active and only trained one."""
    every = experts(host)
    for expert, file in files.items():
        module = every.get(expert)
        if module is None:
            raise ConfigError(f"opd.teachers: {source} adapts {expert}, which this model does not have")
        if shared and ADAPTER_NAME not in (getattr(module, "peft_config", None) or {}):
            raise ConfigError(
                f"opd.teachers: {source} adapts {expert}, which this run does not train (optim.trained_experts); "
                "train it too, or give a teacher of the experts the student trains"
            )
        weights, metadata = read_adapter(file)
        problem = shape_mismatch(module, weights)
        if problem:
            raise ConfigError(f"opd.teachers: {source} is an adapter for another model: {problem}")
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the intent
            warnings.simplefilter("ignore", UserWarning)
            try:
                module.load_lora_adapter(weights, prefix=None, adapter_name=name, metadata=metadata)
            except Exception as err:  # peft refuses a config or state it cannot apply
                raise ConfigError(
                    f"opd.teachers: {source} does not load onto this model ({type(err).__name__}: "
                    f"{cut(' '.join(str(err).split()))})"
                ) from err
        if shared:
            module.set_adapter(ADAPTER_NAME)  # loading made the teacher active
    freeze_teachers(host)


def freeze_teachers(host: nn.Module) -> None:
    """No teacher weight takes a gradient (peft's ``set_adapter`` makes the active adapter's trainable)."""
    for param_name, param in host.named_parameters():
        if f".{TEACHER_PREFIX}" in param_name:
            param.requires_grad_(False)


@contextmanager
def teacher_active(host: nn.Module, name: str) -> Iterator[None]:
    """Inside the block ``host`` runs the teacher adapter ``name`` (an expert it does not adapt runs its base); the
    adapters active before come back after."""
    adapted = [m for m in experts(host).values() if getattr(m, "peft_config", None)]
    before = [m.active_adapters() for m in adapted]
    for module in adapted:
        if name in module.peft_config:
            module.set_adapter(name)
        else:
            module.disable_adapters()
    try:
        yield
    finally:
        for module, active in zip(adapted, before, strict=True):
            if name in module.peft_config:
                module.set_adapter(active)
            else:
                module.enable_adapters()
        freeze_teachers(host)


def read_routes(entries: list[str]) -> list[set[str] | None]:
    """Each teacher's prompts (None: every prompt no other entry names) from the ``opd.route`` entries; no entries:
    the one teacher takes every prompt. A prompt named twice, or two catch-all entries, is a ``ConfigError``."""
    routes: list[set[str] | None] = []
    for entry in entries or [""]:
        if not entry.strip():
            routes.append(None)
        elif Path(entry).suffix in PROMPT_FILES:
            routes.append({record["prompt"] for record in load_prompts(entry, "opd.route")})
        else:
            routes.append({part.strip() for part in entry.split(",") if part.strip()})
    if sum(route is None for route in routes) > 1:
        raise ConfigError('opd.route: at most one entry may be "" (the prompts no other entry names)')
    owner: dict[str, int] = {}
    for k, route in enumerate(routes):
        for prompt in sorted(route or ()):
            if prompt in owner:
                raise ConfigError(
                    f"opd.route: the prompt {shown(prompt)} goes to teachers {owner[prompt]} and {k}; give each "
                    "prompt one teacher"
                )
            owner[prompt] = k
    return routes


def route(texts: list[str], routes: list[set[str] | None]) -> list[int]:
    """The teacher of each prompt: the entry that names it, else the catch-all entry."""
    rest = next((k for k, r in enumerate(routes) if r is None), None)
    out = []
    for text in texts:
        k = next((k for k, r in enumerate(routes) if r is not None and text in r), rest)
        if k is None:
            raise ConfigError(
                f"opd.route: the prompt {shown(text)} goes to no teacher; add it to an entry of opd.route, or make "
                'one entry "" (the prompts no other entry names)'
            )
        out.append(k)
    return out


def prompt_texts(cond: Any) -> list[str]:
    """The prompts of a batch as text: a prompt batch's texts, a digits label as its class (``"7"``)."""
    if isinstance(cond, Tensor):
        return [str(int(c)) for c in cond.tolist()]
    text = getattr(cond, "text", None)
    return list(text) if text is not None else [str(c) for c in cond]
