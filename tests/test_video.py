"""Text-to-video on a tiny random-weight Wan 2.1 pipeline saved to disk and loaded like a user's model.

- ``WanPolicy``'s Euler sampling over its schedule and its decoding reproduce ``WanPipeline.__call__`` (CFG on,
  negative prompt, non-square frames) with an Euler scheduler of the same shift; with Wan 2.1's shipped
  UniPC scheduler the adapter's levels are the pipeline's own;
- the SDE transition, log-probability and KL reduce over every non-batch dimension of 5-D latents;
- video rewards: image rewards on evenly spaced frames, temporal consistency;
- ``flowdppo train task=text_to_video`` runs 2 epochs (first mini-batch check inside), writes the frame strips and
  the GIF; adapters-off is the base; the exported LoRA loads with ``WanPipeline.load_lora_weights``;
- bad sizes, frame counts and task / pipeline mismatches: one line, exit 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from PIL import Image
from safetensors.torch import load_file
from tiny_video_pipelines import WAN_FLOW_SHIFT, save_tiny_wan_pipeline

from flowdppo.checkpoint import complete_checkpoints
from flowdppo.cli import main
from flowdppo.config import load_config
from flowdppo.policies.lora import adapters_disabled, load_trainable_state_dict, make_trainable
from flowdppo.policies.pipelines import load_pipeline_policy
from flowdppo.policies.video import VIDEO_FAMILIES, WanPolicy
from flowdppo.prompts import EmbeddingCache, make_batch
from flowdppo.rewards.image import JpegReward
from flowdppo.rewards.video import FrameReward, TemporalConsistencyReward, frame_indices
from flowdppo.rollout import sample
from flowdppo.sde import flow_sde_step, gaussian_kl, log_prob

pytestmark = pytest.mark.usefixtures("one_thread")

HEIGHT, WIDTH, FRAMES = 32, 48, 5  # latents (16, 2, 4, 6)
SIZE = {"height": HEIGHT, "width": WIDTH, "num_frames": FRAMES}
PROMPTS = ["a red cat", "two dogs on a beach", "a blue house", "a green apple", "a yellow car"]
NEGATIVE = "blurry, static"


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("pipelines") / "wan")


def load_wan(model, **kwargs) -> WanPolicy:
    return load_pipeline_policy(
        str(model), HEIGHT, torch.float32, "cpu", families=VIDEO_FAMILIES, task="text_to_video", **SIZE, **kwargs
    )


def batch_of(policy, prompts):
    return make_batch([{"prompt": p} for p in prompts], 1, EmbeddingCache(policy.encode_prompts), policy.device)


def test_wan_adapter_reproduces_the_pipeline_call_with_cfg(wan_dir):
    """Euler over ``policy.sigmas`` with CFG (negative prompt) then ``decode`` == ``WanPipeline(...)`` with
    ``FlowMatchEulerDiscreteScheduler(shift=3)``; videos ``(B, F, 3, H, W)``."""
    policy = load_wan(wan_dir, negative_prompt=NEGATIVE)
    assert type(policy) is WanPolicy and policy.latent_shape == (16, 2, 4, 6)
    policy.pipeline.scheduler = FlowMatchEulerDiscreteScheduler(shift=WAN_FLOW_SHIFT)
    prompts, steps, scale = PROMPTS[:2], 3, 4.0
    noise = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    velocity = lambda x, s, c: policy.velocity(x, s, c, guidance_scale=scale)  # noqa: E731
    ours = policy.decode(sample(velocity, batch_of(policy, prompts), noise, sigmas=policy.sigmas(steps)))
    theirs = policy.pipeline(
        prompt=prompts,
        negative_prompt=[NEGATIVE] * 2,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=steps,
        guidance_scale=scale,
        latents=noise,
        output_type="pt",
    ).frames
    assert ours.shape == (2, FRAMES, 3, HEIGHT, WIDTH)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the prompt matters
    plain = load_wan(wan_dir)
    plain.pipeline.scheduler = FlowMatchEulerDiscreteScheduler(shift=WAN_FLOW_SHIFT)
    unguided = lambda x, s, c: plain.velocity(x, s, c, guidance_scale=scale)  # noqa: E731
    without = plain.decode(sample(unguided, batch_of(plain, prompts), noise, sigmas=plain.sigmas(steps)))
    assert (without - ours).abs().max() > 1e-4  # the negative prompt matters


def test_wan_schedule_is_the_shipped_unipc_flow_schedule(wan_dir):
    policy = load_wan(wan_dir)
    ours = policy.sigmas(4)
    noise = torch.randn((1, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    policy.pipeline(
        prompt=PROMPTS[:1],
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=4,
        latents=noise,
        output_type="latent",
    )
    torch.testing.assert_close(ours, policy.pipeline.scheduler.sigmas.float(), atol=1e-6, rtol=0)
    base = torch.linspace(1, 1 / 1000, 5)[:-1]  # linspace(1, 1 / T, K + 1) without its last
    torch.testing.assert_close(ours[:-1], WAN_FLOW_SHIFT * base / (1 + (WAN_FLOW_SHIFT - 1) * base))  # shift 3
    assert ours[-1] == 0


def test_sde_log_prob_and_kl_reduce_over_every_dim_of_5d_latents():
    """Closed forms on ``(B, C, F, h, w)``: ``log p = -|z|^2 / 2 - n log std - n log(2 pi) / 2`` (sum) for
    ``x' = mean + std z``, ``KL = |mean_a - mean_b|^2 / (2 std^2)``; ``mean`` divides by ``n = C F h w``; the
    same as the 4-D layout with frames folded into channels."""
    gen = torch.Generator().manual_seed(0)
    x, v, v_b, z = (torch.randn((3, 4, 5, 2, 6), generator=gen) for _ in range(4))
    n = 4 * 5 * 2 * 6
    step = flow_sde_step(x, v, 0.6, 0.4, eta=0.7)
    other = flow_sde_step(x, v_b, 0.6, 0.4, eta=0.7)
    std = step.std.reshape(-1)[0]
    x_next = step.mean + step.std * z
    closed = -(z**2).sum(dim=(1, 2, 3, 4)) / 2 - n * torch.log(std) - n * math.log(2 * math.pi) / 2
    torch.testing.assert_close(log_prob(x_next, step.mean, step.std, reduce="sum"), closed)
    torch.testing.assert_close(log_prob(x_next, step.mean, step.std, reduce="mean"), closed / n)
    kl = ((step.mean - other.mean) ** 2).sum(dim=(1, 2, 3, 4)) / (2 * std**2)
    torch.testing.assert_close(gaussian_kl(step.mean, other.mean, step.std, reduce="sum"), kl)
    torch.testing.assert_close(gaussian_kl(step.mean, other.mean, step.std, reduce="mean"), kl / n)
    fold = lambda t: t.reshape(3, 20, 2, 6)  # noqa: E731
    flat = flow_sde_step(fold(x), fold(v), 0.6, 0.4, eta=0.7)
    torch.testing.assert_close(fold(step.mean), flat.mean)
    torch.testing.assert_close(log_prob(fold(x_next), flat.mean, flat.std), log_prob(x_next, step.mean, step.std))


def test_frame_rewards_and_temporal_consistency():
    assert frame_indices(81, 4) == [0, 27, 53, 80] and frame_indices(5, 0) == frame_indices(5, 9) == [0, 1, 2, 3, 4]
    videos = torch.rand((2, 5, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    jpeg = JpegReward(incompressible=True)
    per_frame = torch.stack([jpeg(videos[:, f], ["p"] * 2) for f in (0, 2, 4)], dim=1)
    torch.testing.assert_close(FrameReward(jpeg, "j", 3)(videos, ["a", "b"], [{}, {}]), per_frame.mean(1))
    torch.testing.assert_close(FrameReward(jpeg, "j", 3, "min")(videos, ["a", "b"]), per_frame.amin(1))
    consistency = TemporalConsistencyReward()
    still = videos[:, :1].expand(-1, 5, -1, -1, -1)
    torch.testing.assert_close(consistency(still, ["a", "b"]), torch.ones(2))
    noisy = consistency(videos, ["a", "b"])
    assert noisy.shape == (2,) and (noisy.abs() < 0.5).all()  # independent frames: about uncorrelated
    assert consistency(videos[:, :1], ["a", "b"]).tolist() == [1.0, 1.0]


def read_mp4(path: Path):
    """Every frame of an MP4, decoded with PyAV: ``(F, H, W, 3)`` uint8."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_sample_videos_are_mp4_else_gif(tmp_path, monkeypatch):
    """``write_video``: an MP4 that decodes back to the mosaic frames (lossy: close in mean), or, with no encoder,
    the GIF of the same frames."""
    from flowdppo.tasks import text_to_video

    videos = torch.rand((2, 2, FRAMES, 3, 1, 1), generator=torch.Generator().manual_seed(0))
    videos = videos.expand(-1, -1, -1, -1, HEIGHT, WIDTH).contiguous()  # flat colours: little coding loss
    frames = text_to_video.mosaic_frames(videos)
    assert frames.shape == (FRAMES, 2 * HEIGHT + 1, 2 * WIDTH + 1, 3) and frames.dtype.name == "uint8"
    assert text_to_video.write_video(tmp_path / "a", videos) == tmp_path / "a.mp4"
    decoded = read_mp4(tmp_path / "a.mp4")
    assert decoded.shape == (FRAMES, 2 * HEIGHT + 2, 2 * WIDTH + 2, 3)
    error = abs(decoded[:, : 2 * HEIGHT + 1, : 2 * WIDTH + 1].astype(float) - frames.astype(float))
    assert error.mean() < 8, error.mean()
    monkeypatch.setattr(text_to_video, "mp4_codec", lambda: None)  # no PyAV / no encoder
    assert text_to_video.write_video(tmp_path / "b", videos) == tmp_path / "b.gif"
    with Image.open(tmp_path / "b.gif") as gif:
        assert gif.n_frames == FRAMES and gif.size == (2 * WIDTH + 1, 2 * HEIGHT + 1)
    assert not (tmp_path / "b.mp4").exists()


def test_user_video_rewards_get_uint8_videos_and_frame_rewards_floats():
    """A user's callable sees ``round(255 x)`` as uint8 ``(B, F, 3, H, W)``; a built-in frame reward the floats."""
    from flowdppo.rewards.video import UserVideoReward

    videos = torch.rand((2, 3, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    seen = []
    reward = UserVideoReward(lambda v, p, m: seen.append(v) or v.float().mean(dim=(1, 2, 3, 4)), "mine")
    reward(videos, ["a", "b"], [{}, {}])
    assert seen[0].dtype == torch.uint8 and seen[0].shape == videos.shape
    assert torch.equal(seen[0], (videos * 255).round().to(torch.uint8))
    assert torch.equal(
        seen[0][0, 0, 0, 0, :2],
        torch.tensor([round(255 * float(v)) for v in videos[0, 0, 0, 0, :2]], dtype=torch.uint8),
    )
    frames = []
    FrameReward(lambda f, p, m: frames.append(f) or f.mean(dim=(1, 2, 3)), "f", 2)(videos, ["a", "b"])
    assert frames[0].dtype == torch.float32 and torch.equal(frames[0], videos[:, [0, 2]].flatten(0, 1))


def velocity_of(policy, prompts, seed: int = 1):
    x = torch.randn((len(prompts), *policy.latent_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return policy.velocity(x, torch.full((len(prompts),), 0.6), batch_of(policy, prompts))


def test_train_two_epochs_then_export_loads_in_a_fresh_wan_pipeline(wan_dir, tmp_path):
    model, run, prompts_file = str(wan_dir), tmp_path / "run", tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    code = main(
        [
            "train",
            "--out",
            str(run),
            "--no-progress",
            "task=text_to_video",
            f"model={model}",
            f"prompts={prompts_file}",
            "eval_prompts=2",
            f"height={HEIGHT}",
            f"width={WIDTH}",
            f"num_frames={FRAMES}",
            "epochs=2",
            "prompts_per_epoch=2",
            "group_size=2",
            "eval_samples_per_class=1",
            "optim.minibatch_size=4",
            "optim.lr=1e-2",
            "sampler.guidance_scale=3.0",
            "reward.names=[jpeg_incompressibility,temporal_consistency,user_video_rewards:brightness_and_length]",
            "reward.weights=[1, 1, 1]",
            "reward.video_frames=3",
            "sampler.num_steps=4",
            "sampler.window_range=[0,2]",
        ]
    )
    assert code == 0
    assert (run / "samples.png").is_file() and (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {
        "reward/temporal_consistency",
        "eval/jpeg_incompressibility",
        "eval/user_video_rewards:brightness_and_length",
    } <= rows[-1].keys()
    assert read_mp4(run / "samples.mp4").shape == (FRAMES, 2 * HEIGHT + 2, 2 * WIDTH + 2, 3)  # 2 prompts x (base |
    assert not (run / "samples.gif").exists()  # trained), every frame, padded to even sides

    trained = load_wan(model)
    make_trainable(trained, 8, 16.0)
    load_trainable_state_dict(
        trained, load_file(str(complete_checkpoints(run / "checkpoints")[-1] / "trainable.safetensors"))
    )
    base = load_wan(model)
    v_trained, v_base = velocity_of(trained, PROMPTS[:2]), velocity_of(base, PROMPTS[:2])
    with adapters_disabled(trained):
        torch.testing.assert_close(velocity_of(trained, PROMPTS[:2]), v_base, atol=0, rtol=0)
    assert (v_trained - v_base).abs().max() > 1e-6  # the LoRA changed the policy

    assert main(["export", str(run), "--out", str(tmp_path / "lora")]) == 0
    fresh = WanPipeline.from_pretrained(model)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    exported = WanPolicy(fresh, HEIGHT, **SIZE)
    torch.testing.assert_close(velocity_of(exported, PROMPTS[:2]), v_trained, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["num_frames=6"], "num_frames: must be 4k + 1"),
        (["width=40"], "width: must be a positive multiple of 16"),
        (["height=24"], "height: must be a positive multiple of 16"),
        (["reward.names=[sharpness]"], "unknown reward 'sharpness'"),
        (
            ["reward.names=[temporal_consistensy]"],
            "unknown reward 'temporal_consistensy' (did you mean temporal_consistency?)",
        ),
        # past the tiny model's rotary table (rope_max_seq_len 32): frames, rows, columns
        (
            ["num_frames=129"],
            "num_frames: at most 125 for this model (its position embedding covers 32 patches per "
            "axis: rope_max_seq_len 32), got 129",
        ),
        (["height=4096"], "height: at most 512 for this model"),
        (["width=1048576"], "width: at most 512 for this model"),
        (["optim.lora_rank=1000000000"], "optim.lora_rank: at most 24 for these layers"),
        (
            ["sampler.rollout_batch_size=1000000000", "height=512", "width=512", "num_frames=125", "group_size=100000"],
            "sampler.rollout_batch_size: a rollout call of 1,000,000 samples needs at least",
        ),
    ],
)
def test_bad_video_inputs_are_one_line(overrides, message, wan_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    code = main(
        [
            "train",
            "--out",
            str(tmp_path / "run"),
            "task=text_to_video",
            f"model={wan_dir}",
            f"prompts={tmp_path / 'prompts.txt'}",
            "eval_prompts=1",
            f"height={HEIGHT}",
            f"width={WIDTH}",
            f"num_frames={FRAMES}",
            "reward.names=[temporal_consistency]",
            *overrides,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_task_on_the_other_kind_of_pipeline_is_one_line(wan_dir, tmp_path, capsys):
    from tiny_pipelines import save_tiny_pipeline

    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    image_dir = save_tiny_pipeline("sd3", tmp_path / "sd3")
    for task, model, names, message in (
        ("text_to_video", image_dir, "temporal_consistency", "is a StableDiffusion3Pipeline; task=text_to_video"),
        ("text_to_image", wan_dir, "jpeg_incompressibility", "is a WanPipeline; task=text_to_image"),
    ):
        code = main(
            [
                "train",
                "--out",
                str(tmp_path / "run"),
                f"task={task}",
                f"model={model}",
                "resolution=32",
                f"prompts={tmp_path / 'prompts.txt'}",
                "eval_prompts=1",
                f"reward.names=[{names}]",
            ]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err


def test_config_sizes_reach_the_policy(wan_dir, tmp_path):
    from flowdppo.tasks import task_class

    (tmp_path / "prompts.txt").write_text("a cat\na dog\na cow\n")
    cfg = load_config(
        overrides=[
            "task=text_to_video",
            f"model={wan_dir}",
            f"prompts={tmp_path / 'prompts.txt'}",
            "eval_prompts=1",
            "resolution=32",
            "num_frames=9",
            "reward.names=[temporal_consistency]",
        ]
    )
    assert task_class(cfg).policy_class(cfg) is WanPolicy
    task = task_class(cfg)(cfg)
    assert task.latent_shape == (16, 3, 4, 4) and task.policy.shard_units() == list(task.policy.transformer.blocks)
