"""The diffusers policy adapters on tiny random-weight pipelines saved to disk and loaded like a user's model.

- the adapters' velocity, schedule and decoding reproduce each pipeline's own denoising loop;
- ``flowdppo train`` runs 2 epochs on each family (its first mini-batch check, rho == 1 and D == 0
  before any update, runs inside); the LoRA moves the velocity, adapters-off is the base model, and the
  exported adapter loads with ``pipeline.load_lora_weights`` into a fresh pipeline and gives the trained
  velocity.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from tiny_pipelines import FAMILIES, save_tiny_pipeline

from flowdppo.checkpoint import complete_checkpoints
from flowdppo.cli import main
from flowdppo.policies.lora import adapters_disabled, load_trainable_state_dict, make_trainable
from flowdppo.policies.pipelines import FAMILIES as ADAPTERS
from flowdppo.policies.pipelines import load_pipeline_policy
from flowdppo.prompts import EmbeddingCache, make_batch
from flowdppo.rollout import sample

pytestmark = pytest.mark.usefixtures("one_thread")

RESOLUTION = 32
PROMPTS = ["a red 'cat'", "two dogs on a beach", 'a "STOP" sign', "a blue house", "a green apple", "a yellow car"]
# guidance: SD3 and FLUX.2-klein run real CFG with the empty negative prompt, Qwen-Image its true CFG with the
# per-token norm rescale; FLUX.1 its guidance embedding (3.5 both sides)
PIPELINE_GUIDANCE = {
    "sd3": {"guidance_scale": 3.0},
    "flux": {"guidance_scale": 3.5},
    "flux2_klein": {"guidance_scale": 4.0},
    "qwen_image": {"true_cfg_scale": 4.0, "negative_prompt": ["", ""]},
}
POLICY_GUIDANCE = {"sd3": 3.0, "flux": 1.0, "flux2_klein": 4.0, "qwen_image": 4.0}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {family: save_tiny_pipeline(family, root / family) for family in FAMILIES}


def batch_of(policy, prompts: list[str]):
    return make_batch([{"prompt": p} for p in prompts], 1, EmbeddingCache(policy.encode_prompts), policy.device)


def pipeline_latents(family: str, noise: torch.Tensor, policy) -> torch.Tensor:
    """Our latent layout -> the ``latents=`` a pipeline takes (FLUX.2-klein wants its 4-D patchified grid)."""
    if family != "flux2_klein":
        return noise
    half = policy.latent_size // 2
    return noise.transpose(1, 2).reshape(noise.shape[0], -1, half, half)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_reproduces_the_pipeline_denoising_loop(family, model_dirs):
    """Euler over ``policy.sigmas`` with ``policy.velocity``, then ``policy.decode`` == ``pipeline(...)``."""
    policy = load_pipeline_policy(str(model_dirs[family]), RESOLUTION, torch.float32, "cpu")
    assert type(policy) is ADAPTERS[type(policy.pipeline).__name__]
    prompts, steps = PROMPTS[:2], 3
    noise = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    velocity = lambda x, s, c: policy.velocity(x, s, c, guidance_scale=POLICY_GUIDANCE[family])  # noqa: E731
    ours = policy.decode(sample(velocity, batch_of(policy, prompts), noise, sigmas=policy.sigmas(steps)))
    theirs = policy.pipeline(
        prompt=prompts,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=steps,
        output_type="pt",
        latents=pipeline_latents(family, noise, policy),
        **PIPELINE_GUIDANCE[family],
    ).images
    assert ours.shape == (2, 3, RESOLUTION, RESOLUTION)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the prompt matters


NEGATIVE = "blurry, low quality"


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_prompt_guidance_matches_the_pipeline_call(family, model_dirs):
    """CFG > 1 with a negative prompt (FLUX.1: its true CFG) == ``pipeline(negative_prompt=...)``."""
    scale = {"sd3": 3.0, "flux": 2.0, "flux2_klein": 4.0, "qwen_image": 4.0}[family]
    policy = load_pipeline_policy(str(model_dirs[family]), RESOLUTION, torch.float32, "cpu", negative_prompt=NEGATIVE)
    prompts, steps = PROMPTS[:2], 3
    noise = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    velocity = lambda x, s, c: policy.velocity(x, s, c, guidance_scale=scale)  # noqa: E731
    ours = policy.decode(sample(velocity, batch_of(policy, prompts), noise, sigmas=policy.sigmas(steps)))
    if family == "flux2_klein":  # its __call__ takes negative embeddings only
        negative = {"guidance_scale": scale, "negative_prompt_embeds": policy.pipeline.encode_prompt(NEGATIVE)[0]}
    else:
        negative = {
            "true_cfg_scale" if family in ("flux", "qwen_image") else "guidance_scale": scale,
            "negative_prompt": [NEGATIVE] * 2,
        }
    theirs = policy.pipeline(
        prompt=prompts,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=steps,
        output_type="pt",
        latents=pipeline_latents(family, noise, policy),
        **negative,
    ).images
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    empty = load_pipeline_policy(str(model_dirs[family]), RESOLUTION, torch.float32, "cpu")
    plain = lambda x, s, c: empty.velocity(x, s, c, guidance_scale=scale)  # noqa: E731
    without = empty.decode(sample(plain, batch_of(empty, prompts), noise, sigmas=empty.sigmas(steps)))
    assert (without - ours).abs().max() > 1e-4  # the negative prompt matters


def test_qwen_rescale_matters_and_distilled_klein_runs_no_guidance(model_dirs):
    """Without Qwen-Image's per-token rescale the CFG result is off; a distilled klein ignores w > 1."""
    from flowdppo.policies.pipelines import PipelinePolicy

    qwen = load_pipeline_policy(str(model_dirs["qwen_image"]), RESOLUTION, torch.float32, "cpu")
    x = torch.randn((2, *qwen.latent_shape), generator=torch.Generator().manual_seed(0))
    cond, sigma = batch_of(qwen, PROMPTS[:2]), torch.full((2,), 0.7)
    with torch.no_grad():
        v_c, v_u = (
            qwen.velocity(x, sigma, cond),
            qwen.transformer_output(
                x, sigma, {k: t.expand(2, *t.shape[1:]) for k, t in qwen.null_embeddings().items()}
            ).float(),
        )
        plain = PipelinePolicy.guided(qwen, v_c, v_u, 4.0)
        rescaled = qwen.velocity(x, sigma, cond, guidance_scale=4.0)
    torch.testing.assert_close(rescaled.norm(dim=-1), v_c.norm(dim=-1))
    assert (plain - rescaled).abs().max() > 1e-3
    klein = load_pipeline_policy(str(model_dirs["flux2_klein"]), RESOLUTION, torch.float32, "cpu")
    klein.pipeline.register_to_config(is_distilled=True)
    cond, x = batch_of(klein, PROMPTS[:2]), torch.randn((2, *klein.latent_shape))
    with torch.no_grad():
        assert torch.equal(klein.velocity(x, sigma, cond, guidance_scale=4.0), klein.velocity(x, sigma, cond))
    assert klein.guides(4.0) is False and qwen.guides(0.5) is False and qwen.guides(1.5) is True


def velocity_of(policy, prompts: list[str], seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((len(prompts), *policy.latent_shape), generator=gen)
    with torch.no_grad():
        return policy.velocity(x, torch.full((len(prompts),), 0.6), batch_of(policy, prompts))


@pytest.mark.parametrize("family", FAMILIES)
def test_train_two_epochs_then_export_loads_in_a_fresh_pipeline(family, model_dirs, tmp_path, capsys):
    model, run, prompts_file = str(model_dirs[family]), tmp_path / "run", tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    code = main(
        [
            "train",
            "--out",
            str(run),
            "--no-progress",
            "task=text_to_image",
            f"model={model}",
            f"prompts={prompts_file}",
            "eval_prompts=2",
            f"resolution={RESOLUTION}",
            "epochs=2",
            "prompts_per_epoch=2",
            "group_size=2",
            "eval_samples_per_class=1",
            "optim.minibatch_size=4",
            "optim.lr=1e-2",
            "reward.names=[jpeg_incompressibility, user_rewards:prompt_length]",
            "reward.weights=[1, 1]",
            "sampler.num_steps=4",
            "sampler.window_range=[0,2]",
        ]
    )
    assert code == 0
    assert (run / "samples.png").is_file() and (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"reward/user_rewards:prompt_length", "eval/jpeg_incompressibility"} <= rows[-1].keys()
    assert main(["eval", str(run), "--per-class", "1"]) == 0
    assert "eval/user_rewards:prompt_length" in capsys.readouterr().out

    # the trained weights, loaded through peft from the last checkpoint (not the export)
    trained = load_pipeline_policy(model, RESOLUTION, torch.float32, "cpu")
    make_trainable(trained, 8, 16.0)  # the preset the run used: every block, both streams
    load_trainable_state_dict(
        trained, load_file(str(complete_checkpoints(run / "checkpoints")[-1] / "trainable.safetensors"))
    )
    base = load_pipeline_policy(model, RESOLUTION, torch.float32, "cpu")
    v_trained, v_base = velocity_of(trained, PROMPTS[:2]), velocity_of(base, PROMPTS[:2])
    with adapters_disabled(trained):
        torch.testing.assert_close(velocity_of(trained, PROMPTS[:2]), v_base, atol=0, rtol=0)
    assert (v_trained - v_base).abs().max() > 1e-6  # the LoRA changed the policy

    for source in ([], ["--checkpoint", "--overwrite"]):  # final/ and the newest checkpoint hold the same weights
        assert main(["export", str(run), "--out", str(tmp_path / "lora"), *source]) == 0
        fresh = DiffusionPipeline.from_pretrained(model)
        fresh.load_lora_weights(str(tmp_path / "lora"))
        exported = ADAPTERS[type(fresh).__name__](fresh, RESOLUTION)
        torch.testing.assert_close(velocity_of(exported, PROMPTS[:2]), v_trained, atol=1e-6, rtol=1e-5)


def test_not_a_pipeline_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    code = main(
        [
            "train",
            "--out",
            str(tmp_path / "run"),
            "task=text_to_image",
            f"model={tmp_path}",
            f"prompts={tmp_path / 'prompts.txt'}",
            "eval_prompts=1",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is not a diffusers pipeline" in err


def test_bfloat16_base_keeps_float32_lora_logprobs_and_rho_one(model_dirs):
    """A bf16 base trains float32 LoRA weights; D and log-probs are float32; replay == rollout before an update."""
    from flowdppo.algorithms.base import index_cond
    from flowdppo.algorithms.policy_gradient import PolicyGradient, replay_step
    from flowdppo.config import load_config
    from flowdppo.distributed import Distributed
    from flowdppo.rollout import rollout

    policy = load_pipeline_policy(str(model_dirs["sd3"]), RESOLUTION, torch.bfloat16, "cpu")
    make_trainable(policy, 4, 8.0, policy.lora_target_modules)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert policy.transformer.pos_embed.proj.weight.dtype == torch.bfloat16
    cfg = load_config(overrides=["sampler.num_steps=4", "sampler.window_range=[0,2]"])
    sigmas, cond = policy.sigmas(4), batch_of(policy, PROMPTS[:4])
    noise = torch.randn((4, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    traj = rollout(
        policy.velocity, cond, noise, sigmas, cfg.sampler, [1, 2], generator=torch.Generator().manual_seed(1)
    )
    assert traj.log_probs.dtype == traj.means.dtype == torch.float32
    elements = PolicyGradient(cfg).elements(traj, torch.zeros(4), policy, torch.Generator(), Distributed()).data
    _, logp = replay_step(policy.velocity, elements, index_cond(cond, elements["sample"]), cfg, sigmas[1])
    assert logp.dtype == torch.float32
    assert (logp - elements["log_probs"]).abs().max() < cfg.consistency_tolerance


def test_qwen_prompts_are_cut_at_512_tokens_as_the_pipeline_call_does(model_dirs):
    qwen = load_pipeline_policy(str(model_dirs["qwen_image"]), RESOLUTION, torch.float32, "cpu")
    embeds = qwen.encode_prompts(["a long prompt " * 300])
    assert embeds["prompt_embeds"].shape[1] == embeds["prompt_embeds_mask"].shape[1] == 512


def test_offloaded_or_freed_text_encoders_keep_rollouts_bitwise(model_dirs, tmp_path):
    """text_encoders keep / offload / free (and a prompt cache spilled to disk) give identical rollouts; a
    freed pipeline still saves whole (its text encoders read again from the source)."""
    from flowdppo.config import load_config
    from flowdppo.tasks.text_to_image import TextToImageTask

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    common = [
        "task=text_to_image",
        f"model={model_dirs['sd3']}",
        f"prompts={prompts_file}",
        "eval_prompts=2",
        f"resolution={RESOLUTION}",
        "sampler.num_steps=4",
        "sampler.window_range=[0,2]",
        "sampler.guidance_scale=3.0",
        "reward.names=[jpeg_incompressibility]",
        f"negative_prompt={NEGATIVE}",
    ]
    finals = {}
    for placement, cache_mb in (("keep", 4096), ("offload", 4096), ("free", 4096), ("free", 0)):
        task = TextToImageTask(
            load_config(overrides=[*common, f"text_encoders={placement}", f"prompt_cache_mb={cache_mb}"])
        )
        cond, _ = task.prompts(3, 2, seed=0, epoch=1)
        noise = torch.randn((len(cond), *task.latent_shape), generator=torch.Generator().manual_seed(0))
        velocity = partial(task.policy.velocity, guidance_scale=3.0)
        finals[placement, cache_mb] = sample(velocity, cond, noise, sigmas=task.sigmas())
        encoders = [task.policy.pipeline.text_encoder, task.policy.pipeline.text_encoder_3]
        if placement == "free":
            assert encoders == [None, None]
            assert task.policy.freed == ["text_encoder", "text_encoder_2", "text_encoder_3"]
            assert bool(task.cache.spilled) == (cache_mb == 0)
            with pytest.raises(RuntimeError, match="text_encoders=free"):
                task.policy.encode_prompts(["a prompt never seen"])
        else:
            assert all(e.device.type == "cpu" for e in encoders)
    reference = finals["keep", 4096]
    for key, final in finals.items():
        assert torch.equal(final, reference), key
    task.policy.save_pretrained(tmp_path / "saved")
    saved = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert saved.text_encoder is not None and saved.text_encoder_3 is not None


def test_attention_backend_and_vae_tiling_reach_the_model(model_dirs, tmp_path, capsys):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry.get_active_backend()[0]
    try:
        math = load_pipeline_policy(
            str(model_dirs["flux"]), RESOLUTION, torch.float32, "cpu", attention_backend="_native_math", vae_tiling=True
        )
        processors = [m.processor for m in math.transformer.modules() if hasattr(m, "processor")]
        assert processors and {p._attention_backend.value for p in processors} == {"_native_math"}
        assert math.vae.use_tiling
    finally:
        _AttentionBackendRegistry.set_active_backend(active)
    default = load_pipeline_policy(str(model_dirs["flux"]), RESOLUTION, torch.float32, "cpu")
    torch.testing.assert_close(velocity_of(math, PROMPTS[:2]), velocity_of(default, PROMPTS[:2]), atol=1e-5, rtol=1e-5)
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    capsys.readouterr()
    code = main(
        [
            "train",
            "--out",
            str(tmp_path / "run"),
            "task=text_to_image",
            f"model={model_dirs['flux']}",
            f"prompts={tmp_path / 'prompts.txt'}",
            "eval_prompts=1",
            f"resolution={RESOLUTION}",
            "reward.names=[jpeg_incompressibility]",
            "attention_backend=fastest",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "error: attention_backend:" in err[0] and "native" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", ["flux", "flux2_klein"])
def test_a_scheduler_with_its_own_flow_sigmas_keeps_them_as_the_pipeline_does(family, model_dirs):
    from diffusers import UniPCMultistepScheduler

    policy = load_pipeline_policy(str(model_dirs[family]), RESOLUTION, torch.float32, "cpu")
    policy.pipeline.scheduler = UniPCMultistepScheduler(
        use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
    )
    ours = policy.sigmas(4)
    noise = torch.randn((1, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    policy.pipeline(
        prompt=PROMPTS[:1],
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=4,
        latents=pipeline_latents(family, noise, policy),
        output_type="latent",
    )
    torch.testing.assert_close(ours, policy.pipeline.scheduler.sigmas.float(), atol=1e-6, rtol=0)
    assert (ours[:-1] - torch.linspace(1, 0.25, 4)).abs().max() > 1e-2  # its shifted schedule, not linspace


def test_batches_beyond_the_free_memory_name_the_option_and_a_size_that_fits(model_dirs, monkeypatch):
    import flowdppo.policies.limits as limits

    policy = load_pipeline_policy(str(model_dirs["sd3"]), RESOLUTION, torch.float32, "cpu")
    forward, train, pixels = limits.sample_bytes(policy)
    per_sample, per_element = max(2 * forward, pixels), 2 * train  # guided: 2 rows per sample
    budget = 100_000
    assert per_sample <= budget < 64 * per_element  # the tiny model's sizes make both branches reachable
    monkeypatch.setattr(limits, "free_memory", lambda device: (budget, "RAM available"))
    check = partial(limits.memory_error, policy, 3.0, 64)
    message = check(0, 8)
    assert message.startswith(
        "sampler.rollout_batch_size: a rollout call of 64 samples needs at least "
    ) and message.endswith(
        f"more than the 97.66 KiB of RAM available; set sampler.rollout_batch_size={budget // per_sample} or less"
    )
    message = check(budget // per_sample, 64)
    assert message.startswith("optim.minibatch_size: a mini-batch of 64 elements needs at least ") and message.endswith(
        f"set optim.minibatch_size={budget // per_element} or less"
    )
    assert check(budget // per_sample, budget // per_element) == ""  # the suggested sizes pass
    assert check(1, 1000, processes=4).endswith(f"set optim.minibatch_size={budget // per_element * 4} or less")
    monkeypatch.setattr(limits, "free_memory", lambda device: (pixels // 2, "GPU memory free on cuda:0"))
    assert check(1, 1).startswith("resolution: one sample (4 tokens) needs at least ")


def test_free_memory_is_the_gpus_free_bytes_on_cuda_and_the_available_ram_on_cpu(monkeypatch):
    """The CUDA branch, without a GPU: ``torch.cuda.mem_get_info`` answers (free, total) for the asked device."""
    import psutil

    import flowdppo.policies.limits as limits

    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (3 * 2**30, 80 * 2**30))
    assert limits.free_memory("cuda:1") == (3 * 2**30, "GPU memory free on cuda:1")
    assert asked == [torch.device("cuda:1")]
    free, where = limits.free_memory("cpu")
    assert where == "RAM available" and 0 < free <= psutil.virtual_memory().total
    assert limits.free_memory("meta") is None


def test_train_refuses_a_size_past_the_positions_or_the_memory_before_writing(model_dirs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    for family, size, message in (
        (
            "qwen_image",
            131072,
            "resolution: at most 114,688 for this model (its position embedding covers 7,168 "
            "patches per axis: 4096 rotary positions, 512 of them for the text), got 131,072",
        ),
        ("flux", 1048576, "resolution: one sample (4,294,967,296 tokens) needs at least "),
    ):
        code = main(
            [
                "train",
                "--out",
                str(tmp_path / "run"),
                "task=text_to_image",
                f"model={model_dirs[family]}",
                f"prompts={prompts}",
                "eval_prompts=1",
                f"resolution={size}",
                "reward.names=[jpeg_incompressibility]",
            ]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "run").exists()
