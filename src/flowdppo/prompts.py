"""Text prompts: prompt files, the train / eval split, and batches of prompts with cached embeddings.

A prompt file is ``.txt`` (one prompt per line, blank lines skipped) or ``.jsonl`` (one JSON object per
line with a ``prompt`` field; every other field is metadata handed to the rewards, e.g. the ``text`` an
OCR reward should read).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from flowdppo.errors import ConfigError, require_file

Record = dict  # {"prompt": str, **metadata}
PROMPT_FILE = 'a prompt file: .txt (one prompt per line) or .jsonl (one {"prompt": ...} object per line)'


def load_prompts(path: str | Path, option: str = "prompts") -> list[Record]:
    """Read a ``.txt`` or ``.jsonl`` prompt file into records ``{"prompt": ..., **metadata}``; a problem is one line
    naming ``option``."""
    path = require_file(path, option, PROMPT_FILE)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{option}: {path} is not UTF-8 text (byte {err.start})") from err
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if path.suffix == ".jsonl":
        records = []
        for n, line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{option}: {path} line {n} is not JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ConfigError(f"{option}: {path} line {n} needs a string field 'prompt'")
            records.append(record)
    elif path.suffix == ".txt":
        records = [{"prompt": line} for _, line in lines]
    else:
        raise ConfigError(f"{option}: {path} must be a .txt (one prompt per line) or .jsonl file")
    if not records:
        raise ConfigError(f"{option}: {path} holds no prompts")
    return records


def split_prompts(records: list[Record], eval_count: int, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded shuffle, then ``eval_count`` records for evaluation and the rest for training."""
    if not 0 <= eval_count < len(records):
        raise ConfigError(f"eval_prompts: {eval_count} leaves no training prompts out of {len(records)}")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [records[i] for i in order]
    return shuffled[eval_count:], shuffled[:eval_count]


@dataclass
class PromptBatch:
    """``B`` samples' prompts: text, metadata, and rows ``index`` (B,) of an embedding ``table``.

    The table holds each distinct prompt's embeddings once (``{name: (P, ...)}``); a sample's embeddings
    are ``table[name][index]``. Indexing a batch (a slice or a tensor of rows) selects samples.
    """

    text: list[str]
    metadata: list[dict]
    index: Tensor
    table: dict[str, Tensor]

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, rows: slice | Tensor) -> PromptBatch:
        keep = range(len(self))[rows] if isinstance(rows, slice) else rows.tolist()
        return PromptBatch([self.text[i] for i in keep], [self.metadata[i] for i in keep], self.index[rows], self.table)

    def embeddings(self) -> dict[str, Tensor]:
        """Per-sample embeddings ``{name: (B, ...)}``."""
        return {name: value[self.index] for name, value in self.table.items()}


class EmbeddingCache:
    """Prompt embeddings computed once per prompt and stacked into tables.

    ``encode(list of prompts) -> {name: (n, ...)}`` is the model's text encoding. Entries are kept on the
    CPU, at most ``max_mb`` megabytes of them; beyond that the least recently used are written to
    ``spill_dir`` (one safetensors file per prompt, a temporary folder removed with the cache unless
    given) and read back when asked for, so no prompt is encoded twice. Sequences of different lengths
    (a model that trims padding) are right-padded with zeros when stacked.
    """

    def __init__(
        self,
        encode: Callable[[list[str]], dict[str, Tensor]],
        max_mb: float = 4096.0,
        spill_dir: str | Path | None = None,
    ) -> None:
        self.encode, self.max_bytes = encode, max_mb * 2**20
        self.entries: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self.bytes = 0
        self._spill_root, self._tmp, self.spill_dir = spill_dir, None, None
        self.spilled: set[str] = set()

    def table(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{name: (len(prompts), ...)}`` for ``prompts`` (encoding only those never seen)."""
        self.encode_missing(prompts)
        wanted = {p: self.entries[p] if p in self.entries else self.read_spilled(p) for p in prompts}
        for prompt in wanted:
            if prompt in self.entries:
                self.entries.move_to_end(prompt)
        first = wanted[prompts[0]]
        table = {name: pad_stack([wanted[p][name] for p in prompts]) for name in first}
        self.spill_over_budget()
        return table

    def encode_missing(self, prompts: list[str], progress: bool = False) -> None:
        """Encode the prompts neither in memory nor on disk, one at a time: a prompt's embedding does not
        depend on the prompts encoded with it, so runs and resumed runs reproduce bit for bit."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.entries and p not in self.spilled]
        for prompt in tqdm(missing, desc="encoding prompts", unit="prompt", disable=not progress):
            entry = {name: value[0].cpu() for name, value in self.encode([prompt]).items()}
            self.entries[prompt] = entry
            self.bytes += entry_bytes(entry)
            self.spill_over_budget()

    def spill_over_budget(self) -> None:
        """Move least recently used entries to disk until the in-memory ones fit in ``max_mb``."""
        while self.bytes > self.max_bytes and self.entries:
            prompt, entry = self.entries.popitem(last=False)
            save_file({k: v.contiguous() for k, v in entry.items()}, self.spill_path(prompt))
            self.spilled.add(prompt)
            self.bytes -= entry_bytes(entry)

    def spill_path(self, prompt: str) -> Path:
        if self.spill_dir is None:
            if self._spill_root is not None:
                Path(self._spill_root).mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(prefix="flowdppo-prompts-", dir=self._spill_root)
            self.spill_dir = Path(self._tmp.name)
        return self.spill_dir / f"{hashlib.sha256(prompt.encode()).hexdigest()}.safetensors"

    def read_spilled(self, prompt: str) -> dict[str, Tensor]:
        return load_file(self.spill_path(prompt))


def entry_bytes(entry: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())


def pad_stack(tensors: list[Tensor]) -> Tensor:
    """Stack tensors whose first dim (sequence length) may differ, right-padding with zeros."""
    length = max(t.shape[0] for t in tensors)
    if all(t.shape[0] == length for t in tensors):
        return torch.stack(tensors)
    out = tensors[0].new_zeros((len(tensors), length, *tensors[0].shape[1:]))
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def make_batch(records: list[Record], group_size: int, cache: EmbeddingCache, device) -> PromptBatch:
    """``P`` records, each repeated ``group_size`` times (a group), as one batch of ``P * G`` samples."""
    prompts = [r["prompt"] for r in records]
    table = {name: value.to(device) for name, value in cache.table(prompts).items()}
    index = torch.arange(len(records), device=device).repeat_interleave(group_size)
    text = [p for p in prompts for _ in range(group_size)]
    metadata = [{k: v for k, v in r.items() if k != "prompt"} for r in records for _ in range(group_size)]
    return PromptBatch(text, metadata, index, table)
