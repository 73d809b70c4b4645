"""Evaluate a finished run (the task's measures, base vs trained) and export its LoRA adapter."""

from __future__ import annotations

import dataclasses
import shutil
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from flowdppo.checkpoint import complete_checkpoints, read_tensors
from flowdppo.config import config_from_dict, saved_config
from flowdppo.distributed import Distributed
from flowdppo.errors import CheckpointError, ConfigError
from flowdppo.files import staged
from flowdppo.model_card import DEFAULT_LICENSE, check_license, write_model_card
from flowdppo.policies.comfyui import comfyui_names
from flowdppo.policies.lora import (
    COMFYUI_FILE,
    LORA_FILE,
    PREFIX,
    adapter_metadata,
    comfyui_state_dict,
    expert_state,
    load_lora_adapter,
    lora_file,
    lora_files,
    uses_lora,
)
from flowdppo.progress import status
from flowdppo.runs import check_folder_path
from flowdppo.tasks import load_task, task_class
from flowdppo.trainer import make_base_velocity


def load_trained_policy(run_dir: Path, task):
    """The run's trained policy: the task's base policy with the final LoRA adapter loaded into it (checked against
    the adapter the run's settings build), or the fully fine-tuned policy of ``final/``."""
    final = run_dir / "final"
    if lora_files(final):
        try:
            load_lora_adapter(task.policy, final, run_config(run_dir).optim)
        except ConfigError:
            raise
        except Exception as err:  # safetensors / peft errors on a truncated or damaged file
            raise ConfigError(
                f"{final}/{LORA_FILE}: unreadable ({type(err).__name__}: "
                f"{' '.join(str(err).split())}); export from a checkpoint with --checkpoint"
            ) from err
        return task.policy
    if final.is_dir():
        return task.load_policy(str(final))
    raise ConfigError(f"{run_dir} has no final weights (final/): did the run finish?")


def run_config(run_dir: Path):
    return config_from_dict(saved_config(run_dir, str(run_dir)))


@torch.no_grad()
def evaluate_run(run_dir: Path, per_class: int = 50) -> dict[str, dict[str, float]]:
    """``{"base": measures, "trained": measures}`` on the same fixed noise."""
    cfg = run_config(run_dir)
    task = load_task(cfg, Distributed().device(cfg.device))
    trained = load_trained_policy(run_dir, task)
    w = cfg.sampler.guidance_scale
    # with LoRA the base is the same network with its adapters off: the model is loaded once
    reference = None if uses_lora(trained) else task.policy
    velocities = {"base": make_base_velocity(trained, reference, w), "trained": partial(trained, guidance_scale=w)}
    unit = "class" if cfg.task == "digits" else "held-out prompt"
    results = {}
    for name, velocity in velocities.items():
        status(f"evaluating the {name} policy ({per_class} samples per {unit})")
        results[name] = task.evaluate(velocity, per_class)
    return results


EXPORT_FORMATS = ("diffusers", "comfyui")


def export_lora(
    run_dir: Path,
    out: Path,
    from_checkpoint: bool = False,
    fmt: str = "diffusers",
    overwrite: bool = False,
    check: bool = True,
    license: str = DEFAULT_LICENSE,
) -> tuple[Path, Path]:
    """Write the run's LoRA adapter (``final/``, or the newest checkpoint) without loading the model, and its model
    card (``model_card.py``: ``README.md`` with the run's sample grid, ``license`` in its front matter); returns the
    adapter file (the first, with two experts) and the card.

    ``diffusers``: ``out/pytorch_lora_weights.safetensors`` for ``pipeline.load_lora_weights(out)`` (``final/``
    already holds it; a checkpoint's peft weights go through the pipeline's ``save_lora_weights``), with the
    adapter's rank, alpha and modules as metadata. ``comfyui``: ``out/comfyui_lora.safetensors``, the same
    weights under the keys ComfyUI's loader maps for the model's family (``policies.comfyui``: diffusers' names
    under ``transformer.``, Wan's original names under ``diffusion_model.``) with an ``alpha`` tensor each, the
    only place ComfyUI reads the scale from. A two-expert model (Wan 2.2 A14B) gets one file per trained expert, the
    low-noise one named ``..._transformer_2.safetensors`` (``lora_file``; diffusers: load it with
    ``load_lora_weights(out, weight_name=..., load_into_transformer_2=True)``).

    An adapter file already in ``out`` is replaced only with ``overwrite``; ``out`` may not be the run's own
    ``final/``. The files are written atomically next to the folder's other files (``flowdppo.files.staged``).
    With ``check`` a diffusers export is loaded into a fresh base model and must change its velocity
    (``check_adapter_moves_velocity``: the model is loaded), a ComfyUI one must hold a nonzero update; else
    nothing is written."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format: must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    check_license(license)
    cfg = run_config(run_dir)
    optim = cfg.optim
    if optim.lora_rank == 0:
        raise ConfigError(f"{run_dir} fine-tuned the whole transformer (no LoRA): its final/ is the model itself")
    base = COMFYUI_FILE if fmt == "comfyui" else LORA_FILE
    check_folder_path(out, "--out")
    if out.resolve() == (run_dir / "final").resolve():
        raise ConfigError(
            f"--out: {out} is the run's own final/ folder, which already holds its adapter; export to another folder"
        )
    if from_checkpoint:
        found = complete_checkpoints(run_dir / "checkpoints")
        if not found:
            raise ConfigError(f"{run_dir} has no complete checkpoint")
        weights = read_tensors(found[-1] / "trainable.safetensors")  # peft names (<expert>.<name>: two experts)
        per_expert = {name: expert_state(weights, f"{name}.") for name in ("transformer", "transformer_2")}
        per_expert = {name: part for name, part in per_expert.items() if part} or {"transformer": weights}
        adapters = {}
    else:
        adapters = lora_files(run_dir / "final")
        if not adapters:
            raise ConfigError(
                f"{run_dir} has no final adapter ({run_dir / 'final' / LORA_FILE}): did the run "
                f"finish? (or use --checkpoint)"
            )
        per_expert = {}
        for name, adapter in adapters.items():
            try:
                final = read_tensors(adapter)  # a damaged file is named here, not copied
            except CheckpointError as err:
                raise ConfigError(f"{err}; export from the newest checkpoint with --checkpoint") from err
            per_expert[name] = {k.removeprefix(PREFIX): v for k, v in final.items()}
    existing = [out / lora_file(name, base) for name in per_expert if (out / lora_file(name, base)).exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"--out: {existing[0]} already exists; choose another folder, or pass --overwrite to replace it"
        )
    # ComfyUI's keys follow the family (model_index.json, no weights): every module is named before a file is written
    names = comfyui_names(task_class(cfg).policy_class(cfg)) if fmt == "comfyui" else None
    with staged(out) as tmp:  # nothing in out changes unless every file is written (and checked)
        for name, weights in per_expert.items():
            if fmt == "comfyui":
                comfyui = comfyui_state_dict(weights, optim.lora_alpha, names)
                save_file(comfyui, str(tmp / lora_file(name, COMFYUI_FILE)))
            elif name in adapters:  # final/ already holds the diffusers file
                shutil.copyfile(adapters[name], tmp / adapters[name].name)
            else:
                pipeline_class = task_class(cfg).policy_class(cfg).pipeline_class
                pipeline_class.save_lora_weights(
                    tmp,
                    transformer_lora_layers=weights,
                    weight_name=lora_file(name),
                    transformer_lora_adapter_metadata=adapter_metadata(weights, optim.lora_rank, optim.lora_alpha),
                )
        if check and fmt == "comfyui":
            check_nonzero_update(per_expert, out)
        elif check:
            check_adapter_moves_velocity(run_dir, tmp, out)
        card = write_model_card(run_dir, cfg, tmp, out, license, found[-1].name if from_checkpoint else "")
    return out / lora_file(next(iter(per_expert)), base), card


NO_CHECK = "--no-check skips this check"


def check_nonzero_update(per_expert: dict[str, dict[str, torch.Tensor]], out: Path) -> None:
    """Some module's LoRA update ``B A`` is nonzero (else the adapter changes nothing)."""
    if not any(bool(w.ne(0).any()) for weights in per_expert.values() for k, w in weights.items() if "lora_B" in k):
        raise ConfigError(
            f"export: the adapter for {out} is all zeros (every lora_B is 0) and would change nothing; "
            f"export a trained run or a later checkpoint ({NO_CHECK})"
        )


@torch.no_grad()
def check_adapter_moves_velocity(run_dir: Path, adapter_dir: Path, out: Path) -> None:
    """Load the adapter files of ``adapter_dir`` into a fresh base model of the run with diffusers' loader (as
    ``pipeline.load_lora_weights`` does) and compare its velocity with the base's on a fixed probe input (the first
    training prompt, seeded noise) at the schedule's first, middle and last nonzero noise levels (each expert of a
    two-expert model takes one of them): equal at all three is a ``ConfigError``."""
    cfg = run_config(run_dir)
    cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, names=[]))  # the model alone
    device = Distributed().device(cfg.device)
    task = load_task(cfg, device)
    cond, _ = task.prompts(1, 1, cfg.seed, 0)
    x = torch.randn((1, *task.latent_shape), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    sigmas = task.sigmas().to(device)
    levels = [sigmas[i].expand(1) for i in (0, len(sigmas) // 2, -2)]
    velocity = partial(task.policy, guidance_scale=cfg.sampler.guidance_scale)
    base = [velocity(x, sigma, cond) for sigma in levels]
    try:
        load_lora_adapter(task.policy, adapter_dir, cfg.optim)
    except Exception as err:  # peft / diffusers refuse a file that does not fit the model
        raise ConfigError(
            f"export: the adapter for {out} does not load into the run's base model "
            f"({type(err).__name__}: {' '.join(str(err).split())}); {NO_CHECK}"
        ) from err
    if all(torch.equal(velocity(x, sigma, cond), v) for sigma, v in zip(levels, base, strict=True)):
        raise ConfigError(
            f"export: the adapter for {out}, loaded into a fresh base model, does not change its "
            f"velocity (an untrained or zero adapter, or one whose modules the model does not have); "
            f"nothing was written ({NO_CHECK})"
        )
