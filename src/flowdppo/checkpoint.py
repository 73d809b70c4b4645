"""Checkpoints: safetensors for tensors, JSON for the rest, written atomically.

A checkpoint is a folder ``checkpoints/epoch_000010/`` holding ``trainable.safetensors`` (LoRA or full
weights), ``optimizer.safetensors`` + ``optimizer.json``, ``rng.safetensors`` + ``rng.json`` (the
trainer's generator, torch CPU / CUDA, numpy and python random states), ``algorithm.safetensors`` (the
algorithm's own state, e.g. a slow copy of the weights, if it has any) and ``state.json`` (epoch). It is
written to a temporary folder and renamed into place (``flowdppo.files.staged``), and an old one is renamed
away before it is deleted, so a crash or a full disk at any point leaves only complete checkpoints under
``epoch_*`` (a failed write removes its temporary folder).

A policy sharded with FSDP saves the same files: its full (gathered) state, so a run can resume on
any number of processes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flowdppo.distributed import gather_full_state, is_sharded, load_full_state
from flowdppo.errors import CheckpointError
from flowdppo.files import staged
from flowdppo.policies.lora import load_trainable_state_dict, trainable_state_dict

STATE_FILE = "state.json"
ALGORITHM_FILE = "algorithm.safetensors"


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (``state.{param}.{name}``) and JSON-able rest."""
    tensors = {}
    for param_id, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"state.{param_id}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def rng_to_flat(rng: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Every random stream a run draws from: the trainer's generator, torch, CUDA, numpy, python."""
    tensors = {"trainer": rng.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global stream user code may draw from)
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    rest = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": random.getstate()}
    return tensors, rest


def restore_rng(rng: torch.Generator, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    rng.set_state(tensors["trainer"])
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    version, state, gauss = rest["python"]
    random.setstate((version, tuple(state), gauss))


def trained_state(policy: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained weights and the optimizer state dict; gathered from a sharded policy (a collective: every
    process calls it, process 0 gets them)."""
    if is_sharded(policy):
        return gather_full_state(policy, optimizer)
    return trainable_state_dict(policy), optimizer.state_dict()


def save_checkpoint(
    directory: Path,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: torch.Generator,
    epoch: int,
    keep: int,
    write: bool = True,
    algorithm=None,
    extra_state: dict | None = None,
) -> None:
    """Write the checkpoint of ``epoch`` atomically and keep only the newest ``keep`` checkpoints.

    With a sharded policy every process calls it (the state is gathered) and only ``write`` ones write.
    """
    trained, optimizer_state = trained_state(policy, optimizer)
    if not write:
        return
    with staged(directory.parent) as staging:  # checkpoints/.tmp-staging/epoch_N, then renamed to epoch_N
        tmp = staging / directory.name
        tmp.mkdir()
        weights = {k: v.detach().cpu().contiguous() for k, v in trained.items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_rest = optimizer_to_flat(optimizer_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_rest))
        rng_tensors, rng_rest = rng_to_flat(rng)
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "rng.json").write_text(json.dumps(rng_rest))
        algorithm_state = algorithm.state_dict() if algorithm is not None else {}
        if algorithm_state:  # e.g. the slow copy of the weights of DiffusionNFT / AWM
            save_file({k: v.contiguous() for k, v in algorithm_state.items()}, str(tmp / ALGORITHM_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({"epoch": epoch, **(extra_state or {})}))
    for old in complete_checkpoints(directory.parent)[:-keep]:
        _remove(old)


def _remove(directory: Path) -> None:
    """Rename out of ``epoch_*`` first (atomic), then delete: never a half-deleted checkpoint."""
    if directory.exists():
        trash = directory.with_name(f".del-{directory.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders with a state file, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("epoch_*") if (p / STATE_FILE).is_file())


def load_checkpoint(
    directory: Path, policy: nn.Module, optimizer: torch.optim.Optimizer, rng: torch.Generator, algorithm=None
) -> dict:
    """Restore weights, optimizer, RNG and the algorithm's state from ``directory``; returns its ``state.json``
    (``epoch``: the epoch to continue from). A file that is missing, truncated or malformed raises
    ``CheckpointError`` naming it."""
    state = read_json(directory / STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int) or state["epoch"] < 1:
        raise CheckpointError(f"{directory / STATE_FILE}: no valid epoch (a positive integer)")
    weights = read_tensors(directory / "trainable.safetensors")
    optimizer_tensors, optimizer_rest = (
        read_tensors(directory / "optimizer.safetensors"),
        read_json(directory / "optimizer.json"),
    )
    rng_state = read_tensors(directory / "rng.safetensors"), read_json(directory / "rng.json")
    algorithm_file = directory / ALGORITHM_FILE
    algorithm_state = read_tensors(algorithm_file) if algorithm_file.is_file() else None
    try:
        optimizer_state = optimizer_from_flat(optimizer_tensors, optimizer_rest)
        if is_sharded(policy):
            load_full_state(policy, optimizer, weights, optimizer_state)
        else:
            load_trainable_state_dict(policy, weights)
            optimizer.load_state_dict(optimizer_state)
        restore_rng(rng, *rng_state)
        if algorithm is not None and algorithm_state is not None:
            algorithm.load_state_dict(algorithm_state)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{directory}: does not fit this run ({type(err).__name__}: {err})") from err
    return state


def read_json(path: Path):
    """A checkpoint's JSON file; unreadable or malformed: a ``CheckpointError`` naming it."""
    return _checked(path, lambda: json.loads(path.read_text()))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; missing, truncated or corrupt: a ``CheckpointError`` naming it."""
    return _checked(path, lambda: load_file(str(path)))


def _checked(path: Path, load):
    try:
        return load()
    except Exception as err:  # safetensors, json and OS errors alike: the file is not what we wrote
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
