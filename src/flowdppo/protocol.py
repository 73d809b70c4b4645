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
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowdppo.config import task_options
from flowdppo.errors import ConfigError, RewardError
from flowdppo.files import write_text_atomic

RESULT_FORMAT = "flowdppo-eval-protocol/1"
DEFAULT_SEED = 0
DEFAULT_SAMPLES_PER_PROMPT = 4
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
HASH_CHUNK_BYTES = 1 << 20
SAMPLE_CHUNK = 16  # samples generated (and scored) at once when the run sets no sampler.rollout_batch_size
POLICIES = ("base", "trained")
RESULT_KEYS = ("format", "run", "protocol", "prompts", "scores", "summary")


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
# statistics
# --------------------------------------------------------------------------------------------------------------------


def bootstrap_mean_ci(
    values,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = BOOTSTRAP_CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
    chunk: int = 1_000,
) -> dict[str, float]:
    """Mean of ``values`` (one number per prompt) and its percentile-bootstrap confidence interval.

    Estimator: ``m = (1/n) sum_i v_i``. Resample ``B = resamples`` times ``n`` indices uniformly with replacement
    (numpy's ``default_rng(seed)``, drawn ``chunk`` resamples at a time, which bounds memory and not the result),
    ``m*_b`` the mean of resample ``b``; the interval is the empirical ``alpha/2`` and ``1 - alpha/2`` quantiles of
    ``m*_1 .. m*_B`` (linear interpolation), ``alpha = 1 - confidence``. For the paired difference of two
    policies on the same prompts, pass ``v_i = trained_i - base_i`` (prompts resampled together).

    Returns ``{"mean": m, "low": ..., "high": ...}``; one value gives a zero-width interval.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_mean_ci: needs a non-empty 1-D array, got shape {values.shape}")
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"bootstrap_mean_ci: confidence in (0, 1) and resamples >= 1, got {confidence}, {resamples}")
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.concatenate([values[rng.integers(0, n, size=(min(chunk, resamples - start), n))].mean(axis=1)
                            for start in range(0, resamples, chunk)])  # fmt: skip
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high)}


def per_prompt_means(scores: list[list[float]]) -> np.ndarray:
    """A prompt's score: the mean over its K samples, ``(n_prompts,)``."""
    return np.asarray(scores, dtype=np.float64).mean(axis=1)


def summarize(scores: dict[str, dict[str, list[list[float]]]], reward_names: list[str],
              resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = BOOTSTRAP_CONFIDENCE,
              seed: int = BOOTSTRAP_SEED) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """Per reward: base, trained and ``difference`` (trained - base, paired by prompt), each a bootstrap CI of the
    mean over prompts of the per-prompt means."""
    ci = partial(bootstrap_mean_ci, resamples=resamples, confidence=confidence, seed=seed)
    summary = {}
    for name in reward_names:
        base, trained = per_prompt_means(scores["base"][name]), per_prompt_means(scores["trained"][name])
        summary[name] = {"base": ci(base), "trained": ci(trained), "difference": ci(trained - base)}
    return summary


def excludes_zero(interval: dict[str, float]) -> bool:
    return interval["low"] > 0 or interval["high"] < 0


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
    return {"sha256": digest.hexdigest(), "files": len(files),
            "weights": "hub blob ids (content sha256)" if blobs else "file bytes"}  # fmt: skip


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

    return {"flowdppo": flowdppo.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}  # fmt: skip


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


def evaluate_protocol(run_dir: Path, prompts_file: Path, reward_names: list[str] | None = None,
                      samples_per_prompt: int = DEFAULT_SAMPLES_PER_PROMPT, seed: int = DEFAULT_SEED,
                      progress: bool = True) -> dict:  # fmt: skip
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
    eval_cfg = replace(cfg, prompts=str(prompts_file), eval_prompts=0,
                       reward=replace(cfg.reward, names=names, weights=[1.0] * len(names)))  # fmt: skip
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
        "embedded_guidance": task_options(cfg).embedded_guidance,
        "resolution": task_options(cfg).resolution,
        "negative_prompt": task_options(cfg).negative_prompt,
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
    seeds = [[sample_seed(seed, texts[i], occ, k) for k in range(samples_per_prompt)]
             for i, occ in enumerate(occurrences(texts))]  # fmt: skip
    return {"format": RESULT_FORMAT, "run": str(run_dir), "protocol": protocol, "prompts": texts,
            "sample_seeds": seeds, "scores": scores, "summary": summarize(scores, names)}  # fmt: skip


@torch.no_grad()
def sample_scores(task, records: list[dict], velocities: dict, per_prompt: int, seed: int,
                  progress: bool = False) -> dict[str, dict[str, list[list[float]]]]:  # fmt: skip
    """``{policy: {reward: [[score of sample k] for each prompt]}}``: every policy from the same noise, a chunk of
    samples at a time (images are scored and dropped, so memory does not grow with the prompt file)."""
    from flowdppo.prompts import make_batch
    from flowdppo.rewards import score

    texts = [r["prompt"] for r in records]
    plan = sample_plan(texts, per_prompt)
    scores = {policy: {name: [[0.0] * per_prompt for _ in records] for name, _ in task.rewards}
              for policy in velocities}  # fmt: skip
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


def write_result(result: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    # a list of numbers on one line (a prompt's K scores, not one line per score)
    text = re.sub(r"\[[^\[\]{}\"]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    write_text_atomic(path, text + "\n")
    return path


def load_result(path: Path) -> dict:
    """A result written by ``write_result``; anything else is one ``ConfigError`` line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--report: no such file {str(path)!r}")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--report: {path} is not a flowdppo eval result (not JSON: {err})") from err
    if not isinstance(result, dict) or result.get("format") != RESULT_FORMAT:
        raise ConfigError(f'--report: {path} is not a flowdppo eval result (no "format": "{RESULT_FORMAT}")')
    missing = [key for key in RESULT_KEYS if key not in result]
    if missing:
        raise ConfigError(f"--report: {path} is not a complete eval result (missing {', '.join(missing)})")
    try:
        format_table(result)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise ConfigError(f"--report: {path} is a damaged eval result ({type(err).__name__}: {err})") from err
    return result


# --------------------------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------------------------


def row_decimals(difference: dict[str, float]) -> int:
    """Decimals for a reward's row: 4, or enough (up to 8) to show two digits of the difference's CI width."""
    width = difference["high"] - difference["low"]
    return 4 if width <= 0 else int(min(8, max(4, 1 - np.floor(np.log10(width)))))


def format_interval(interval: dict[str, float], decimals: int = 4, signed: bool = False) -> str:
    spec = f"{'+' if signed else ''}.{decimals}f"
    return f"{interval['mean']:{spec}} [{interval['low']:{spec}}, {interval['high']:{spec}}]"


def format_table(result: dict) -> str:
    """The protocol in three lines, then per reward: base and trained means and the paired difference with their
    bootstrap CIs (``*``: the difference's CI excludes 0). A function of the saved result alone."""
    p = result["protocol"]
    boot = p["bootstrap"]
    model, adapter = p["model"], p["adapter"]
    short = lambda digest: (digest or "unknown")[:12]  # noqa: E731
    lines = [
        f"run {result['run']} ({p['method']}), seed {p['seed']}",
        f"prompts {p['prompts_file']} ({p['prompts_count']} prompts, sha256 {short(p['prompts_sha256'])}) x "
        f"{p['samples_per_prompt']} samples; {p['sampler']} {p['steps']} steps, CFG {p['guidance_scale']:g}, "
        f"{p['resolution']} px",
        f"model {model['model']} (sha256 {short(model['sha256'])}), adapter sha256 {short(adapter['sha256'])}; "
        + ", ".join(f"{k} {v}" for k, v in p["versions"].items()),
        f"mean over prompts [{boot['confidence']:.0%} bootstrap CI, {boot['resamples']:,} resamples of prompts]",
        "",
    ]
    rows = [("reward", "base", "trained", "trained - base")]
    for name, stats in result["summary"].items():
        mark = " *" if excludes_zero(stats["difference"]) else ""
        decimals = row_decimals(stats["difference"])
        rows.append((name, format_interval(stats["base"], decimals), format_interval(stats["trained"], decimals),
                     format_interval(stats["difference"], decimals, signed=True) + mark))  # fmt: skip
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append("* the difference's CI excludes 0")
    return "\n".join(lines)
