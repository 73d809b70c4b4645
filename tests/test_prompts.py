"""Prompt files, the train / eval split, prompt batches and the embedding cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowdppo.cli import main
from flowdppo.config import load_config
from flowdppo.errors import ConfigError
from flowdppo.prompts import EmbeddingCache, load_prompts, make_batch, pad_stack, split_prompts


def test_txt_and_jsonl_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n")
    assert load_prompts(txt) == [{"prompt": "a cat"}, {"prompt": "a dog"}]
    jsonl = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": 'a sign saying "open"', "text": "open"}), json.dumps({"prompt": "x"})]
    jsonl.write_text("\n".join(lines))
    assert load_prompts(jsonl) == [{"prompt": 'a sign saying "open"', "text": "open"}, {"prompt": "x"}]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "no such file"),
        ("empty.txt", "\n\n", "holds no prompts"),
        ("bad.jsonl", "{not json}\n", "line 1 is not JSON"),
        ("noprompt.jsonl", '{"text": "a"}\n', "needs a string field 'prompt'"),
        ("p.csv", "a,b\n", "must be a .txt"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_prompts(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("", "holds no prompts"),
        ("folder", 'is a folder; give a prompt file: .txt (one prompt per line) or .jsonl (one {"prompt": ...} object'),
    ],
)
def test_missing_or_empty_prompt_file_is_one_line_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "prompts.txt"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    code = main(["train", "--out", str(tmp_path / "run"), "task=text_to_image", "model=x", f"prompts={path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err


def test_split_is_a_seeded_partition():
    records = [{"prompt": str(i)} for i in range(20)]
    train, held = split_prompts(records, 5, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted(r["prompt"] for r in train + held) == sorted(r["prompt"] for r in records)
    assert split_prompts(records, 5, seed=3) == (train, held)
    assert split_prompts(records, 5, seed=4)[1] != held
    with pytest.raises(ConfigError, match="leaves no training prompts"):
        split_prompts(records, 20, seed=0)


class CountingEncoder:
    """A text encoder whose sequence length is the prompt's length (as a model that trims padding)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.seen += prompts
        length = max(len(p) for p in prompts)
        embeds = torch.zeros(len(prompts), length, 2)
        for i, p in enumerate(prompts):
            embeds[i, : len(p)] = torch.tensor([[float(ord(c)), 1.0] for c in p])
        return {"embeds": embeds, "pooled": torch.tensor([[float(len(p))] for p in prompts])}


def test_cache_encodes_each_prompt_once_pads_and_spills_to_disk_over_its_budget(tmp_path):
    encoder = CountingEncoder()
    entry_mb = lambda p: (len(p) * 2 + 1) * 4 / 2**20  # noqa: E731  float32 embeds (len, 2) and pooled (1,)
    cache = EmbeddingCache(encoder, max_mb=entry_mb("abcd") + entry_mb("x") + entry_mb("yz"), spill_dir=tmp_path)
    table = cache.table(["ab", "abcd", "ab"])
    assert encoder.seen == ["ab", "abcd"]
    assert table["embeds"].shape == (3, 4, 2) and table["pooled"].squeeze(1).tolist() == [2.0, 4.0, 2.0]
    assert table["embeds"][0, 2:].abs().sum() == 0  # right-padded with zeros
    assert list(tmp_path.iterdir()) == []  # within budget: nothing on disk
    cache.table(["abcd", "x", "yz"])
    assert encoder.seen == ["ab", "abcd", "x", "yz"]  # only the new ones
    assert list(cache.entries) == ["abcd", "x", "yz"] and cache.spilled == {"ab"}  # least recently used on disk
    assert cache.bytes == sum(entry_mb(p) for p in cache.entries) * 2**20
    (spilled,) = cache.spill_dir.iterdir()
    assert spilled.suffix == ".safetensors"
    again = cache.table(["ab", "yz"])
    assert encoder.seen == ["ab", "abcd", "x", "yz"]  # read back from disk, not encoded again
    torch.testing.assert_close(again["embeds"][0, :2], table["embeds"][0, :2], rtol=0, atol=0)
    everything_on_disk = EmbeddingCache(CountingEncoder(), max_mb=0)
    torch.testing.assert_close(everything_on_disk.table(["ab", "abcd", "ab"]), table, rtol=0, atol=0)
    assert not everything_on_disk.entries and everything_on_disk.bytes == 0
    folder = everything_on_disk.spill_dir
    del everything_on_disk
    assert not folder.exists()  # the temporary folder goes with the cache
    torch.testing.assert_close(pad_stack([torch.ones(2), torch.ones(3)]), torch.tensor([[1.0, 1, 0], [1, 1, 1]]))


def test_batch_groups_index_and_metadata():
    records = [{"prompt": "ab", "text": "A"}, {"prompt": "cde"}]
    batch = make_batch(records, 3, EmbeddingCache(CountingEncoder()), "cpu")
    assert len(batch) == 6 and batch.text == ["ab"] * 3 + ["cde"] * 3
    assert batch.metadata[0] == {"text": "A"} and batch.metadata[5] == {}
    part = batch[torch.tensor([5, 0])]
    assert part.text == ["cde", "ab"] and part.metadata == [{}, {"text": "A"}]
    torch.testing.assert_close(part.embeddings()["pooled"], torch.tensor([[3.0], [2.0]]))
    assert batch[3:].text == ["cde"] * 3


RECIPES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_example_recipes_load_with_their_prompt_files(recipe):
    cfg = load_config(config_file=recipe)
    assert cfg.task in ("text_to_image", "text_to_video") and cfg.method == "flow_dppo" and cfg.optim.lora_rank == 32
    options = getattr(cfg, cfg.task)
    assert len(load_prompts(recipe.parents[1] / options.prompts)) > options.eval_prompts
