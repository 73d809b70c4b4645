"""Data-parallel runs compute what one process computes (CPU, gloo, 2 processes)."""

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import user_rewards
from safetensors.torch import load_file

from flowdppo.config import RewardConfig
from flowdppo.distributed import Distributed, shared_randn
from flowdppo.trainer import rewards_and_advantages

GROUPS, GROUP_SIZE = 4, 6
REWARDS = [("brightness", user_rewards.brightness), ("label", lambda images, prompts: prompts.float() / 9)]


def batch():
    """A global batch: images (N, 1, 8, 8), prompts (N,), group ids (N,)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(GROUPS * GROUP_SIZE, 1, 8, 8, generator=gen)
    prompts = torch.tensor([3, 1, 4, 1]).repeat_interleave(GROUP_SIZE)
    return images, prompts, torch.arange(GROUPS).repeat_interleave(GROUP_SIZE)


SETTINGS = [("sum", "batch"), ("sum", "group"), ("gdpo", "batch")]


def reward_config(aggregation: str, std_scope: str) -> RewardConfig:
    return RewardConfig(names=[n for n, _ in REWARDS], weights=[1.0, 0.5], aggregation=aggregation,
                        std_scope=std_scope)  # fmt: skip


def advantages_worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    dist = Distributed(rank, world_size)
    images, prompts, group_ids = batch()
    rows = dist.rows(len(images), "batch")
    result = {"noise": shared_randn(torch.Generator().manual_seed(1), len(images), rows, (1, 8, 8), "cpu")}
    for setting in SETTINGS:
        rewards, advantages = rewards_and_advantages(REWARDS, images[rows], prompts[rows], group_ids,
                                                     reward_config(*setting), dist)  # fmt: skip
        result.update({f"rewards.{setting}": rewards, f"advantages.{setting}": advantages})
    torch.save(result, f"{out}.{rank}")
    torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(advantages_worker, args=(2, str(tmp / "init"), str(tmp / "result")), nprocs=2)
    return [torch.load(f"{tmp / 'result'}.{rank}", weights_only=True) for rank in range(2)]


def test_shared_noise_is_the_single_process_noise_split_by_rows(two_process_results):
    noise = torch.randn((GROUPS * GROUP_SIZE, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.cat([p["noise"] for p in two_process_results]), noise, rtol=0, atol=0)


@pytest.mark.parametrize("setting", SETTINGS)
def test_gathered_rewards_and_advantages_equal_the_single_process_ones(two_process_results, setting):
    aggregation, std_scope = setting
    images, prompts, group_ids = batch()
    cfg = reward_config(*setting)
    rewards, advantages = rewards_and_advantages(REWARDS, images, prompts, group_ids, cfg, Distributed())
    for part in two_process_results:  # every process holds the whole batch's rewards and advantages
        torch.testing.assert_close(part[f"rewards.{setting}"], rewards, rtol=0, atol=0)
        torch.testing.assert_close(part[f"advantages.{setting}"], advantages, rtol=1e-6, atol=1e-6)
    # Each process's half on its own: batch statistics would differ (so gathering matters); per-group ones
    # would not, as a group never straddles processes.
    half = slice(0, len(images) // 2)
    _, local_only = rewards_and_advantages(REWARDS, images[half], prompts[half], group_ids[half], cfg, Distributed())
    same = torch.allclose(local_only, advantages[half], atol=1e-3)
    assert same == (aggregation == "sum" and std_scope == "group")


RUN = ["prompts_per_epoch=2", "group_size=4", "epochs=2", "eval_samples_per_class=2", "eval_every=2",
       "optim.minibatch_size=8", "optim.grad_accum=2"]  # fmt: skip
"""8 samples x 2 trained steps = 16 elements; 2 mini-batches of 8 accumulate into one optimizer step per
epoch on one process, 2 of 4 per process on two (DDP's no_sync on the first): the same mean gradient."""


def train_command(processes: int, out) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return [sys.executable, *(launcher if processes > 1 else []), "-m", "flowdppo", "train", "--no-progress",
            "--out", str(out), *RUN]  # fmt: skip


def test_two_process_run_equals_one_process_run(tmp_path):
    for processes in (1, 2):
        done = subprocess.run(train_command(processes, tmp_path / f"p{processes}"), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_file(str(tmp_path / f"p{n}" / "final" / "pytorch_lora_weights.safetensors")) for n in (1, 2))
    assert one.keys() == two.keys()
    assert any(float(v.abs().max()) > 0 for k, v in one.items() if "lora_B" in k)  # it trained
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    rows_one, rows_two = (
        [json.loads(line) for line in (tmp_path / f"p{n}" / "metrics.jsonl").read_text().splitlines()]
        for n in (1, 2)
    )
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        for key in ("reward_mean", "kl_to_base", "loss", "masked_fraction", "grad_norm"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-7), key  # loss ~1e-8: sum(A) = 0 at rho = 1
