"""Command line: ``flowdppo train | config | plan | eval | export | compare | digits ... | reward-server``.

    flowdppo train                                  # Flow-DPPO on the digits task, CPU, ~2 minutes
    flowdppo train --method flow_grpo --out runs/grpo loss.clip_range=2e-4 epochs=60
    flowdppo train --resume runs/grpo
    flowdppo config sampler.                        # the sampler's keys; `config sampler.eta`: one in full
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
import os
import signal
import sys
from pathlib import Path

# transformers (imported by diffusers' pipelines) warns about optional image backends we never use
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402  (after the environment is set)

from flowdppo.commands import (
    compare_command,
    config_command,
    digits_classifier_command,
    digits_make_pairs_command,
    digits_pretrain_command,
    eval_command,
    export_command,
    plan_command,
    reward_server_command,
    train_command,
)
from flowdppo.config import PRESETS
from flowdppo.errors import FlowDPPOError, cut
from flowdppo.rewards.server import DEFAULT_MAX_BODY_MB, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_IMAGES
from flowdppo.tasks.digits import UPSAMPLE_FACTORS


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

    train = commands.add_parser(
        "train",
        help="train a policy (default: Flow-DPPO on the digits task)",
        epilog="Every key=value setting, its default and what it does: flowdppo config (one section: flowdppo "
        "config sampler.; one key in full: flowdppo config sampler.num_steps).",
    )
    train.add_argument("--config", help="YAML file of settings")
    train.add_argument("--method", help=f"preset: {', '.join(PRESETS)} (default flow_dppo)")
    train.add_argument("--out", help="run folder (default runs/METHOD-TIME)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="reuse an --out folder that holds another run")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. loss.kl_mask_threshold=1e-4 (all: flowdppo config)"
    )
    train.set_defaults(func=train_command)

    keys = commands.add_parser("config", help="every config key: its type, default, allowed values and doc")
    keys.add_argument(
        "key",
        nargs="?",
        default="",
        metavar="PREFIX_OR_KEY",
        help="one key in full (sampler.num_steps), or the keys under a prefix (sampler.); none: every key",
    )
    keys.set_defaults(func=config_command)

    plan = commands.add_parser("plan", help="parameter counts and peak GPU memory of a recipe (no weights read)")
    plan.add_argument("--config", help="YAML file of settings, as for train")
    plan.add_argument("--method", help=f"preset: {', '.join(PRESETS)} (default flow_dppo)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.minibatch_size=8")
    plan.set_defaults(func=plan_command)

    ev = commands.add_parser("eval", help="in-domain and out-of-domain measures of a run vs the base")
    ev.add_argument("run_dir", nargs="?", help="the run folder (not with --report)")
    ev.add_argument("--per-class", type=int, default=None, help="digits and held-out prompts: samples each (50)")
    ev.add_argument(
        "--prompts",
        metavar="FILE",
        help="text_to_image: the pinned protocol on this prompt file "
        "(.txt or .jsonl): base vs trained from the same per-prompt noise, bootstrap CIs",
    )
    ev.add_argument("--rewards", metavar="R1,R2", help="with --prompts: rewards to score (default: the run's)")
    ev.add_argument("--samples-per-prompt", type=int, default=None, help="with --prompts: samples per prompt (4)")
    ev.add_argument("--seed", type=int, default=None, help="with --prompts: the noise seed (0)")
    ev.add_argument(
        "--out",
        metavar="FILE.json",
        help="the result as JSON (with --prompts the default is RUN/eval/PROMPTS.json; without, nothing is written)",
    )
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --out result")
    ev.add_argument("--report", metavar="FILE.json", help="print the table of a saved result (no model loaded)")
    ev.set_defaults(func=eval_command)

    exp = commands.add_parser(
        "export", help="write a run's LoRA adapter for pipeline.load_lora_weights or ComfyUI, with a model card"
    )
    exp.add_argument("run_dir")
    exp.add_argument("--out", required=True, help="folder for the adapter file")
    exp.add_argument(
        "--format",
        default="diffusers",
        help="diffusers (pytorch_lora_weights.safetensors, default) or comfyui (comfyui_lora.safetensors, "
        "with the alpha tensors ComfyUI scales by)",
    )
    exp.add_argument("--checkpoint", action="store_true", help="from the newest checkpoint instead of final/")
    exp.add_argument(
        "--license",
        default="other",
        help="the model card's license (a hub identifier, e.g. apache-2.0; default other: the base model's terms)",
    )
    exp.add_argument("--overwrite", action="store_true", help="replace an adapter file already in --out")
    exp.add_argument(
        "--no-check",
        action="store_true",
        help="skip the check that the adapter, loaded into a fresh base model, changes its velocity "
        "(it loads the base model; a ComfyUI export is checked for a nonzero update)",
    )
    exp.set_defaults(func=export_command)

    cmp = commands.add_parser("compare", help="DigitsBench: every method x seed, with a report")
    cmp.add_argument(
        "--preset",
        default="single",
        help="single, multi, epochs, threshold, calib, dim64, dim1024, "
        "dim4096, stress, heldout, confirm, matched or smoke (see flowdppo.compare.preset_arms)",
    )
    cmp.add_argument(
        "--probe-only",
        action="store_true",
        help="only the preset's short regime probe: each baseline setting's p90 of dim*D, clipping "
        "asymmetry and ratio bias/noise at its latent size",
    )
    cmp.add_argument("--methods", help="comma-separated methods, any registered preset (default: all of them)")
    cmp.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds per arm (default 5; a pre-registered preset runs its plan's number, and only that)",
    )
    cmp.add_argument(
        "--seed-offset",
        type=int,
        default=None,
        help="first seed (seeds N, N+1, ...; default: the one results.json recorded, else the preset's "
        "pre-registered one, else 0), so a confirmation never reuses seeds that informed a choice",
    )
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
    cmp.set_defaults(func=compare_command)

    digits = commands.add_parser("digits", help="re-create the digits task's shipped weights")
    digits_commands = digits.add_subparsers(dest="digits_command", required=True)
    pre = digits_commands.add_parser("pretrain", help="pretrain the base flow model")
    pre.add_argument("--out", required=True)
    pre.add_argument("--steps", type=int, default=2000)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument(
        "--upsample",
        type=int,
        default=1,
        choices=UPSAMPLE_FACTORS,
        help="the base of digits.upsample=U (default 1: the 8x8 base; the shipped U = 4, 8 bases took "
        "--steps 6000); train with model=OUT",
    )
    pre.set_defaults(func=digits_pretrain_command)
    clf = digits_commands.add_parser("classifier", help="train the reward classifier")
    clf.add_argument("--out", required=True)
    clf.add_argument("--seed", type=int, default=0)
    clf.set_defaults(func=digits_classifier_command)
    pairs = digits_commands.add_parser(
        "make-pairs", help="a preference file for offline DPO (dpo.pairs_file) from scored base samples"
    )
    pairs.add_argument("--out", required=True, help="the JSONL file; its PNGs go to STEM_images/ beside it")
    pairs.add_argument("--n", type=int, default=200, help="pairs (prompts 0..9 in turn; default 200)")
    pairs.add_argument("--candidates", type=int, default=4, help="samples per prompt; the best and worst pair up (4)")
    pairs.add_argument("--reward", default="classifier_prob", help="the digits reward that ranks them")
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--upsample", type=int, default=1, choices=UPSAMPLE_FACTORS, help="digits.upsample=U's base")
    pairs.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    pairs.set_defaults(func=digits_make_pairs_command)

    srv = commands.add_parser("reward-server", help="serve a reward over HTTP, for reward.names=[http://HOST:PORT]")
    srv.add_argument(
        "--reward",
        required=True,
        metavar="NAME[@PATH]",
        help="a digits or image reward (name or name@model_path) or module:function",
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    srv.add_argument("--device", help="where the reward runs (default cuda when available, else cpu)")
    srv.add_argument(
        "--token",
        help="require Authorization: Bearer TOKEN (default: $FLOWDPPO_REWARD_TOKEN, which "
        "keeps it out of the process list; the trainer reads the same variable)",
    )
    srv.add_argument(
        "--max-images",
        type=int,
        default=DEFAULT_MAX_IMAGES,
        help=f"images per request at most (default {DEFAULT_MAX_IMAGES})",
    )
    srv.add_argument(
        "--max-body-mb",
        type=float,
        default=DEFAULT_MAX_BODY_MB,
        help=f"request body size at most, in MB (default {DEFAULT_MAX_BODY_MB:g})",
    )
    srv.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"connections answered at once; one more gets HTTP 503, which trainers retry (default "
        f"{DEFAULT_MAX_CONNECTIONS}; memory grows with it times --max-body-mb)",
    )
    srv.set_defaults(func=reward_server_command)
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
        return "out of memory; reduce group_size, prompts_per_epoch, optim.minibatch_size or sampler.rollout_batch_size"
    if isinstance(err, OSError) and not isinstance(err, FlowDPPOError):
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror or err}{where}"
    return " ".join(str(err).split()) or type(err).__name__


def _resume_hint(args: argparse.Namespace) -> str:
    """``continue with: flowdppo train --resume RUN`` for a train command whose run folder holds a run."""
    run = getattr(args, "run_dir", None) if args.func is train_command else None
    return f"continue with: flowdppo train --resume {run}" if run and (Path(run) / "config.yaml").is_file() else ""


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
