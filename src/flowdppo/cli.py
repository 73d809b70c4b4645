"""Command line: ``flowdppo train | eval | export | compare | digits pretrain | digits classifier``.

    flowdppo train                                  # Flow-DPPO on the digits task, CPU, ~2 minutes
    flowdppo train --method flow_grpo --out runs/grpo loss.clip_range=2e-4 epochs=60
    flowdppo train --resume runs/grpo
    flowdppo eval runs/grpo
    flowdppo export runs/grpo --out lora/        # for pipeline.load_lora_weights("lora/")
    flowdppo export runs/grpo --out lora/ --format comfyui   # lora/comfyui_lora.safetensors for ComfyUI
    flowdppo compare --preset single --seeds 5 --out runs/bench
    flowdppo reward-server --reward classifier_prob --port 8000   # then reward.names=[http://127.0.0.1:8000]

Errors the user can fix (configuration, inputs, a non-finite reward or loss) print one line and exit
with code 2 (``--debug`` shows the traceback).

Data-parallel on N GPUs (or CPU processes): ``torchrun --nproc-per-node N -m flowdppo train …`` or
``accelerate launch --num_processes N -m flowdppo train …``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

# transformers (imported by diffusers' pipelines) warns about optional image backends we never use
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402  (after the environment is set)

from flowdppo.config import PRESETS, load_config, resume_config, saved_config
from flowdppo.errors import ConfigError, FlowDPPOError, cut, did_you_mean, shown
from flowdppo.rewards.server import DEFAULT_MAX_BODY_MB, DEFAULT_MAX_IMAGES
from flowdppo.tasks.digits import UPSAMPLE_FACTORS


def _train(args: argparse.Namespace) -> int:
    from flowdppo.trainer import train

    if args.resume:
        cfg = resume_config(saved_config(Path(args.resume), "--resume"), args.method, args.config, args.overrides)
        out = Path(args.resume)
    else:
        cfg = load_config(args.method, args.config, args.overrides)
        out = Path(args.out or f"runs/{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.run_dir = out  # named in the message if the run is interrupted
    run = train(cfg, out, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.no_progress)
    if run.is_writer:
        _print_summary(run.path, cfg.eval_samples_per_class)
    return 0


def _plan(args: argparse.Namespace) -> int:
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
    print(f"  rollout reward   first epoch {rows[0]['reward_mean']:.3f} -> last epoch {last['reward_mean']:.3f}")
    unit = "class" if "eval/accuracy" in base else "held-out prompt"
    if base:
        print(f"  evaluation       {per_class} samples per {unit} (`flowdppo eval {path}` uses {EVAL_PER_CLASS}, "
              "less noisy)")
    for key in ("eval/accuracy", "eval/fid") if "eval/accuracy" in base else base:
        print(f"  {key:<16} base {base[key]:.3f} -> trained {last[key]:.3f}")
    print(f"  path KL to base  {last['kl_to_base']:.3e}")
    print(f"  look at: {path / 'samples.png'} and {path / 'plots' / 'curves.png'}")


def _eval(args: argparse.Namespace) -> int:
    from flowdppo.evaluate import evaluate_run

    if args.report is not None:
        return _eval_report(args)
    if args.run_dir is None:
        raise ConfigError("eval: give a run folder (flowdppo eval RUN ...) or --report FILE.json")
    if args.prompts is not None:
        return _eval_protocol(args)
    given = {"--rewards": args.rewards, "--samples-per-prompt": args.samples_per_prompt, "--seed": args.seed,
             "--out": args.out}  # fmt: skip
    for flag, value in given.items():
        if value is not None:
            raise ConfigError(f"{flag}: only with --prompts FILE (the text-to-image protocol)")
    per_class = EVAL_PER_CLASS if args.per_class is None else args.per_class
    _positive(per_class=per_class)
    results = evaluate_run(Path(args.run_dir), per_class=per_class)
    width = max(len(k) for k in results["base"])
    print(f"{'measure':<{width}}  {'base':>9}  {'trained':>9}")
    for key in results["base"]:
        print(f"{key:<{width}}  {results['base'][key]:>9.4f}  {results['trained'][key]:>9.4f}")
    return 0


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
    result = evaluate_protocol(run_dir, prompts, parse_reward_names(args.rewards), per_prompt,
                               DEFAULT_SEED if args.seed is None else args.seed)  # fmt: skip
    out = write_result(result, Path(args.out) if args.out else run_dir / "eval" / f"{prompts.stem}.json")
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


def _export(args: argparse.Namespace) -> int:
    from flowdppo.evaluate import export_lora

    written = export_lora(Path(args.run_dir), Path(args.out), args.checkpoint, args.format, args.overwrite,
                          check=not args.no_check)  # fmt: skip
    print(f"wrote {written}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from flowdppo.compare import BENCH_PRESETS, METHODS
    from flowdppo.compare_report import gather_reports, probe_line, render_report
    from flowdppo.compare_runs import run_compare, run_probe

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
            resume = " ".join(["flowdppo compare --preset", results["preset"], "--seeds", str(results["seeds"]),
                               "--out", str(out), *results["overrides"]])  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"--report-only: {out / 'results.json'} is not a compare results file ({err!r})") from err
        if done < planned:
            raise ConfigError(f"--report-only: {out} holds {done} of {planned} runs; "
                              f"finish it with `{resume}` (and the same --methods)")  # fmt: skip
        print(f"wrote {render_report(out)}")
        return 0
    _positive(seeds=args.seeds, jobs=args.jobs if args.jobs is not None else 1)
    if args.preset not in BENCH_PRESETS:
        raise ConfigError(f"--preset: unknown preset {shown(args.preset)}{did_you_mean(args.preset, BENCH_PRESETS)}; "
                          f"choose from {', '.join(BENCH_PRESETS)}")
    if args.probe_only:
        print(probe_line(run_probe(args.preset, args.overrides, Path(args.out or f"runs/probe-{args.preset}"))))
        return 0
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    unknown = [m for m in methods if m not in PRESETS]
    if unknown:
        raise ConfigError(f"--methods: unknown method {shown(unknown[0])}{did_you_mean(unknown[0], PRESETS)}; "
                          f"choose from {', '.join(PRESETS)}")
    out = Path(args.out or f"runs/compare-{args.preset}")
    run_compare(args.preset, out, args.seeds, methods, args.overrides, args.jobs, [Path(d) for d in args.reuse],
                args.seed_offset)
    print(f"report: {out / 'REPORT.md'}")
    return 0


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")


def _digits_pretrain(args: argparse.Namespace) -> int:
    from flowdppo.tasks.digits.pretrain import pretrain

    pretrain(args.out, steps=args.steps, seed=args.seed, upsample=args.upsample)
    return 0


def _digits_classifier(args: argparse.Namespace) -> int:
    from flowdppo.tasks.digits.classifier import train_classifier

    train_classifier(args.out, seed=args.seed)
    return 0


def _reward_server(args: argparse.Namespace) -> int:
    from flowdppo.rewards.server import serve

    serve(args.reward, args.host, args.port, args.device, args.token, args.max_images, args.max_body_mb)
    return 0


def quiet_loading_bars() -> None:
    """No per-component "Loading weights" bars from diffusers / transformers (hub downloads keep theirs)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowdppo", description="Online RL fine-tuning of flow-matching models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a policy (default: Flow-DPPO on the digits task)")
    train.add_argument("--config", help="YAML file of settings")
    train.add_argument("--method", help=f"preset: {', '.join(PRESETS)} (default flow_dppo)")
    train.add_argument("--out", help="run folder (default runs/METHOD-TIME)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="reuse an --out folder that holds another run")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. loss.kl_mask_threshold=1e-4")
    train.set_defaults(func=_train)

    plan = commands.add_parser("plan", help="parameter counts and peak GPU memory of a recipe (no weights read)")
    plan.add_argument("--config", help="YAML file of settings, as for train")
    plan.add_argument("--method", help=f"preset: {', '.join(PRESETS)} (default flow_dppo)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.minibatch_size=8")
    plan.set_defaults(func=_plan)

    ev = commands.add_parser("eval", help="in-domain and out-of-domain measures of a run vs the base")
    ev.add_argument("run_dir", nargs="?", help="the run folder (not with --report)")
    ev.add_argument("--per-class", type=int, default=None, help="digits and held-out prompts: samples each (50)")
    ev.add_argument("--prompts", metavar="FILE", help="text_to_image: the pinned protocol on this prompt file "
                    "(.txt or .jsonl): base vs trained from the same per-prompt noise, bootstrap CIs")  # fmt: skip
    ev.add_argument("--rewards", metavar="R1,R2", help="with --prompts: rewards to score (default: the run's)")
    ev.add_argument("--samples-per-prompt", type=int, default=None, help="with --prompts: samples per prompt (4)")
    ev.add_argument("--seed", type=int, default=None, help="with --prompts: the noise seed (0)")
    ev.add_argument("--out", metavar="FILE.json", help="with --prompts: the result (default RUN/eval/PROMPTS.json)")
    ev.add_argument("--report", metavar="FILE.json", help="print the table of a saved result (no model loaded)")
    ev.set_defaults(func=_eval)

    exp = commands.add_parser("export", help="write a run's LoRA adapter for pipeline.load_lora_weights or ComfyUI")
    exp.add_argument("run_dir")
    exp.add_argument("--out", required=True, help="folder for the adapter file")
    exp.add_argument("--format", default="diffusers",
                     help="diffusers (pytorch_lora_weights.safetensors, default) or comfyui (comfyui_lora.safetensors, "
                          "with the alpha tensors ComfyUI scales by)")  # fmt: skip
    exp.add_argument("--checkpoint", action="store_true", help="from the newest checkpoint instead of final/")
    exp.add_argument("--overwrite", action="store_true", help="replace an adapter file already in --out")
    exp.add_argument("--no-check", action="store_true",
                     help="skip the check that the adapter, loaded into a fresh base model, changes its velocity "
                          "(it loads the base model; a ComfyUI export is checked for a nonzero update)")  # fmt: skip
    exp.set_defaults(func=_export)

    cmp = commands.add_parser("compare", help="DigitsBench: every method x seed, with a report")
    cmp.add_argument("--preset", default="single", help="single, multi, epochs, threshold, calib, dim64, dim1024, "
                     "dim4096, stress, heldout, confirm, matched or smoke (see flowdppo.compare.preset_arms)")
    cmp.add_argument("--probe-only", action="store_true",
                     help="only the preset's short regime probe: each baseline setting's p90 of dim*D, clipping "
                          "asymmetry and ratio bias/noise at its latent size")
    cmp.add_argument("--methods", help="comma-separated methods, any registered preset (default: all of them)")
    cmp.add_argument("--seeds", type=int, default=5)
    cmp.add_argument("--seed-offset", type=int, default=None,
                     help="first seed (seeds N, N+1, ...; default: the one results.json recorded, else the preset's "
                          "pre-registered one, else 0), so a confirmation never reuses seeds that informed a choice")
    cmp.add_argument("--jobs", type=int, default=None, help="parallel runs (default: the number of cores)")
    cmp.add_argument("--out", help="report folder (default runs/compare-PRESET)")
    cmp.add_argument("--report-only", metavar="DIR", help="re-render REPORT.md from DIR/results.json")
    cmp.add_argument(
        "--reuse",
        metavar="DIR",
        action="append",
        default=[],
        help="take runs with an identical resolved config from DIR/results.json",
    )
    cmp.add_argument("--gather", metavar="ROOT", help="write ROOT/REPORT.md from the preset reports under ROOT")
    cmp.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run, e.g. epochs=20")
    cmp.set_defaults(func=_compare)

    digits = commands.add_parser("digits", help="re-create the digits task's shipped weights")
    digits_commands = digits.add_subparsers(dest="digits_command", required=True)
    pre = digits_commands.add_parser("pretrain", help="pretrain the base flow model")
    pre.add_argument("--out", required=True)
    pre.add_argument("--steps", type=int, default=2000)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--upsample", type=int, default=1, choices=UPSAMPLE_FACTORS,
                     help="the base of digits.upsample=U (default 1: the 8x8 base; the shipped U = 4, 8 bases took "
                     "--steps 6000); train with model=OUT")
    pre.set_defaults(func=_digits_pretrain)
    clf = digits_commands.add_parser("classifier", help="train the reward classifier")
    clf.add_argument("--out", required=True)
    clf.add_argument("--seed", type=int, default=0)
    clf.set_defaults(func=_digits_classifier)

    srv = commands.add_parser("reward-server", help="serve a reward over HTTP, for reward.names=[http://HOST:PORT]")
    srv.add_argument("--reward", required=True, metavar="NAME[@PATH]",
                     help="a digits or image reward (name or name@model_path) or module:function")  # fmt: skip
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    srv.add_argument("--device", help="where the reward runs (default cuda when available, else cpu)")
    srv.add_argument("--token", help="require Authorization: Bearer TOKEN (default: $FLOWDPPO_REWARD_TOKEN, which "
                     "keeps it out of the process list; the trainer reads the same variable)")  # fmt: skip
    srv.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                     help=f"images per request at most (default {DEFAULT_MAX_IMAGES})")  # fmt: skip
    srv.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                     help=f"request body size at most, in MB (default {DEFAULT_MAX_BODY_MB:g})")  # fmt: skip
    srv.set_defaults(func=_reward_server)
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the run stops where SIGINT would stop it."""


def _on_sigterm(signum, frame) -> None:
    raise Interrupted()


def main(argv: list[str] | None = None) -> int:
    """Every failure a user can cause ends in one line and exit code 2 (130 when interrupted); ``--debug``
    anywhere on the command line shows the traceback instead. Under ``torchrun`` only process 0 prints."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    quiet_loading_bars()
    quiet = int(os.environ.get("RANK", "0")) != 0  # one message per job, not one per process
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        if debug:
            raise
        how = "SIGTERM" if isinstance(err, Interrupted) else "SIGINT"
        hint = _resume_hint(args)
        _say(f"flowdppo: interrupted ({how}){'; ' + hint if hint else ''}", quiet)
        return 130
    except Exception as err:
        if debug or not _user_error(err):
            raise
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC
        hint = f"; free some space and {_resume_hint(args) or 'run the same command again'}" if full else ""
        _say(f"flowdppo: error: {_one_line(err)}{hint}", quiet)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


USER_ERRORS = (FlowDPPOError, ValueError, OSError, MemoryError, torch.cuda.OutOfMemoryError)
"""What a user's input or machine can cause: configuration, files and folders (missing, unreadable, a full or
read-only disk), out of memory. Anything else is a defect and keeps its traceback."""
MAX_MESSAGE = 1000  # characters of an error line; the rest is cut (a message that echoes a value cuts it sooner)


def _cpu_out_of_memory(err: BaseException) -> bool:
    """PyTorch's CPU allocator failing: a ``RuntimeError``, not a ``MemoryError``."""
    return isinstance(err, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(err)


def _user_error(err: BaseException) -> bool:
    return isinstance(err, USER_ERRORS) or _cpu_out_of_memory(err)


def _one_line(err: BaseException) -> str:
    """The error as one line of at most ``MAX_MESSAGE`` characters."""
    return cut(_message(err), MAX_MESSAGE)


def _message(err: BaseException) -> str:
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)) or _cpu_out_of_memory(err):
        return ("out of memory; reduce group_size, prompts_per_epoch, optim.minibatch_size or "
                "sampler.rollout_batch_size")
    if isinstance(err, OSError) and not isinstance(err, FlowDPPOError):
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror or err}{where}"
    return " ".join(str(err).split()) or type(err).__name__


def _resume_hint(args: argparse.Namespace) -> str:
    """``continue with: flowdppo train --resume RUN`` for a train command whose run folder holds a run."""
    run = getattr(args, "run_dir", None) if args.func is _train else None
    return f"continue with: flowdppo train --resume {run}" if run and (Path(run) / "config.yaml").is_file() else ""


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
