"""A pinned evaluation protocol for text-to-image runs: the base and the trained policy on a prompt file, from
the same per-prompt noise, with each reward's mean, a bootstrap CI over prompts and the paired difference.

    flowdppo eval RUN --prompts FILE [--rewards r1,r2] [--samples-per-prompt K] [--seed S] [--out FILE.json]
    flowdppo eval --report FILE.json        # the table again, from the saved result (no model loaded)

**Noise.** Sample ``k`` of a prompt starts from ``randn(latent_shape)`` drawn by a CPU generator seeded with
``sample_seed(seed, text, occurrence, k)``: a hash of the protocol seed, the prompt's *text*, how many times the
same text came before it in the file (0 for the first) and ``k``. It does not depend on the prompt's position,
on the other prompts or on ``K``, so adding, removing or reordering prompts leaves every other prompt's noise as
it was; the same prompt in two files, or in two runs' evaluations, gets the same noise.

**Sampler.** The run's own evaluation sampler: Euler ODE over the model's schedule of ``sampler.num_steps``
steps, ``sampler.guidance_scale`` (with the run's negative prompt), the run's resolution, precision and
embedded guidance. The base is the same network with the LoRA adapters off (full fine-tuning: the model of
``model``).

**Fingerprints.** The model: sha256 over ``model_index.json``, every component's ``*.json`` (configs,
tokenizer files) and the transformer's ``*.safetensors``, each as its path relative to the pipeline folder and
its bytes (read in 1 MiB chunks). In a Hugging Face hub cache a weights file is a link to a blob named by the
sha256 of its content (Git LFS): the blob's name and size stand in for the bytes, so nothing large is read.
The text encoders' and the VAE's weights are not hashed (their configs are). The adapter: sha256 of
``final/pytorch_lora_weights.safetensors`` (full fine-tuning: the same fingerprint as the model, of ``final/``).

The statistics are ``protocol_stats.py``; the result file and the table, ``protocol_report.py``.
"""

from __future__ import annotations

import hashlib
import platform
import re
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowdppo.config import task_options
from flowdppo.errors import ConfigError, RewardError
from flowdppo.protocol_report import RESULT_FORMAT
from flowdppo.protocol_stats import BOOTSTRAP_CONFIDENCE, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, summarize

DEFAULT_SEED = 0
DEFAULT_SAMPLES_PER_PROMPT = 4
HASH_CHUNK_BYTES = 1 << 20
SAMPLE_CHUNK = 16  # samples generated (and scored) at once when the run sets no sampler.rollout_batch_size
POLICIES = ("base", "trained")


# --------------------------------------------------------------------------------------------------------------------
# noise
# --------------------------------------------------------------------------------------------------------------------


def sample_seed(seed: int, text: str, occurrence: int, k: int) -> int:
    """The generator seed of sample ``k`` of the ``occurrence``-th copy of prompt ``text`` (63 bits of a sha256)."""
    digest = hashlib.sha256(f"{seed}\n{occurrence}\n{k}\n{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_noise(seed: int, text: str, occurrence: int, k: int, shape: tuple[int, ...]) -> Tensor:
    """Initial noise ``(*shape)`` float32 on the CPU, a function of ``(seed, text, occurrence, k)`` alone."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, text, occurrence, k)))


def occurrences(texts: list[str]) -> list[int]:
    """For each text, how many identical texts come before it (0, 0, 1 for ``a, b, a``)."""
    seen: dict[str, int] = {}
    counts = []
    for text in texts:
        counts.append(seen.get(text, 0))
        seen[text] = counts[-1] + 1
    return counts


def sample_plan(texts: list[str], per_prompt: int) -> list[tuple[int, int, int]]:
    """Every sample as ``(prompt index, occurrence, k)``, prompt-major."""
    return [(i, occ, k) for i, occ in enumerate(occurrences(texts)) for k in range(per_prompt)]


# --------------------------------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


LFS_BLOB = re.compile(r"[0-9a-f]{64}")


def pipeline_files(folder: Path) -> list[Path]:
    """What the model fingerprint covers: ``model_index.json``, each component's ``*.json``, the transformer's
    ``*.safetensors``; sorted by relative path."""
    files = [folder / "model_index.json", *folder.glob("*/*.json"), *folder.glob("transformer/*.safetensors")]
    return sorted({f for f in files if f.is_file()}, key=lambda f: f.relative_to(folder).as_posix())


def folder_fingerprint(folder: Path) -> dict:
    """sha256 over (relative path, content) of ``pipeline_files(folder)``; a weights file that links to a hub-cache
    blob named by its content's sha256 contributes that name and its size instead of its bytes."""
    digest, blobs = hashlib.sha256(), 0
    files = pipeline_files(folder)
    for path in files:
        target = path.resolve()
        if path.is_symlink() and path.suffix == ".safetensors" and LFS_BLOB.fullmatch(target.name):
            content, blobs = f"lfs-sha256:{target.name}:{target.stat().st_size}", blobs + 1
        else:
            content = sha256_file(path)
        digest.update(f"{path.relative_to(folder).as_posix()}\0{content}\n".encode())
    return {
        "sha256": digest.hexdigest(),
        "files": len(files),
        "weights": "hub blob ids (content sha256)" if blobs else "file bytes",
    }


def model_fingerprint(model: str) -> dict:
    """The model ``model`` (a folder or hub id): where it was read from and ``folder_fingerprint`` of it."""
    if Path(model).is_dir():
        return {"model": model, "source": "folder", **folder_fingerprint(Path(model))}
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(model, "model_index.json")
    if not isinstance(index, str):  # not in the local cache (or a cached "no such file")
        return {"model": model, "source": "hub", "sha256": None, "files": 0, "weights": "not in the local cache"}
    snapshot = Path(index).parent
    return {"model": model, "source": "hub", "revision": snapshot.name, **folder_fingerprint(snapshot)}


def adapter_fingerprint(run_dir: Path) -> dict:
    """sha256 of the run's final LoRA file; for a fully fine-tuned run, the fingerprint of its ``final/`` pipeline."""
    from flowdppo.policies.lora import LORA_FILE

    final = Path(run_dir) / "final"
    if not final.is_dir():
        raise ConfigError(f"{run_dir} has no final weights (final/): did the run finish?")
    if (final / LORA_FILE).is_file():
        return {"path": str(final / LORA_FILE), "sha256": sha256_file(final / LORA_FILE)}
    return {"path": str(final), **folder_fingerprint(final)}


def library_versions() -> dict[str, str]:
    import diffusers

    import flowdppo

    return {
        "flowdppo": flowdppo.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------------


def parse_reward_names(text: str | None) -> list[str] | None:
    """``"a, b"`` -> ``["a", "b"]``; None (not given) stays None."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"--rewards: no reward names in {text!r}")
    return names


def check_reward_names(names: list[str]) -> None:
    """Every name a built-in image reward (``name`` or ``name@model_path``), a reward server's address (checked
    when the task connects) or an importable ``module:function``; checked before any model is loaded."""
    from flowdppo.rewards import load_user_reward
    from flowdppo.rewards.registry import reward_source

    for name in names:
        if reward_source(name, ("image",), key="--rewards") == "user":
            try:
                load_user_reward(name)
            except RewardError as err:
                raise ConfigError(f"--rewards: {str(err).removeprefix('reward.names: ')}") from err


# --------------------------------------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------------------------------------


def evaluate_protocol(
    run_dir: Path,
    prompts_file: Path,
    reward_names: list[str] | None = None,
    samples_per_prompt: int = DEFAULT_SAMPLES_PER_PROMPT,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
) -> dict:
    """Sample the base and the trained policy of the text-to-image run ``run_dir`` on every prompt of
    ``prompts_file`` (``samples_per_prompt`` each, noise by ``sample_noise``), score them with ``reward_names``
    (default: the run's rewards) and return the result: the protocol, the prompts, every sample's scores
    ``scores[policy][reward][prompt][k]`` and the bootstrap ``summary``. Inputs are checked before any model is
    loaded."""
    from flowdppo.distributed import Distributed
    from flowdppo.evaluate import load_trained_policy, run_config
    from flowdppo.policies.lora import uses_lora
    from flowdppo.prompts import load_prompts
    from flowdppo.tasks import load_task
    from flowdppo.trainer import make_base_velocity

    if samples_per_prompt < 1:
        raise ConfigError(f"--samples-per-prompt: must be at least 1, got {samples_per_prompt}")
    if not 0 <= seed < 2**63:
        raise ConfigError(f"--seed: must be in [0, 2^63), got {seed}")
    run_dir, prompts_file = Path(run_dir), Path(prompts_file)
    cfg = run_config(run_dir)
    if cfg.task != "text_to_image":
        raise ConfigError(f"--prompts: {run_dir} is a {cfg.task} run; evaluate it with --per-class")
    records = load_prompts(prompts_file, "--prompts")
    names = list(reward_names or cfg.reward.names)
    check_reward_names(names)
    adapter = adapter_fingerprint(run_dir)

    # the run's settings, its prompts replaced by the file (all of it "training" records, none held out)
    options = replace(task_options(cfg), prompts=str(prompts_file), eval_prompts=0)
    eval_cfg = replace(cfg, **{cfg.task: options}, reward=replace(cfg.reward, names=names, weights=[1.0] * len(names)))
    device = Distributed().device(cfg.device)
    task = load_task(eval_cfg, device)
    trained = load_trained_policy(run_dir, task)
    model = model_fingerprint(cfg.model)  # after loading: a hub id's snapshot is in the local cache now
    w = cfg.sampler.guidance_scale
    reference = None if uses_lora(trained) else task.policy  # LoRA: the base is the adapters-off network
    velocities = {"base": make_base_velocity(trained, reference, w), "trained": partial(trained, guidance_scale=w)}
    scores = sample_scores(task, records, velocities, samples_per_prompt, seed, progress)
    names = [name for name, _ in task.rewards]  # as logged: a reward server's is remote:NAME, not its address
    texts = [r["prompt"] for r in records]
    protocol = {
        "sampler": "ode",
        "steps": cfg.sampler.num_steps,
        "guidance_scale": w,
        "embedded_guidance": options.embedded_guidance,
        "resolution": options.resolution,
        "negative_prompt": options.negative_prompt,
        "precision": cfg.precision,
        "seed": seed,
        "noise": "per (seed, prompt text, occurrence of that text, sample index); independent of the other prompts",
        "latent_shape": list(task.latent_shape),
        "prompts_file": str(prompts_file),
        "prompts_sha256": sha256_file(prompts_file),
        "prompts_count": len(records),
        "samples_per_prompt": samples_per_prompt,
        "rewards": names,
        "bootstrap": {
            "resamples": BOOTSTRAP_RESAMPLES,
            "confidence": BOOTSTRAP_CONFIDENCE,
            "seed": BOOTSTRAP_SEED,
            "unit": "prompt (mean of its samples)",
            "interval": "percentile",
        },
        "model": model,
        "adapter": adapter,
        "method": cfg.method,
        "device": str(device),
        "versions": library_versions(),
    }
    seeds = [
        [sample_seed(seed, texts[i], occ, k) for k in range(samples_per_prompt)]
        for i, occ in enumerate(occurrences(texts))
    ]
    return {
        "format": RESULT_FORMAT,
        "run": str(run_dir),
        "protocol": protocol,
        "prompts": texts,
        "sample_seeds": seeds,
        "scores": scores,
        "summary": summarize(scores, names),
    }


@torch.no_grad()
def sample_scores(
    task, records: list[dict], velocities: dict, per_prompt: int, seed: int, progress: bool = False
) -> dict[str, dict[str, list[list[float]]]]:
    """``{policy: {reward: [[score of sample k] for each prompt]}}``: every policy from the same noise, a chunk of
    samples at a time (images are scored and dropped, so memory does not grow with the prompt file)."""
    from flowdppo.prompts import make_batch
    from flowdppo.rewards import score

    texts = [r["prompt"] for r in records]
    plan = sample_plan(texts, per_prompt)
    scores = {
        policy: {name: [[0.0] * per_prompt for _ in records] for name, _ in task.rewards} for policy in velocities
    }
    chunk = task.cfg.sampler.rollout_batch_size or SAMPLE_CHUNK
    bar = tqdm(total=len(plan) * len(velocities), desc="eval", unit="image", disable=not progress)
    for start in range(0, len(plan), chunk):
        part = plan[start : start + chunk]
        noise = torch.stack([sample_noise(seed, texts[i], occ, k, task.latent_shape) for i, occ, k in part])
        cond = make_batch([records[i] for i, _, _ in part], 1, task.cache, task.device)
        for policy, velocity in velocities.items():
            images = task.generate(velocity, noise.to(task.device), cond)
            for name, reward in task.rewards:
                values = score(reward, name, images, cond)
                if not torch.isfinite(values).all():
                    raise RewardError(f"reward {name!r} gave a non-finite score on the {policy} policy's images")
                for (i, _, k), value in zip(part, values.tolist(), strict=True):
                    scores[policy][name][i][k] = value
            bar.update(len(part))
    bar.close()
    return scores
