"""What a run writes in its folder, by name: the only entries ``--overwrite`` deletes.

A run's outputs are ``OUTPUT_FILES`` at the top of the folder and, in each of ``OUTPUT_FOLDERS``, the entries
whose names match the folder's patterns (a checkpoint ``checkpoints/epoch_000010/``, TensorBoard's
``events.out.tfevents.*``, ``plots/curves.png``, the adapter or model in ``final/``, W&B's run folders), plus the
``.tmp-*`` leftovers of interrupted writes. Anything else is not the run's (a ``notes.txt``, ``plots/mine.png``,
a model card in ``final/``): ``--overwrite`` leaves it where it is, and the new run writes next to it. In a folder
that holds no run (no ``config.yaml``) nothing is known to be a run's: an entry there with an output's name is
refused, never replaced.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from flowdppo.files import TMP_PREFIX, remove

OUTPUT_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "base_eval.json",
    "mechanism.json",  # flowdppo.mechanism.FILE
    "samples.png",
    "samples.mp4",
    "samples.gif",
    "wandb_id",
)
OUTPUT_FOLDERS = {
    "checkpoints": (r"epoch_\d+",),
    "tensorboard": (r"events\.out\.tfevents\..+",),
    "plots": (r"curves\.png", r"per_step\.png"),
    # a LoRA adapter per expert; a fully fine-tuned digits policy; a pipeline (its components: model_index.json)
    "final": (
        r"pytorch_lora_weights(_\w+)?\.safetensors",
        r"transformer(_2)?",
        r"prompt_embeddings\.safetensors",
        r"model_index\.json",
    ),
    "wandb": (r"(offline-)?run-.+", r"latest-run", r"debug(-internal|-cli\..+)?\.log"),
}


def output_entries(path: Path) -> list[Path]:
    """The entries of the run folder ``path`` that have the names a run gives its outputs (leftovers included)."""
    found = [path / name for name in OUTPUT_FILES if (path / name).is_file()]
    for folder, patterns in OUTPUT_FOLDERS.items():
        if (path / folder).is_dir():
            names = re.compile("|".join((*patterns, *_components(path / folder))))
            found += sorted(p for p in (path / folder).iterdir() if names.fullmatch(p.name))
    return found + leftovers(path)


def leftovers(path: Path) -> list[Path]:
    """What interrupted writes and deletions leave: ``.tmp-*`` (``flowdppo.files``), ``checkpoints/.del-*``."""
    folders = [path, *(path / name for name in OUTPUT_FOLDERS if (path / name).is_dir())]
    return [
        *(p for folder in folders for p in sorted(folder.glob(f"{TMP_PREFIX}*"))),
        *sorted((path / "checkpoints").glob(".del-*")),
    ]


def _components(final: Path) -> list[str]:
    """The component folders a saved pipeline's ``model_index.json`` names (``vae``, ``text_encoder``, ...)."""
    try:
        index = json.loads((final / "model_index.json").read_text())
    except (OSError, ValueError):
        return []
    return [re.escape(name) for name in index if not name.startswith("_")] if isinstance(index, dict) else []


def misplaced_files(path: Path) -> list[Path]:
    """Files where the run keeps one of its folders (a file named ``tensorboard``): the run cannot write there."""
    return [path / name for name in OUTPUT_FOLDERS if (path / name).exists() and not (path / name).is_dir()]


def remove_outputs(path: Path) -> None:
    """Delete the run's outputs (``output_entries``) and the folders they leave empty; nothing else."""
    for entry in output_entries(path):
        remove(entry)
    for folder in OUTPUT_FOLDERS:
        if (path / folder).is_dir() and not (path / folder).is_symlink() and not any((path / folder).iterdir()):
            (path / folder).rmdir()
