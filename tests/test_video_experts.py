"""Wan 2.2 on tiny random-weight pipelines saved to disk and loaded like a user's model.

- T2V-A14B's two experts: the adapter's Euler sampling and decoding reproduce ``WanPipeline.__call__`` (CFG on, a
  distinct ``guidance_scale_2``), each expert running exactly the steps the pipeline gives it; a batch of mixed
  noise levels routes each sample to its expert; ``flowdppo train`` runs 2 epochs (first mini-batch check inside)
  with LoRA on both experts (or one); adapters-off is the base for each expert; the exported adapters load with
  ``WanPipeline.load_lora_weights`` (``load_into_transformer_2=True`` for the low-noise one) and give the trained
  velocity; 2 epochs equal 1 epoch + resume;
- TI2V-5B in text-to-video (per-token timesteps, 48-channel VAE): the adapter reproduces ``__call__``;
- gradient checkpointing changes neither the loss nor the gradients; VAE slicing and tiling reach the VAE.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from safetensors.torch import load_file
from tiny_video_pipelines import A14B_BOUNDARY, TI2V_FLOW_SHIFT, WAN_FLOW_SHIFT, save_tiny_wan_pipeline

from flowdppo.checkpoint import complete_checkpoints
from flowdppo.cli import main
from flowdppo.errors import ConfigError
from flowdppo.policies.lora import (
    adapters_disabled,
    load_trainable_state_dict,
    lora_file,
    make_trainable,
    reference_policy,
    save_lora_adapter,
    trainable_state_dict,
)
from flowdppo.policies.pipelines import load_pipeline_policy
from flowdppo.policies.video import VIDEO_FAMILIES, WanPolicy
from flowdppo.prompts import EmbeddingCache, make_batch
from flowdppo.rollout import sample

pytestmark = pytest.mark.usefixtures("one_thread")

HEIGHT, WIDTH, FRAMES = 32, 48, 5  # A14B latents (16, 2, 4, 6)
PROMPTS = ["a red cat", "two dogs on a beach", "a blue house", "a green apple", "a yellow car"]
NEGATIVE = "blurry, static"
HIGH, LOW = 0.95, 0.5  # noise levels on either side of the boundary 0.875


@pytest.fixture(scope="module")
def a14b_dir(tmp_path_factory) -> Path:
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("pipelines") / "a14b", layout="wan22_a14b")


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory) -> Path:
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("pipelines") / "ti2v", layout="wan22_ti2v")


def load_wan(model, height=HEIGHT, width=WIDTH, **kwargs) -> WanPolicy:
    return load_pipeline_policy(
        str(model),
        height,
        torch.float32,
        "cpu",
        families=VIDEO_FAMILIES,
        task="text_to_video",
        height=height,
        width=width,
        num_frames=FRAMES,
        **kwargs,
    )


def batch_of(policy, prompts):
    return make_batch([{"prompt": p} for p in prompts], 1, EmbeddingCache(policy.encode_prompts), policy.device)


def count_calls(*modules) -> list[int]:
    """Forward calls of each module, counted by hooks (the list is updated in place)."""
    counts = [0] * len(modules)
    for k, module in enumerate(modules):
        module.register_forward_hook(lambda *_, k=k: counts.__setitem__(k, counts[k] + 1))
    return counts


def test_two_experts_reproduce_the_pipeline_call_with_cfg(a14b_dir):
    """Euler over ``policy.sigmas`` (shift 3, 4 steps: 1, 0.857, 0.6, 0.003) with CFG 4 / 2 == ``WanPipeline(...)``;
    the high-noise expert runs step 0 only, the low-noise one steps 1-3, in both."""
    policy = load_wan(a14b_dir, negative_prompt=NEGATIVE, guidance_scale_2=2.0)
    assert list(policy.experts) == ["transformer", "transformer_2"] and policy.boundary_ratio == A14B_BOUNDARY
    policy.pipeline.scheduler = FlowMatchEulerDiscreteScheduler(shift=WAN_FLOW_SHIFT)
    prompts, steps, scale = PROMPTS[:2], 4, 4.0
    sigmas = policy.sigmas(steps)
    assert policy.low_noise(sigmas[:-1]).tolist() == [False, True, True, True]
    noise = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    calls = count_calls(policy.transformer, policy.transformer_2)
    velocity = lambda x, s, c: policy.velocity(x, s, c, guidance_scale=scale)  # noqa: E731
    ours = policy.decode(sample(velocity, batch_of(policy, prompts), noise, sigmas=sigmas))
    assert calls == [1, 3]  # one batched (CFG) call per step
    theirs = policy.pipeline(
        prompt=prompts,
        negative_prompt=[NEGATIVE] * 2,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=steps,
        guidance_scale=scale,
        guidance_scale_2=2.0,
        latents=noise,
        output_type="pt",
    ).frames
    assert calls == [1 + 2, 3 + 6]  # the pipeline: conditional and unconditional calls
    print(f"two experts vs WanPipeline.__call__: max abs diff {(ours - theirs).abs().max():.2e}")
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    same_scale = load_wan(a14b_dir, negative_prompt=NEGATIVE)  # guidance_scale_2 0: guidance_scale for both
    velocity = lambda x, s, c: same_scale.velocity(x, s, c, guidance_scale=scale)  # noqa: E731
    other = same_scale.decode(sample(velocity, batch_of(same_scale, prompts), noise, sigmas=sigmas))
    assert (other - ours).abs().max() > 1e-4  # guidance_scale_2 matters


def test_a_mixed_batch_goes_to_each_samples_expert(a14b_dir):
    """Samples at ``sigma`` 0.95 and 0.5 in one call == each alone through its expert (with CFG scales 3 / 1.5)."""
    policy = load_wan(a14b_dir, negative_prompt=NEGATIVE, guidance_scale_2=1.5)
    cond = batch_of(policy, PROMPTS[:3])
    x = torch.randn((3, *policy.latent_shape), generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([HIGH, LOW, HIGH])
    with torch.no_grad():
        mixed = policy.velocity(x, sigma, cond, guidance_scale=3.0)
        alone = [policy.velocity(x[i : i + 1], sigma[i : i + 1], cond[i : i + 1], guidance_scale=3.0) for i in range(3)]
        embeds = cond[1:2].embeddings()
        null = policy.null_embeddings()
        v_c = policy.expert_output(policy.transformer_2, x[1:2], sigma[1:2], embeds)
        v_u = policy.expert_output(policy.transformer_2, x[1:2], sigma[1:2], null)
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[1], v_u + 1.5 * (v_c - v_u), atol=1e-5, rtol=0)  # low noise: its own scale


def velocity_at(policy, sigma: float, prompts=PROMPTS[:2], seed: int = 1):
    x = torch.randn((len(prompts), *policy.latent_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return policy.velocity(x, torch.full((len(prompts),), sigma), batch_of(policy, prompts))


TRAIN = [
    "task=text_to_video",
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
    "sampler.guidance_scale_2=2.0",
    "reward.names=[temporal_consistency,user_video_rewards:brightness_and_length]",
    "reward.weights=[1, 1]",
    "sampler.num_steps=4",
    "sampler.window_mode=all",
    "sampler.rollout_batch_size=2",
    "checkpoint_every=1",
    "loss.beta=0.01",
]


def train_args(model, run, tmp_path, *extra):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    return ["train", "--out", str(run), "--no-progress", f"model={model}", f"prompts={prompts_file}", *TRAIN, *extra]


def test_train_both_experts_then_export_loads_into_both(a14b_dir, tmp_path, monkeypatch):
    """2 epochs with every step trained (both experts, beta KL to each expert's base); videos decoded
    ``rollout_batch_size`` (2) at a time; each expert's adapter-off velocity is the base's; the exported files
    loaded into a fresh pipeline (``load_into_transformer_2=True`` for the second) give each trained velocity."""
    decoded = []
    decode = WanPolicy.decode
    monkeypatch.setattr(WanPolicy, "decode", lambda self, z: decoded.append(len(z)) or decode(self, z))
    run = tmp_path / "run"
    assert main(train_args(a14b_dir, run, tmp_path)) == 0
    assert decoded and max(decoded) == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["trained_steps"] == [0, 1, 2, 3]
    assert (run / "samples.mp4").is_file()
    final = run / "final"
    assert sorted(p.name for p in final.glob("*.safetensors")) == [lora_file("transformer"), lora_file("transformer_2")]

    trained = load_wan(a14b_dir)
    make_trainable(trained, 8, 16.0)
    state = load_file(str(complete_checkpoints(run / "checkpoints")[-1] / "trainable.safetensors"))
    assert {k.split(".", 1)[0] for k in state} == {"transformer", "transformer_2"}
    load_trainable_state_dict(trained, state)
    base = load_wan(a14b_dir)
    for sigma in (HIGH, LOW):
        v_trained, v_base = velocity_at(trained, sigma), velocity_at(base, sigma)
        with adapters_disabled(trained):
            torch.testing.assert_close(velocity_at(trained, sigma), v_base, atol=0, rtol=0)
        assert (v_trained - v_base).abs().max() > 1e-6, sigma  # this expert's LoRA changed the policy

    for source in ([], ["--checkpoint"]):
        out = tmp_path / f"lora{len(source)}"
        assert main(["export", str(run), "--out", str(out), *source]) == 0
        fresh = WanPipeline.from_pretrained(str(a14b_dir))
        fresh.load_lora_weights(str(out), weight_name=lora_file("transformer"))
        fresh.load_lora_weights(str(out), weight_name=lora_file("transformer_2"), load_into_transformer_2=True)
        exported = WanPolicy(fresh, HEIGHT, height=HEIGHT, width=WIDTH, num_frames=FRAMES)
        for sigma in (HIGH, LOW):
            diff = (velocity_at(exported, sigma) - velocity_at(trained, sigma)).abs().max()
            print(f"export {source or 'final'} sigma {sigma}: max abs diff {diff:.2e}")
            torch.testing.assert_close(velocity_at(exported, sigma), velocity_at(trained, sigma), atol=1e-6, rtol=1e-5)

    assert main(["export", str(run), "--out", str(tmp_path / "comfy"), "--format", "comfyui"]) == 0
    comfy = {p.name: load_file(str(p)) for p in (tmp_path / "comfy").glob("*.safetensors")}
    assert sorted(comfy) == ["comfyui_lora.safetensors", "comfyui_lora_transformer_2.safetensors"]
    assert (tmp_path / "comfy" / "README.md").is_file()  # the model card beside them
    assert all(k.startswith("diffusion_model.blocks.") for weights in comfy.values() for k in weights)  # Wan names

    resumed = tmp_path / "resumed"  # 2 epochs == 1 epoch, then resumed for 1 more
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "epoch_000002")
    shutil.rmtree(resumed / "final")
    assert main(["train", "--resume", str(resumed), "--no-progress"]) == 0
    drop = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert drop(again) == drop(rows)


def test_lora_on_one_expert_and_full_fine_tuning_of_one(a14b_dir, tmp_path, capsys):
    """``optim.trained_experts=[transformer_2]``: only the low-noise expert gets an adapter (the high-noise
    velocity is the base's), exported as its file alone; full fine-tuning of one expert copies only it as the
    reference; an unknown expert and ``guidance_scale_2`` on a one-expert model are one line, exit 2."""
    policy = load_wan(a14b_dir)
    base = velocity_at(policy, HIGH), velocity_at(policy, LOW)
    make_trainable(policy, 4, 8.0, trained_experts=["transformer_2"])
    assert not getattr(policy.transformer, "peft_config", None) and policy.transformer_2.peft_config
    with torch.no_grad():
        for name, p in policy.transformer_2.named_parameters():
            if "lora_B" in name:
                p.normal_()
    torch.testing.assert_close(velocity_at(policy, HIGH), base[0], atol=0, rtol=0)
    assert (velocity_at(policy, LOW) - base[1]).abs().max() > 1e-4
    save_lora_adapter(policy, tmp_path / "one")
    assert [p.name for p in (tmp_path / "one").iterdir()] == [lora_file("transformer_2")]

    full = load_wan(a14b_dir)
    make_trainable(full, 0, 0.0, trained_experts=["transformer_2"])
    assert not any(p.requires_grad for p in full.transformer.parameters())
    reference = reference_policy(full)
    assert reference.transformer is full.transformer and reference.transformer_2 is not full.transformer_2
    state = trainable_state_dict(full)
    assert state and all(k.startswith("transformer_2.") for k in state)
    load_trainable_state_dict(full, state)
    with pytest.raises(ConfigError, match="optim.trained_experts: 'transformer_3' is not an expert"):
        make_trainable(load_wan(a14b_dir), 4, 8.0, trained_experts=["transformer_3"])

    wan21 = save_tiny_wan_pipeline(tmp_path / "wan21")
    for model, extra, message in (
        (a14b_dir, "optim.trained_experts=[transformer_3]", "optim.trained_experts: 'transformer_3' is not an"),
        (wan21, "sampler.guidance_scale_2=2.0", "sampler.guidance_scale_2: only for a two-expert Wan 2.2 model"),
    ):
        assert main(train_args(model, tmp_path / "bad", tmp_path, extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_ti2v_reproduces_the_pipeline_call_with_cfg(ti2v_dir):
    """TI2V-5B in text-to-video: per-token timesteps, 48-channel latents at 1/16 of the size, CFG 4 ==
    ``WanPipeline(...)`` with Euler (shift 5)."""
    height, width = 64, 96
    policy = load_wan(ti2v_dir, height, width, negative_prompt=NEGATIVE)
    assert policy.expand_timesteps and policy.latent_shape == (48, 2, 4, 6) and policy.tokens == 2 * 2 * 3
    policy.pipeline.scheduler = FlowMatchEulerDiscreteScheduler(shift=TI2V_FLOW_SHIFT)
    prompts, steps, scale = PROMPTS[:2], 3, 4.0
    noise = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    timesteps = []  # what each transformer call gets: one timestep per video token
    policy.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: timesteps.append(kwargs["timestep"]), with_kwargs=True
    )
    velocity = lambda x, s, c: policy.velocity(x, s, c, guidance_scale=scale)  # noqa: E731
    ours = policy.decode(sample(velocity, batch_of(policy, prompts), noise, sigmas=policy.sigmas(steps)))
    theirs = policy.pipeline(
        prompt=prompts,
        negative_prompt=[NEGATIVE] * 2,
        height=height,
        width=width,
        num_frames=FRAMES,
        num_inference_steps=steps,
        guidance_scale=scale,
        latents=noise,
        output_type="pt",
    ).frames
    assert [tuple(t.shape) for t in timesteps] == [(4, 12)] * steps + [(2, 12)] * (2 * steps)  # CFG batched / not
    for k in range(steps):
        torch.testing.assert_close(timesteps[k][:2], timesteps[steps + 2 * k])
    assert ours.shape == (2, FRAMES, 3, height, width)
    print(f"TI2V vs WanPipeline.__call__: max abs diff {(ours - theirs).abs().max():.2e}")
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    with pytest.raises(ConfigError, match="height: must be a positive multiple of 32"):
        load_wan(ti2v_dir, 48, width)


def test_gradient_checkpointing_keeps_loss_and_gradients(a14b_dir):
    """The same loss and LoRA gradients (both experts, one mixed batch) with and without checkpointing."""
    results = []
    for checkpointing in (False, True):
        policy = load_wan(a14b_dir)
        torch.manual_seed(0)
        make_trainable(policy, 4, 8.0)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
        if checkpointing:
            policy.enable_gradient_checkpointing()
            assert policy.transformer.gradient_checkpointing and policy.transformer_2.gradient_checkpointing
        x = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(3))
        loss = policy(x, torch.tensor([HIGH, LOW]), batch_of(policy, PROMPTS[:2])).square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
        assert all(g.abs().sum() > 0 for g in grads.values())
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-5, rtol=0)


def test_vae_slicing_and_tiling_reach_the_wan_vae(a14b_dir, monkeypatch):
    policy = load_wan(a14b_dir, vae_slicing=True, vae_tiling=True)
    assert policy.vae.use_slicing and policy.vae.use_tiling
    plain = load_wan(a14b_dir)
    latents = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(4))
    tiled = []
    tiled_decode = type(policy.vae).tiled_decode
    monkeypatch.setattr(
        type(policy.vae), "tiled_decode", lambda self, z, **k: tiled.append(z.shape[0]) or tiled_decode(self, z, **k)
    )
    policy.vae.tile_sample_min_height = policy.vae.tile_sample_min_width = 16  # tiles smaller than the video
    policy.vae.tile_sample_stride_height = policy.vae.tile_sample_stride_width = 8
    videos = policy.decode(latents)
    assert tiled == [1, 1]  # sliced: one video at a time, each in tiles
    assert videos.shape == plain.decode(latents).shape
    policy.vae.use_tiling = False  # slicing alone: the same videos
    torch.testing.assert_close(policy.decode(latents), plain.decode(latents), atol=1e-5, rtol=0)
