"""The model card ``flowdppo export`` writes beside the adapter: ``README.md`` in the Hugging Face model-card format.

YAML front matter (``base_model``, ``library_name``, ``license``, ``pipeline_tag``, ``tags``), then what the run
did and measured, read from its folder alone (no model is loaded):

- the method: the preset, the algorithm and its loss, the sampler, the LoRA settings;
- the rewards and their weights; the epochs trained (``metrics.jsonl``) and the samples they took;
- the evaluation: each protocol result in ``RUN/eval/*.json`` (``flowdppo eval RUN --prompts FILE``: base, trained
  and the paired difference with their bootstrap CIs), the run's own evaluation (``base_eval.json`` and the last
  evaluated epoch: one number each, no CI) and the path KL to the base; a measure the run has not made is
  "not evaluated";
- the sample grid (``samples.png``, copied beside the card), the resolved config, and the loading snippets for
  each adapter file the export folder holds: diffusers' ``load_lora_weights`` and ComfyUI's
  ``LoraLoaderModelOnly`` (the digits task, not a diffusers pipeline: flowdppo's own loader).

A ``README.md`` already in the folder that no export wrote (it lacks ``MARKER``) is the user's and stays: the card
is then ``MODEL_CARD.md``; likewise a ``samples.png`` of theirs stays and the grid is ``card_samples.png``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from flowdppo.errors import ConfigError
from flowdppo.policies.lora import COMFYUI_FILE, LORA_FILE, lora_file
from flowdppo.protocol_report import format_interval, load_result

CARD_FILE, OTHER_CARD_FILE = "README.md", "MODEL_CARD.md"
GRID_FILE, OTHER_GRID_FILE = "samples.png", "card_samples.png"
MARKER = "<!-- written by flowdppo export; the next export to this folder replaces it -->"
DEFAULT_LICENSE = "other"
EXPERTS = ("transformer", "transformer_2")
PIPELINE_TAGS = {"text_to_image": "text-to-image", "text_to_video": "text-to-video"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]*")


def card_names(out: Path) -> tuple[str, str]:
    """The card's and the grid's file names in ``out``: ``README.md`` / ``samples.png``, unless a file of that name
    is there that no earlier export wrote (then ``MODEL_CARD.md`` / ``card_samples.png``)."""
    ours = any(MARKER in _text(out / name) for name in (CARD_FILE, OTHER_CARD_FILE))
    card = CARD_FILE if not (out / CARD_FILE).exists() or MARKER in _text(out / CARD_FILE) else OTHER_CARD_FILE
    grid = GRID_FILE if not (out / GRID_FILE).exists() or ours else OTHER_GRID_FILE
    return card, grid


def check_license(license: str) -> str:
    if not LICENSE.fullmatch(license):
        raise ConfigError(
            f"--license: {license!r} is not a license identifier of the Hugging Face hub (e.g. apache-2.0, mit, "
            f"openrail++, other)"
        )
    return license


def write_model_card(
    run_dir: Path, cfg, staging: Path, out: Path, license: str = DEFAULT_LICENSE, checkpoint: str = ""
) -> Path:
    """Write the card (and the run's sample grid) into ``staging``, the folder ``export_lora`` stages ``out`` in;
    returns where the card will be in ``out``. ``checkpoint``: the checkpoint exported ("" for ``final/``)."""
    card, grid = card_names(out)
    samples = Path(run_dir) / "samples.png"
    if samples.is_file():
        shutil.copyfile(samples, staging / grid)
    files = {p.name for folder in (staging, out) if folder.is_dir() for p in folder.iterdir() if p.is_file()}
    text = model_card(Path(run_dir), cfg, str(out), files, grid if samples.is_file() else "", license, checkpoint)
    (staging / card).write_text(text)
    return out / card


def model_card(
    run_dir: Path, cfg, out: str, files: set[str], grid: str, license: str = DEFAULT_LICENSE, checkpoint: str = ""
) -> str:
    """The card's text: front matter and sections, from the run folder and the names of the export's ``files``."""
    rows = _rows(run_dir / "metrics.jsonl")
    weights = (
        f"its checkpoint `{checkpoint}`, not its final weights: the measures below are the run's, of `final/`"
        if checkpoint
        else "its final weights"
    )
    sections = [
        f"---\n{yaml.safe_dump(front_matter(cfg, license), sort_keys=False)}---",
        MARKER,
        f"# {cfg.method} LoRA for {cfg.model or 'the flowdppo digits task'}",
        f"A LoRA adapter trained with flowdppo (online RL fine-tuning of flow-matching models): the run folder "
        f"`{run_dir}`, {weights}.",
        *_base_model_note(cfg),
        "## Method\n\n" + method_text(cfg),
        "## Rewards and training\n\n" + training_text(cfg, rows),
        "## Evaluation\n\n" + evaluation_text(run_dir, rows),
        *([f"## Samples\n\n![base vs trained samples]({grid})\n\n{_grid_caption(cfg)}"] if grid else []),
        "## How to load it\n\n" + loading_text(cfg, out, files),
        "## Resolved config\n\n```yaml\n" + (run_dir / "config.yaml").read_text().rstrip() + "\n```",
    ]
    return "\n\n".join(sections) + "\n"


def front_matter(cfg, license: str) -> dict:
    pipeline = cfg.task in PIPELINE_TAGS
    meta: dict = {}
    if pipeline:
        meta["base_model"] = hub_id(cfg.model) or cfg.model
    meta["library_name"] = "diffusers" if pipeline else "flowdppo"
    meta["license"] = license
    if pipeline:
        meta["pipeline_tag"] = PIPELINE_TAGS[cfg.task]
    task_tags = [PIPELINE_TAGS[cfg.task], "diffusers"] if pipeline else ["digits"]
    meta["tags"] = ["flowdppo", cfg.method.replace("_", "-"), "lora", *task_tags, "reinforcement-learning"]
    return meta


def hub_id(model: str) -> str:
    """The hub id of ``model``: itself when it is ``org/name`` and no local path, the id of a hub cache snapshot
    folder (``models--org--name/snapshots/...``); "" for another local folder."""
    cached = re.search(r"models--([^/]+)--([^/]+)/snapshots/", str(Path(model).resolve()) if model else "")
    if cached:
        return f"{cached[1]}/{cached[2]}"
    return model if HUB_ID.fullmatch(model) and not Path(model).exists() else ""


def _base_model_note(cfg) -> list[str]:
    notes = []
    if cfg.task in PIPELINE_TAGS and not hub_id(cfg.model):
        notes.append(
            f"`base_model` is the local folder the run trained from ({cfg.model}); give its hub id there before "
            "uploading this card."
        )
    notes.append(
        "`license` is the one given to `flowdppo export --license` (default `other`): the adapter is a derivative of "
        "the base model and falls under its license."
    )
    return notes


def method_text(cfg) -> str:
    """The preset, the algorithm and what its update optimises, the sampler and the LoRA settings."""
    from flowdppo.algorithms import ALGORITHMS
    from flowdppo.losses import get_loss

    algorithm = ALGORITHMS[cfg.algorithm]
    if cfg.algorithm == "policy_gradient":
        what, detail = get_loss(cfg.loss.loss_mode).fn.__doc__ or "", f"loss `{cfg.loss.loss_mode}`"
        if cfg.loss.loss_mode == "flow_dppo":
            detail += f", tau (`loss.kl_mask_threshold`) {cfg.loss.kl_mask_threshold:g}"
        elif cfg.loss.loss_mode != "unconstrained":
            detail += f", clip range (`loss.clip_range`) {cfg.loss.clip_range:g}"
    else:
        what = __import__(algorithm.__module__, fromlist=["_"]).__doc__ or ""
        detail = f"algorithm `{cfg.algorithm}`"
    s, o = cfg.sampler, cfg.optim
    sampler = f"sampler `{s.kind}` (eta {s.eta:g}), {s.num_steps} steps, guidance scale {s.guidance_scale:g}"
    targets = ", ".join(o.lora_target_modules) or "the model family's preset"
    return "\n".join(
        [
            f"- method `{cfg.method}`: {_first_line(what)}",
            f"- {detail}",
            f"- {sampler}",
            f"- LoRA rank {o.lora_rank}, alpha {o.lora_alpha:g} (update (alpha / rank) B A) on {targets}",
        ]
    )


def training_text(cfg, rows: list[dict]) -> str:
    rewards = ", ".join(f"`{n}` (weight {w:g})" for n, w in zip(cfg.reward.names, cfg.reward.weights, strict=True))
    epochs = rows[-1]["epoch"] + 1 if rows else 0
    samples = epochs * cfg.prompts_per_epoch * cfg.group_size
    lines = [
        f"- rewards: {rewards}; advantages: {cfg.reward.aggregation}",
        f"- epochs trained: {epochs} of {cfg.epochs}; {cfg.prompts_per_epoch} prompts x {cfg.group_size} samples per "
        f"epoch ({samples:,} samples), {cfg.sampler.num_steps} sampler steps each",
        f"- optimizer: AdamW, lr {cfg.optim.lr:g}; optim.minibatch_size {cfg.optim.minibatch_size}, "
        f"optim.grad_accum {cfg.optim.grad_accum}, optim.inner_epochs {cfg.optim.inner_epochs}",
    ]
    if rows:
        lines.append(
            f"- mean rollout reward: first epoch {rows[0]['reward_mean']:.4f}, last epoch {rows[-1]['reward_mean']:.4f}"
        )
    return "\n".join(lines)


def evaluation_text(run_dir: Path, rows: list[dict]) -> str:
    """The protocol results with their CIs, the run's own evaluation, the KL to the base."""
    parts = [protocol_text(run_dir)]
    base = _json(run_dir / "base_eval.json")
    last = next((r for r in reversed(rows) if any(k.startswith("eval/") for k in r)), {})
    trained = {k: v for k, v in last.items() if k.startswith("eval")}
    measures = [k for k in {**base, **trained} if k != "eval/kl_to_base"]
    if measures:
        lines = [
            "The run's own evaluation (ODE samples of the held-out prompts or classes from fixed noise"
            + (f", epoch {last['epoch']}" if last else "")
            + "; one number each, no CI):",
            "",
            "| measure | base | trained |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {_number(base.get(k))} | {_number(trained.get(k))} |" for k in measures]
        parts.append("\n".join(lines))
    else:
        parts.append("The run's own evaluation: not evaluated.")
    kl = trained.get("eval/kl_to_base")
    rollout = rows[-1].get("kl_to_base") if rows else None
    parts.append(
        "KL to the base (path KL of the Flow-SDE kernel, mean per sample): "
        + (f"{kl:.4g} on the evaluation samples" if kl is not None else "not evaluated on the evaluation samples")
        + (f"; {rollout:.4g} on the last epoch's rollouts." if rollout is not None else ".")
    )
    return "\n\n".join(parts)


def protocol_text(run_dir: Path) -> str:
    """A table per protocol result in ``RUN/eval``: reward, base, trained, trained - base, with bootstrap CIs."""
    tables = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            result = load_result(path)
        except ConfigError:
            continue  # another file, or a damaged result: not a measure of this run
        p = result["protocol"]
        confidence = p["bootstrap"]["confidence"]
        lines = [
            f"Protocol `{path.name}` (`flowdppo eval --prompts`): {p['prompts_count']} prompts of "
            f"`{p['prompts_file']}` x {p['samples_per_prompt']} samples, seed {p['seed']}, {p['steps']} ODE steps; "
            f"mean over prompts [{confidence:.0%} bootstrap CI]:",
            "",
            "| reward | base | trained | trained - base |",
            "|---|---|---|---|",
        ]
        for name, stats in result["summary"].items():
            cells = [format_interval(stats[k], signed=k == "difference") for k in ("base", "trained", "difference")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables) or (
        "Protocol with CIs: not evaluated (`flowdppo eval RUN --prompts FILE` measures it, then export again)."
    )


def loading_text(cfg, out: str, files: set[str]) -> str:
    """The snippets that load each adapter file the export folder holds."""
    if cfg.task not in PIPELINE_TAGS:
        return digits_loading(cfg, out)
    diffusers = [(e, lora_file(e)) for e in EXPERTS if lora_file(e) in files]
    comfyui = [(e, lora_file(e, COMFYUI_FILE)) for e in EXPERTS if lora_file(e, COMFYUI_FILE) in files]
    parts = []
    if diffusers:
        lines = [
            "import torch",
            "from diffusers import DiffusionPipeline",
            "",
            f"pipe = DiffusionPipeline.from_pretrained({hub_id(cfg.model) or cfg.model!r}, "
            f"dtype=torch.{cfg.precision})",
        ]
        for expert, name in diffusers:
            extra = ", load_into_transformer_2=True" if expert == "transformer_2" else ""
            lines.append(f"pipe.load_lora_weights({out!r}, weight_name={name!r}{extra})")
        lines.append('pipe.to("cuda")')
        lines.append(f"# the run sampled {cfg.sampler.num_steps} steps, guidance scale {cfg.sampler.guidance_scale:g}")
        parts.append(
            "diffusers (the folder, or the hub repo id once uploaded):\n\n```python\n" + "\n".join(lines) + "\n```"
        )
    else:
        parts.append(f"diffusers: `flowdppo export RUN --out {out}` writes `{LORA_FILE}` for `load_lora_weights`.")
    if comfyui:
        nodes = {
            f"lora_{i}": {
                "class_type": "LoraLoaderModelOnly",
                "inputs": {"model": ["MODEL_LOADER", 0], "lora_name": name, "strength_model": 1.0},
            }
            for i, (_, name) in enumerate(comfyui)
        }
        where = (
            f"`{comfyui[0][1]}` on the high-noise model, `{comfyui[1][1]}` on the low-noise model"
            if len(comfyui) > 1
            else f"`{comfyui[0][1]}` on the model"
        )
        parts.append(
            f"ComfyUI: copy the file(s) into `ComfyUI/models/loras/` and apply {where} with a `LoraLoaderModelOnly` "
            "node at strength 1.0 (each module's alpha is in the file); in an API-format workflow:\n\n```json\n"
            + json.dumps(nodes, indent=2)
            + "\n```"
        )
    else:
        parts.append(
            f"ComfyUI: `flowdppo export RUN --out {out} --format comfyui` writes `{COMFYUI_FILE}` for ComfyUI's LoRA "
            "loader (the card then shows both)."
        )
    return "\n\n".join(parts)


def digits_loading(cfg, out: str) -> str:
    """The digits task's policy is not a diffusers pipeline: its base, then the adapter through flowdppo."""
    o = cfg.optim
    base = f"DigitsPolicy.from_pretrained({cfg.model!r})" if cfg.model else None
    base = base or f"load_base_policy(upsample={cfg.digits.upsample})"
    optim = f"OptimConfig(lora_rank={o.lora_rank}, lora_alpha={o.lora_alpha!r}"
    optim += f", lora_target_modules={list(o.lora_target_modules)!r}" if o.lora_target_modules else ""
    optim += ", lora_text_stream=False)" if not o.lora_text_stream else ")"
    lines = [
        "from pathlib import Path",
        "",
        "from flowdppo.config import OptimConfig",
        "from flowdppo.policies.lora import load_lora_adapter",
        "from flowdppo.tasks.digits.policy import DigitsPolicy, load_base_policy",
        "",
        f"policy = {base}",
        f"load_lora_adapter(policy, Path({out!r}), {optim})",
    ]
    return (
        "The digits task's policy is not a diffusers pipeline; load the adapter into its base with flowdppo:\n\n"
        "```python\n" + "\n".join(lines) + "\n```\n\n"
        "`policy(x, sigma, labels)` is then the trained velocity (`flowdppo eval RUN` measures it)."
    )


def _grid_caption(cfg) -> str:
    rows = {"digits": "class (0-9)", "text_to_video": "prompt (a strip of frames of its video)"}.get(cfg.task, "prompt")
    return f"The base (left) and the trained policy (right) from the same noise, one row per {rows}."


def _first_line(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "`")


def _number(value) -> str:
    return "not evaluated" if value is None else f"{value:.4f}"


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace") if path.is_file() else ""
    except OSError:
        return ""


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _rows(path: Path) -> list[dict]:
    """The run's metric rows (a damaged line is skipped: the card reports what it can read)."""
    rows = []
    for line in _text(path).splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "epoch" in row:
            rows.append(row)
    return rows
