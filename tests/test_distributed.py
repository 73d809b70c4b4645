"""Data-parallel runs compute what one process computes (CPU, gloo, 2 processes)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import user_rewards
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from flowdppo.distributed import Distributed, clip_grad_norm, gather_full_state, shared_randn
from flowdppo.policies.lora import make_trainable, trainable_parameters, trainable_state_dict
from flowdppo.rewards import RewardConfig
from flowdppo.tasks.digits import BASE_WEIGHTS_DIR
from flowdppo.tasks.digits.policy import DigitsPolicy
from flowdppo.trainer import rewards_and_advantages

GROUPS, GROUP_SIZE = 4, 6
REWARDS = [("brightness", user_rewards.brightness), ("label", lambda images, prompts, metadata: prompts.float() / 9)]


def batch():
    """A global batch: images (N, 1, 8, 8), prompts (N,), group ids (N,)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(GROUPS * GROUP_SIZE, 1, 8, 8, generator=gen)
    prompts = torch.tensor([3, 1, 4, 1]).repeat_interleave(GROUP_SIZE)
    return images, prompts, torch.arange(GROUPS).repeat_interleave(GROUP_SIZE)


SETTINGS = [("sum", "batch"), ("sum", "group"), ("gdpo", "batch")]


def reward_config(aggregation: str, std_scope: str) -> RewardConfig:
    return RewardConfig(names=[n for n, _ in REWARDS], weights=[1.0, 0.5], aggregation=aggregation, std_scope=std_scope)


def advantages_worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    dist = Distributed(rank, world_size)
    images, prompts, group_ids = batch()
    rows = dist.rows(len(images), "batch")
    result = {"noise": shared_randn(torch.Generator().manual_seed(1), len(images), rows, (1, 8, 8), "cpu")}
    for setting in SETTINGS:
        rewards, advantages = rewards_and_advantages(
            REWARDS, images[rows], prompts[rows], group_ids, reward_config(*setting), dist
        )
        result.update({f"rewards.{setting}": rewards, f"advantages.{setting}": advantages})
    torch.save(result, f"{out}.{rank}")
    torch_dist.barrier()  # neither process tears gloo down while the other still talks to it
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


def sgd_step(dist: Distributed) -> tuple[DigitsPolicy, torch.optim.Optimizer, torch.Tensor]:
    """One clipped SGD step (momentum) of a random policy's full fine-tuning on this process's rows of a
    batch of 8, sharded by FSDP on several processes; returns the policy, its optimizer and the grad norm."""
    torch.manual_seed(0)
    policy = DigitsPolicy.from_config()
    make_trainable(policy, 0, 0.0, ())
    x, sigma, labels = torch.randn(8, 1, 8, 8), torch.rand(8), torch.arange(8)
    model = dist.wrap(policy, fsdp=True)
    optimizer = torch.optim.SGD(trainable_parameters(policy), lr=0.1, momentum=0.9)
    rows = dist.rows(8, "batch")
    model(x[rows], sigma[rows], labels[rows]).square().mean().backward()
    norm = clip_grad_norm(trainable_parameters(policy), 0.5)
    optimizer.step()
    optimizer.step()  # momentum buffers = gradients: the optimizer state is not trivial
    return policy, optimizer, norm


def fsdp_worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    policy, optimizer, norm = sgd_step(Distributed(rank, world_size))
    local = sum(p.to_local().numel() for p in policy.parameters() if isinstance(p, DTensor))
    weights, optimizer_state = gather_full_state(policy, optimizer)
    result = {"local": local, "norm": norm, "weights": weights, "optimizer": optimizer_state.get("state", {})}
    torch.save(result, f"{out}.{rank}")
    torch_dist.barrier()  # neither process tears gloo down while the other still talks to it
    torch_dist.destroy_process_group()


def test_fsdp_shards_every_parameter_and_gathers_the_one_process_state(tmp_path):
    mp.spawn(fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "result")), nprocs=2)
    parts = [torch.load(f"{tmp_path / 'result'}.{rank}", weights_only=True) for rank in range(2)]
    policy, optimizer, norm = sgd_step(Distributed())  # one process, the whole batch
    transformer = sum(p.numel() for p in policy.transformer.parameters())
    assert parts[0]["local"] + parts[1]["local"] == transformer  # halves; the prompt tables stay whole
    assert abs(parts[0]["local"] - parts[1]["local"]) < 0.1 * parts[0]["local"]
    for part in parts:
        torch.testing.assert_close(part["norm"], norm)  # the global norm, on every process
    weights, optimizer_state = trainable_state_dict(policy), optimizer.state_dict()["state"]
    assert parts[1]["weights"] == {} and parts[1]["optimizer"] == {}  # gathered onto process 0 only
    assert parts[0]["weights"].keys() == weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(parts[0]["weights"][key], value, msg=key)
    assert parts[0]["optimizer"].keys() == optimizer_state.keys()  # keyed by parameter index
    for index, slots in optimizer_state.items():
        torch.testing.assert_close(parts[0]["optimizer"][index]["momentum_buffer"], slots["momentum_buffer"])


RUN = [
    "prompts_per_epoch=2",
    "group_size=4",
    "epochs=2",
    "eval_samples_per_class=2",
    "eval_every=2",
    "optim.minibatch_size=8",
    "optim.grad_accum=2",
]
"""8 samples x 2 trained steps = 16 elements; 2 mini-batches of 8 accumulate into one optimizer step per
epoch on one process, 2 of 4 per process on two (DDP's no_sync on the first): the same mean gradient."""


def flowdppo_train(processes: int, *args: str) -> None:
    """``flowdppo train --no-progress *args`` on ``processes`` processes (torchrun when more than one)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = [sys.executable, *(launcher if processes > 1 else []), "-m", "flowdppo", "train", "--no-progress", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_process_run_equals_one_process_run(tmp_path):
    for processes in (1, 2):
        flowdppo_train(processes, "--out", str(tmp_path / f"p{processes}"), *RUN)
    one, two = (load_file(str(tmp_path / f"p{n}" / "final" / "pytorch_lora_weights.safetensors")) for n in (1, 2))
    assert one.keys() == two.keys()
    assert any(float(v.abs().max()) > 0 for k, v in one.items() if "lora_B" in k)  # it trained
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    for r1, r2 in zip(metric_rows(tmp_path / "p1"), metric_rows(tmp_path / "p2"), strict=True):
        for key in ("reward_mean", "kl_to_base", "loss", "masked_fraction", "grad_norm"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-7), key  # loss ~1e-8: sum(A) = 0 at rho = 1


FSDP_RUN = [
    "prompts_per_epoch=2",
    "group_size=4",
    "epochs=2",
    "eval_samples_per_class=2",
    "eval_every=2",
    "optim.minibatch_size=8",
    "optim.grad_accum=2",
    "optim.lora_rank=0",
    "optim.fsdp=true",
    "loss.beta=0.01",
    "checkpoint_every=1",
]
"""Full fine-tuning with the KL penalty to the frozen reference, a checkpoint after each of the 2 epochs.
On one process ``optim.fsdp`` changes nothing, so both runs have one config and resume each other."""
TRANSFORMER = "final/transformer/diffusion_pytorch_model.safetensors"
WEIGHT_ATOL = 1e-5
"""Adam moves a weight by lr * m / (sqrt(v) + 1e-8): where the gradient is ~1e-9, the float rounding of
the gradient sum, which depends on how the batch is split, shows as up to ~5e-6 (DDP shows the same)."""


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> dict[int, Path]:
    """The run folders of the same full fine-tuning on one process and, sharded by FSDP, on two."""
    root = tmp_path_factory.mktemp("fsdp")
    for processes in (1, 2):
        flowdppo_train(processes, "--out", str(root / f"p{processes}"), *FSDP_RUN)
    return {n: root / f"p{n}" for n in (1, 2)}


def assert_same_tensors(file: str, expected: Path, actual: Path, atol: float) -> None:
    """The safetensors ``file`` of two run folders holds the same keys, and values within ``atol``."""
    want, got = load_file(str(expected / file)), load_file(str(actual / file))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0.0, atol=atol, msg=key)


def test_fsdp_two_process_run_equals_one_process_run(fsdp_runs):
    one, two = fsdp_runs[1], fsdp_runs[2]
    assert_same_tensors(TRANSFORMER, one, two, WEIGHT_ATOL)
    assert_same_tensors("final/prompt_embeddings.safetensors", one, two, 0.0)  # frozen
    base = load_file(str(BASE_WEIGHTS_DIR / "transformer" / "diffusion_pytorch_model.safetensors"))
    trained = load_file(str(two / TRANSFORMER))
    assert max(float((trained[k] - base[k]).abs().max()) for k in base) > 1e-3  # it trained
    # the checkpoint of an FSDP run is the one a single process writes (the full, gathered state)
    epoch_1 = Path("checkpoints/epoch_000001")
    assert_same_tensors(epoch_1 / "trainable.safetensors", one, two, WEIGHT_ATOL)
    assert_same_tensors(epoch_1 / "optimizer.safetensors", one, two, 1e-8)
    assert (two / epoch_1 / "optimizer.json").read_text() == (one / epoch_1 / "optimizer.json").read_text()
    for r1, r2 in zip(metric_rows(one), metric_rows(two), strict=True):
        assert r2.keys() == r1.keys()
        for key in {"reward_mean", "kl_to_base", "grad_norm", "ref_kl", "eval/accuracy", "eval/reward"} & r1.keys():
            assert r2[key] == pytest.approx(r1[key], rel=1e-5), key


def resume_from_epoch_1(run_dir: Path, processes: int, out: Path) -> Path:
    """A copy of ``run_dir`` cut back to its first checkpoint, resumed on ``processes`` processes."""
    shutil.copytree(run_dir, out)
    shutil.rmtree(out / "checkpoints" / "epoch_000002")
    shutil.rmtree(out / "final")
    flowdppo_train(processes, "--resume", str(out))
    return out


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


def test_fsdp_checkpoint_resumes_exactly(fsdp_runs, tmp_path):
    resumed = resume_from_epoch_1(fsdp_runs[2], 2, tmp_path / "resumed")
    assert_same_tensors(TRANSFORMER, fsdp_runs[2], resumed, 0.0)
    assert without_time(metric_rows(resumed)) == without_time(metric_rows(fsdp_runs[2]))


@pytest.mark.slow
@pytest.mark.parametrize("written_on,resumed_on", [(2, 1), (1, 2)])
def test_fsdp_checkpoint_resumes_on_another_number_of_processes(fsdp_runs, tmp_path, written_on, resumed_on):
    resumed = resume_from_epoch_1(fsdp_runs[written_on], resumed_on, tmp_path / "resumed")
    assert_same_tensors(TRANSFORMER, fsdp_runs[written_on], resumed, WEIGHT_ATOL)


def test_fsdp_on_a_diffusers_pipeline_equals_one_process(tmp_path):
    """FLUX.1 (double- and single-stream blocks sharded, the VAE left whole): 2 processes == 1 process.

    8 elements in 2 accumulated mini-batches: one optimizer step over the same elements on 1 or 2 processes.
    """
    from tiny_pipelines import save_tiny_pipeline

    model, prompts = save_tiny_pipeline("flux", tmp_path / "flux"), tmp_path / "prompts.txt"
    prompts.write_text("a red cat\ntwo dogs\na blue house\na green apple\n")
    args = [
        "task=text_to_image",
        f"model={model}",
        f"prompts={prompts}",
        "eval_prompts=1",
        "resolution=32",
        "epochs=1",
        "prompts_per_epoch=2",
        "group_size=2",
        "eval_samples_per_class=1",
        "optim.minibatch_size=4",
        "optim.grad_accum=2",
        "optim.lora_rank=0",
        "optim.fsdp=true",
        "optim.lr=1e-4",
        "reward.names=[jpeg_incompressibility]",
        "sampler.num_steps=4",
        "sampler.window_range=[0,2]",
    ]
    for processes in (1, 2):
        flowdppo_train(processes, "--out", str(tmp_path / f"p{processes}"), *args)
    assert_same_tensors(TRANSFORMER, tmp_path / "p1", tmp_path / "p2", WEIGHT_ATOL)
    vae = "final/vae/diffusion_pytorch_model.safetensors"
    assert_same_tensors(vae, model.parent / "p1", model.parent / "p2", 0.0)


def test_fsdp_on_wan_two_processes_equal_one(tmp_path):
    """Wan 2.1 (text_to_video), full fine-tuning sharded per block as the policy names them (``shard_units``:
    its ``blocks``, checked in test_video.py): 2 processes == 1 process."""
    from tiny_video_pipelines import save_tiny_wan_pipeline

    model, prompts = save_tiny_wan_pipeline(tmp_path / "wan"), tmp_path / "prompts.txt"
    prompts.write_text("a red cat walking\ntwo dogs running\na blue house\na green apple rolling\n")
    args = [
        "task=text_to_video",
        f"model={model}",
        f"prompts={prompts}",
        "eval_prompts=1",
        "height=32",
        "width=32",
        "num_frames=5",
        "epochs=1",
        "prompts_per_epoch=2",
        "group_size=2",
        "eval_samples_per_class=1",
        "optim.minibatch_size=4",
        "optim.grad_accum=2",
        "optim.lora_rank=0",
        "optim.fsdp=true",
        "optim.lr=1e-4",
        "reward.names=[temporal_consistency]",
        "sampler.num_steps=4",
        "sampler.window_range=[0,2]",
    ]
    for processes in (1, 2):
        flowdppo_train(processes, "--out", str(tmp_path / f"p{processes}"), *args)
    assert_same_tensors(TRANSFORMER, tmp_path / "p1", tmp_path / "p2", WEIGHT_ATOL)
