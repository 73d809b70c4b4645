"""Where ``flowdppo plan`` reads a recipe's architecture from, with no weights and, for the example recipes, no
network.

``plan_model(model)`` resolves ``model=`` to a folder of configs, in this order:

1. a local folder (a pipeline saved with ``save_pretrained``, or a hub snapshot): as it is;
2. a hub id whose architecture ships with flowdppo (``plan_configs/<org>--<name>/``: ``model_index.json``, each
   model's ``config.json``, the scheduler's config, the public values of the hub's files; no weights): that folder;
3. a hub id in the local Hugging Face cache (its ``model_index.json`` cached): the cached snapshot;
4. any other hub id: the id itself, read from the hub, once the hub answers within ``HUB_TIMEOUT_S`` seconds;
   ``HF_HUB_OFFLINE`` set, or no answer, is one line at once (no retries) that names the cause and asks for a folder.

A shipped folder holds no tokenizer files: each ``tokenizer*/`` holds ``plan_tokenizer.json`` (the model's text length
and special tokens), from which ``stand_in_tokenizer`` builds a word-level tokenizer: one token per word, punctuation
mark or line break, padded and cut as the pipeline asks. The text encoders' input lengths are exact where the pipeline
pads to a fixed length (SD3, FLUX.1, Wan: CLIP 77, T5 256 / 512 tokens); Qwen-Image's prompts are as long as their
tokens, counted here by words (a BPE tokenizer gives about as many, or a few more, for English text).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from flowdppo.errors import ConfigError, shown

SHIPPED = Path(__file__).parent / "plan_configs"
TOKENIZER_SPEC = "plan_tokenizer.json"
HUB_TIMEOUT_S = 3.0
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WORDS = r"\w+|[^\w\s]|\n"  # the stand-in tokenizer's tokens: a word, a punctuation mark, a line break


def shipped_models() -> dict[str, Path]:
    """Hub id -> the folder of its shipped architecture configs."""
    return {p.name.replace("--", "/", 1): p for p in sorted(SHIPPED.iterdir()) if (p / "model_index.json").is_file()}


def is_shipped(source: str) -> bool:
    return Path(source).parent == SHIPPED


def plan_model(model: str) -> str:
    """The folder (or, with the hub online, the id) ``plan`` reads ``model``'s configs from (see the module)."""
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser())
    shipped = shipped_models()
    if model in shipped:
        return str(shipped[model])
    if not HUB_ID.fullmatch(model):
        raise ConfigError(f"model: no such folder {shown(model)}; give a diffusers pipeline folder or a hub id")
    cached = cached_snapshot(model)
    if cached:
        return cached
    problem = hub_problem()
    if problem:
        raise ConfigError(
            f"model: {model} is neither a local folder nor in the Hugging Face cache, and {problem}; plan ships the "
            f"architectures of {', '.join(shipped)}: for another model give a local pipeline folder (model=PATH; "
            "its *.json and tokenizer files are enough, no weights)"
        )
    return model


def cached_snapshot(model: str) -> str:
    """The snapshot folder of ``model`` in the Hugging Face cache when its ``model_index.json`` is there, else ""."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model, "model_index.json")
    except ValueError:  # not a valid repo id for the hub
        return ""
    return str(Path(found).parent) if isinstance(found, str) else ""


def hub_problem() -> str:
    """Why the hub cannot be read now ("" if it answers an HTTP request within ``HUB_TIMEOUT_S`` seconds)."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set (no network access to the hub)"
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_TIMEOUT_S)
    except Exception as err:  # any failure of the request (no route, no DNS, a timeout, a proxy refusing it)
        return f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached ({type(err).__name__}: no network?)"
    return ""


def stand_in_tokenizer(folder: Path):
    """A word-level tokenizer from ``folder/plan_tokenizer.json``: ``model_max_length``, the special tokens
    (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``, ``added_tokens``) and the ``template`` that adds
    them around a text (``$A``); every word is the unknown token (only the lengths matter on the meta device)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((Path(folder) / TOKENIZER_SPEC).read_text())
    roles = {k: spec[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in spec}
    specials = list(dict.fromkeys([*roles.values(), *spec.get("added_tokens", [])]))
    vocab = {token: i for i, token in enumerate(specials)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=spec["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"[ \t]+"), "removed"), pre_tokenizers.Split(Regex(WORDS), "isolated")]
    )
    if "template" in spec:
        used = [(t, vocab[t]) for t in specials if t in spec["template"].split()]
        backend.post_processor = processors.TemplateProcessing(single=spec["template"], special_tokens=used)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=spec["model_max_length"], **roles)
    tokenizer.add_special_tokens({"additional_special_tokens": spec.get("added_tokens", [])})
    return tokenizer
