"""Every built-in reward by name, and the one place a reward name (``reward.names``) is resolved.

``REWARDS`` maps a name to a ``RewardEntry``: its kind (what it scores: "digits" the digits task's images and
labels, "image" images and text prompts, "video" videos and text prompts), its factory and its default model ("":
none). A name in ``reward.names`` is one of these (``name``, or ``name@model_path`` for a model reward: a local
directory or a hub id), a reward server's address (``http://HOST:PORT[?options]``, ``rewards.remote``) or your own
``module:function`` (``load_user_reward``). A task names the kinds it takes and how it wraps what is loaded
(``load_rewards``); an unknown name is one line with the closest valid name and the names the task takes.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flowdppo.errors import ConfigError, did_you_mean, shown
from flowdppo.progress import status
from flowdppo.rewards import Reward, load_user_reward
from flowdppo.rewards.address import is_remote, redacted
from flowdppo.rewards.hps import HPS_HUB, make_hps_reward
from flowdppo.rewards.image import (
    CLIP_L14,
    PICKSCORE_MODEL,
    PICKSCORE_PROCESSOR,
    ClipEmbedder,
    ClipScoreReward,
    JpegReward,
    PickScoreReward,
    load_aesthetic_reward,
)
from flowdppo.rewards.ocr import OcrReward
from flowdppo.rewards.remote import load_remote_reward
from flowdppo.rewards.video import TemporalConsistencyReward
from flowdppo.rewards.vlm import make_vlm_reward

KINDS = ("digits", "image", "video")
VLM_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
OCR_MODEL = "microsoft/trocr-base-printed"


@dataclass
class RewardContext:
    """What a factory builds on: the device and dtype of its model, and the digits classifier the digits rewards
    share (None: the shipped one)."""

    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    classifier: Any = None

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)


Factory = Callable[[str, RewardContext], Reward]
"""``factory(model, context)``: the reward with the model at ``model`` ("" for a reward without a model)."""


@dataclass(frozen=True)
class RewardEntry:
    kind: str
    factory: Factory
    default_model: str = ""


REWARDS: dict[str, RewardEntry] = {}


def register_reward(name: str, kind: str, factory: Factory, default_model: str = "") -> None:
    """Add the built-in reward ``name`` of ``kind`` (one of ``KINDS``)."""
    if kind not in KINDS:
        raise ValueError(f"reward {name!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if name in REWARDS:
        raise ValueError(f"reward {name!r} is registered already")
    REWARDS[name] = RewardEntry(kind, factory, default_model)


def _classifier(log: bool) -> Factory:
    def make(model: str, ctx: RewardContext) -> Reward:
        from flowdppo.tasks.digits.classifier import load_classifier  # imported when used: scikit-learn's data set
        from flowdppo.tasks.digits.rewards import ClassifierReward

        if ctx.classifier is None:  # loaded once per context, shared by its rewards
            ctx.classifier = load_classifier().to(ctx.device)
        return ClassifierReward(ctx.classifier, log=log)

    return make


def _ink(model: str, ctx: RewardContext) -> Reward:
    from flowdppo.tasks.digits.rewards import InkReward

    return InkReward()


def _clip_score(model: str, ctx: RewardContext) -> Reward:
    return ClipScoreReward(ClipEmbedder.load("clip_score", model, ctx.device, ctx.dtype))


def _pickscore(model: str, ctx: RewardContext) -> Reward:
    clip = ClipEmbedder.load("pickscore", model, ctx.device, ctx.dtype, processor_fallback=PICKSCORE_PROCESSOR)
    return PickScoreReward(clip)


def _vlm(name: str) -> Factory:
    return lambda model, ctx: make_vlm_reward(name, model, ctx.device, ctx.dtype)


register_reward("classifier_prob", "digits", _classifier(log=False))
register_reward("classifier_logprob", "digits", _classifier(log=True))
register_reward("ink", "digits", _ink)
register_reward("jpeg_compressibility", "image", lambda model, ctx: JpegReward(incompressible=False))
register_reward("jpeg_incompressibility", "image", lambda model, ctx: JpegReward(incompressible=True))
register_reward("clip_score", "image", _clip_score, CLIP_L14)
register_reward("pickscore", "image", _pickscore, PICKSCORE_MODEL)
register_reward("aesthetic", "image", lambda model, ctx: load_aesthetic_reward(model, ctx.device, ctx.dtype), CLIP_L14)
register_reward("ocr", "image", lambda model, ctx: OcrReward.load(model, ctx.device, ctx.dtype), OCR_MODEL)
for _name in ("vlm_yes_prob", "vlm_yes_prob_default_question", "vlm_ocr"):
    register_reward(_name, "image", _vlm(_name), VLM_MODEL)
register_reward("hpsv2", "image", lambda model, ctx: make_hps_reward(model, ctx.device, ctx.dtype), HPS_HUB[0])
register_reward("temporal_consistency", "video", lambda model, ctx: TemporalConsistencyReward())


# Resolving a name


def reward_names(kinds: Sequence[str] = KINDS) -> list[str]:
    """The built-in rewards of ``kinds``, in registration order."""
    return [name for name, entry in REWARDS.items() if entry.kind in kinds]


def unknown_reward(name: str, kinds: Sequence[str], key: str) -> ConfigError:
    """One line: ``name`` is no reward of ``kinds``; the closest valid name, and every valid one."""
    base, valid = name.partition("@")[0].strip(), reward_names(kinds)
    entry = REWARDS.get(base)
    other = f" (it is {_a_kind(entry.kind)} reward)" if entry else ""
    close = did_you_mean(base, valid)
    if not close and not entry:  # the closest reward of another kind: a typo of it, on a task that does not take it
        found = difflib.get_close_matches(base, reward_names(), n=1)
        close = f" (did you mean {found[0]}? it is {_a_kind(REWARDS[found[0]].kind)} reward)" if found else ""
    at = " (name@model_path for a model reward)" if any(REWARDS[n].default_model for n in valid) else ""
    return ConfigError(
        f"{key}: unknown reward {shown(name)}{other}{close}; choose from "
        f"{', '.join(valid)}{at} or give your own as module:function"
    )


def _a_kind(kind: str) -> str:
    return f"a{'n' if kind[0] in 'aeiou' else ''} {kind}"


def reward_source(name: str, kinds: Sequence[str] = KINDS, key: str = "reward.names") -> str:
    """Where reward ``name`` comes from, read from the name alone: "remote" (``http://HOST:PORT``), "user"
    (``module:function``) or the kind of a built-in of ``kinds`` (``name`` or ``name@model_path``); else one
    line naming ``key``."""
    if is_remote(name):
        return "remote"
    entry = REWARDS.get(name.partition("@")[0].strip())
    if entry is not None and entry.kind in kinds:
        return entry.kind
    if ":" in name and "@" not in name:
        return "user"
    raise unknown_reward(name, kinds, key)


def make_reward(
    spec: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    classifier: Any = None,
    kinds: Sequence[str] = KINDS,
    key: str = "reward.names",
) -> Reward:
    """The built-in reward ``spec`` = ``name`` or ``name@path`` (a model reward's model: a local directory or a hub
    id; its default model without it), its model loaded once, on ``device`` in ``dtype``."""
    return build(spec, RewardContext(device, dtype, classifier), kinds, key)


def build(spec: str, context: RewardContext, kinds: Sequence[str] = KINDS, key: str = "reward.names") -> Reward:
    """``make_reward`` with a ``RewardContext`` (rewards built with one context share its classifier)."""
    name, at, path = spec.strip().partition("@")
    name, path = name.strip(), path.strip()
    entry = REWARDS.get(name)
    if entry is None or entry.kind not in kinds:
        raise unknown_reward(spec, kinds, key)
    if at and not entry.default_model:
        raise ConfigError(f"reward {name!r} has no model; drop '@{path}'")
    if at and not path:
        raise ConfigError(f"reward {name!r}: empty path after '@' (give a local directory or a hub id)")
    return entry.factory(path or entry.default_model, context)


def load_reward(
    name: str, kinds: Sequence[str], context: RewardContext, key: str = "reward.names"
) -> tuple[str, Reward]:
    """``(source, reward)`` of any reward name (``reward_source``): a reward server's, your own or a built-in."""
    source = reward_source(name, kinds, key)
    if source == "remote":
        return source, load_remote_reward(name)
    if source == "user":
        return source, load_user_reward(name)
    return source, build(name, context, kinds, key)


Wrap = Callable[[Reward, str, str], Reward]
"""``wrap(reward, source, logged_name)``: what a task scores with (e.g. an image reward on a video's frames)."""


def load_rewards(
    names: Sequence[str], kinds: Sequence[str], context: RewardContext, wrap: Wrap | None = None
) -> list[tuple[str, Reward]]:
    """``(name in logs, reward)`` of each of ``names`` (``load_reward``, then ``wrap``), for a task that takes
    rewards of ``kinds``. A remote reward's name is ``remote:NAME`` after the reward its server declares, not its
    address (which changes with the port); two names of one reward are an error."""
    rewards, seen = [], {}
    for name in names:
        entry = REWARDS.get(name.partition("@")[0].strip())
        if entry is not None and entry.default_model:
            status(f"loading the reward {name}")
        source, reward = load_reward(name, kinds, context)
        logged = reward.name if source == "remote" else name
        if logged in seen:
            raise ConfigError(
                f"reward.names: {redacted(seen[logged])!r} and {redacted(name)!r} are both the reward "
                f"{logged!r}; give each reward once"
            )
        seen[logged] = name
        rewards.append((logged, reward if wrap is None else wrap(reward, source, logged)))
    return rewards


__all__ = [
    "KINDS",
    "REWARDS",
    "RewardContext",
    "RewardEntry",
    "build",
    "load_reward",
    "load_rewards",
    "make_reward",
    "register_reward",
    "reward_names",
    "reward_source",
    "unknown_reward",
]
