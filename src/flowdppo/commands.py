"""The commands behind ``flowdppo train | plan | eval | export | compare | digits ... | reward-server``: each takes
the parsed arguments (``cli.build_parser``) and returns the exit code; ``cli.main`` turns a user's error into one line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flowdppo.config import PRESETS, load_config, resume_config, saved_config
from flowdppo.errors import ConfigError, did_you_mean, shown
from flowdppo.files import write_text_atomic
from flowdppo.progress import quiet


def train_command(args: argparse.Namespace) -> int:
    from flowdppo.trainer import train

    if args.resume:
        cfg = resume_config(saved_config(Path(args.resume), "--resume"), args.method, args.config, args.overrides)
        out = Path(args.resume)
    else:
        cfg = load_config(args.method, args.config, args.overrides)
        out = Path(args.out or f"runs/{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.run_dir = out  # named in the message if the run is interrupted
    with quiet(args.no_progress):
        run = train(cfg, out, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.no_progress)
    if run.is_writer:
        _print_summary(run.path, cfg.eval_samples_per_class)
    return 0


def config_command(args: argparse.Namespace) -> int:
    from flowdppo.keys import lookup

    print(lookup(args.key))
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from flowdppo.plan import format_plan, make_plan

    print(format_plan(make_plan(load_config(args.method, args.config, args.overrides))))
    return 0


def _print_summary(path: Path, per_class: int) -> None:
    """The run's first and last rollout reward and its evaluation, base vs trained, on ``per_class`` samples per class
    (or held-out prompt): fewer than ``flowdppo eval`` takes, so its measures (FID most) are noisier."""
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    base = json.loads((path / "base_eval.json").read_text())
    last = rows[-1]
    print(f"\nrun folder: {path}")
    if "reward_mean" in last:  # not in a run trained on a file or a folder (no rollout)
        print(f"  rollout reward   first epoch {rows[0]['reward_mean']:.3f} -> last epoch {last['reward_mean']:.3f}")
    unit = "class" if "eval/accuracy" in base else "held-out prompt"
    if base:
        print(
            f"  evaluation       {per_class} samples per {unit} (`flowdppo eval {path}` uses {EVAL_PER_CLASS}, "
            "less noisy)"
        )
    for key in ("eval/accuracy", "eval/fid") if "eval/accuracy" in base else base:
        print(f"  {key:<16} base {base[key]:.3f} -> trained {last[key]:.3f}")
    kl = last.get("kl_to_base", last.get("eval/kl_to_base"))  # the evaluation's in a run with no rollout
    if kl is not None:
        print(f"  path KL to base  {kl:.3e}")
    print(f"  look at: {path / 'samples.png'} and {path / 'plots' / 'curves.png'}")


def eval_command(args: argparse.Namespace) -> int:
    from flowdppo.evaluate import evaluate_run

    if args.report is not None:
        return _eval_report(args)
    if args.run_dir is None:
        raise ConfigError("eval: give a run folder (flowdppo eval RUN ...) or --report FILE.json")
    if args.prompts is not None:
        return _eval_protocol(args)
    given = {"--rewards": args.rewards, "--samples-per-prompt": args.samples_per_prompt, "--seed": args.seed}
    for flag, value in given.items():
        if value is not None:
            raise ConfigError(f"{flag}: only with --prompts FILE (the text-to-image protocol)")
    if args.overwrite and args.out is None:
        raise ConfigError("--overwrite: replaces an --out result; give --out FILE.json")
    per_class = EVAL_PER_CLASS if args.per_class is None else args.per_class
    _positive(per_class=per_class)
    out = None if args.out is None else _result_file(Path(args.out), args.overwrite, "eval")
    results = evaluate_run(Path(args.run_dir), per_class=per_class)
    width = max(len(k) for k in results["base"])
    print(f"{'measure':<{width}}  {'base':>9}  {'trained':>9}")
    for key in results["base"]:
        print(f"{key:<{width}}  {results['base'][key]:>9.4f}  {results['trained'][key]:>9.4f}")
    if out is not None:
        record = {"run": str(Path(args.run_dir).resolve()), "per_class": per_class, **results}
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def _result_file(out: Path, overwrite: bool, name: str) -> Path:
    """``out`` where a result may be written: not a folder, and not an earlier result unless ``overwrite``."""
    if out.is_dir():
        raise ConfigError(f"--out: {out} is a folder; give a file name, e.g. {out / name}.json")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out: {out} holds an earlier result; give --overwrite to replace it or another --out")
    return out


EVAL_PER_CLASS = 50  # flowdppo eval's samples per class / held-out prompt


def _eval_protocol(args: argparse.Namespace) -> int:
    """``eval RUN --prompts FILE``: base vs trained on the file, bootstrap CIs, a result JSON (``protocol.py``)."""
    from flowdppo.protocol import DEFAULT_SAMPLES_PER_PROMPT, DEFAULT_SEED, evaluate_protocol, parse_reward_names
    from flowdppo.protocol_report import format_table, write_result

    if args.per_class is not None:
        raise ConfigError("--per-class: the digits evaluation's; with --prompts give --samples-per-prompt")
    per_prompt = DEFAULT_SAMPLES_PER_PROMPT if args.samples_per_prompt is None else args.samples_per_prompt
    _positive(samples_per_prompt=per_prompt)
    run_dir, prompts = Path(args.run_dir), Path(args.prompts)
    out = _result_file(
        Path(args.out) if args.out else run_dir / "eval" / f"{prompts.stem}.json", args.overwrite, prompts.stem
    )
    result = evaluate_protocol(
        run_dir, prompts, parse_reward_names(args.rewards), per_prompt, DEFAULT_SEED if args.seed is None else args.seed
    )
    write_result(result, out)
    print(format_table(result))
    print(f"wrote {out}")
    return 0


def _eval_report(args: argparse.Namespace) -> int:
    """``eval --report FILE.json``: the table of a saved result, nothing sampled and no model loaded."""
    from flowdppo.protocol_report import format_table, load_result

    if args.run_dir is not None or args.prompts is not None:
        raise ConfigError("--report: re-renders a saved result; give no run folder or --prompts with it")
    print(format_table(load_result(Path(args.report))))
    return 0


def export_command(args: argparse.Namespace) -> int:
    from flowdppo.evaluate import export_lora

    adapter, card = export_lora(
        Path(args.run_dir),
        Path(args.out),
        args.checkpoint,
        args.format,
        args.overwrite,
        check=not args.no_check,
        license=args.license,
    )
    print(f"wrote {adapter}")
    print(f"model card: {card}")
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from flowdppo.compare import BENCH_PRESETS, METHODS
    from flowdppo.compare_report import gather_reports, probe_line, render_report
    from flowdppo.compare_runs import run_compare, run_probe, seeds_of

    if args.gather:
        print(f"wrote {gather_reports(Path(args.gather))}")
        return 0
    if args.report_only:
        out = Path(args.report_only)
        if not (out / "results.json").is_file():
            raise ConfigError(f"--report-only: no results.json in {out}; give the --out folder of a compare run")
        try:  # every key a report needs, read once: a foreign or truncated file fails here, in one line
            results = json.loads((out / "results.json").read_text())
            done = sum(len(arm["seeds"]) for arm in results["arms"].values())
            planned = len(results["arms"]) * results["seeds"]
            resume = " ".join(
                [
                    "flowdppo compare --preset",
                    results["preset"],
                    "--seeds",
                    str(results["seeds"]),
                    "--out",
                    str(out),
                    *results["overrides"],
                ]
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"--report-only: {out / 'results.json'} is not a compare results file ({err!r})") from err
        if done < planned:
            raise ConfigError(
                f"--report-only: {out} holds {done} of {planned} runs; "
                f"finish it with `{resume}` (and the same --methods)"
            )
        print(f"wrote {render_report(out)}")
        return 0
    _positive(seeds=args.seeds if args.seeds is not None else 1, jobs=args.jobs if args.jobs is not None else 1)
    if args.preset not in BENCH_PRESETS:
        raise ConfigError(
            f"--preset: unknown preset {shown(args.preset)}{did_you_mean(args.preset, BENCH_PRESETS)}; "
            f"choose from {', '.join(BENCH_PRESETS)}"
        )
    seeds = seeds_of(args.preset, args.seeds)
    if args.probe_only:
        print(probe_line(run_probe(args.preset, args.overrides, Path(args.out or f"runs/probe-{args.preset}"))))
        return 0
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    unknown = [m for m in methods if m not in PRESETS]
    if unknown:
        raise ConfigError(
            f"--methods: unknown method {shown(unknown[0])}{did_you_mean(unknown[0], PRESETS)}; "
            f"choose from {', '.join(PRESETS)}"
        )
    out = Path(args.out or f"runs/compare-{args.preset}")
    run_compare(
        args.preset,
        out,
        seeds,
        methods,
        args.overrides,
        args.jobs,
        [Path(d) for d in args.reuse],
        args.seed_offset,
    )
    print(f"report: {out / 'REPORT.md'}")
    return 0


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")


def digits_pretrain_command(args: argparse.Namespace) -> int:
    from flowdppo.tasks.digits.pretrain import pretrain

    pretrain(args.out, steps=args.steps, seed=args.seed, upsample=args.upsample)
    return 0


def digits_classifier_command(args: argparse.Namespace) -> int:
    from flowdppo.tasks.digits.classifier import train_classifier

    train_classifier(args.out, seed=args.seed)
    return 0


def digits_make_pairs_command(args: argparse.Namespace) -> int:
    from flowdppo.tasks.digits.make_pairs import make_pairs

    out = make_pairs(
        args.out, args.n, args.candidates, args.seed, args.reward, upsample=args.upsample, overwrite=args.overwrite
    )
    print(f"{args.n} pairs: {out}; train with: flowdppo train --method diffusion_dpo_offline dpo.pairs_file={out}")
    return 0


def reward_server_command(args: argparse.Namespace) -> int:
    from flowdppo.rewards.server import serve

    serve(
        args.reward,
        args.host,
        args.port,
        args.device,
        args.token,
        args.max_images,
        args.max_body_mb,
        args.max_connections,
    )
    return 0
