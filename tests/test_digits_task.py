"""The digits task: data, shipped base policy and classifier, rewards and forgetting measures."""

import math

import pytest
import torch

from flowdppo.rewards import Reward
from flowdppo.rewards.registry import make_reward, reward_names
from flowdppo.tasks.digits import BASE_WEIGHTS_DIR, CLASSIFIER_WEIGHTS_DIR, WEIGHTS_DIR
from flowdppo.tasks.digits.classifier import DigitClassifier, accuracy, load_classifier
from flowdppo.tasks.digits.data import as_labels, load_digits_split, to_unit_range
from flowdppo.tasks.digits.policy import LORA_TARGET_MODULES, DigitsPolicy, load_base_policy
from flowdppo.tasks.digits.pretrain import sample_digits
from flowdppo.tasks.digits.rewards import feature_fid, group_diversity, prompt_accuracy


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


@pytest.fixture(scope="module")
def base():
    return load_base_policy()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_split_is_fixed_stratified_and_scaled(split):
    train_x, train_y, heldout_x, heldout_y = split
    assert train_x.shape == (1437, 1, 8, 8) and heldout_x.shape == (360, 1, 8, 8)
    assert train_x.min() == -1 and train_x.max() == 1 and train_x.dtype == torch.float32
    assert heldout_y.bincount().min() >= 35  # stratified: every class held out
    again = load_digits_split()
    assert torch.equal(again[0], train_x) and torch.equal(again[3], heldout_y)


def test_as_labels_accepts_tensors_ints_and_digit_strings():
    assert as_labels(["3", 7, " 0"]).tolist() == [3, 7, 0]
    assert as_labels(torch.tensor([[1], [2]])).tolist() == [1, 2]
    with pytest.raises(ValueError, match="class index"):
        as_labels(["three"])
    with pytest.raises(ValueError, match="0..10"):
        as_labels([11])


def test_shipped_weights_load_through_the_real_loaders(base, classifier):
    assert isinstance(base, DigitsPolicy) and isinstance(classifier, DigitClassifier)
    assert (BASE_WEIGHTS_DIR / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (BASE_WEIGHTS_DIR / "prompt_embeddings.safetensors").is_file()
    assert (CLASSIFIER_WEIGHTS_DIR / "model.safetensors").is_file()
    assert sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file()) < 1e7  # 3 bases + classifier
    assert type(base.transformer).__name__ == "SD3Transformer2DModel"
    attn_modules = {n.split(".attn.", 1)[1] for n, _ in base.transformer.named_modules() if ".attn." in n}
    assert set(LORA_TARGET_MODULES) <= attn_modules and base.lora_target_modules == LORA_TARGET_MODULES


def test_classifier_heldout_accuracy(split, classifier):
    _, _, heldout_x, heldout_y = split
    assert accuracy(classifier, heldout_x, heldout_y) >= 0.95


def test_save_and_load_round_trip_gives_identical_velocities(base, tmp_path):
    base.save_pretrained(tmp_path / "policy")
    loaded = DigitsPolicy.from_pretrained(tmp_path / "policy")
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma, cond = torch.linspace(0.1, 1.0, 6), torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        assert torch.equal(base.velocity(x, sigma, cond), loaded.velocity(x, sigma, cond))
        assert torch.equal(base.velocity(x, sigma, cond, 3.0), loaded.velocity(x, sigma, cond, 3.0))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        DigitsPolicy.from_pretrained(tmp_path)


def test_classifier_free_guidance(base):
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma, cond = torch.full((4,), 0.6), torch.tensor([1, 4, 7, 9])
    with torch.no_grad():
        v_c = base.velocity(x, sigma, cond)
        v_u = base.velocity(x, sigma, torch.full((4,), 10))
        assert torch.allclose(base.velocity(x, sigma, cond, 1.0), v_c)
        v_w = base.velocity(x, 0.6, cond, 3.0)  # a float sigma broadcasts
    assert torch.allclose(v_w, v_u + 3.0 * (v_c - v_u), atol=1e-5)
    assert (v_w - v_c).abs().max() > 1e-2
    assert v_c.shape == x.shape and base.decode(x).min() >= 0 and base.decode(x).max() <= 1
    with pytest.raises(ValueError, match="prompts"):
        base.velocity(x, sigma, torch.tensor([1, 2]))


def test_base_model_has_headroom_without_guidance(base, classifier):
    labels = torch.arange(10).repeat_interleave(20)
    acc = {}
    for w in (1.0, 3.0):
        latents = sample_digits(
            base, labels, num_steps=10, guidance_scale=w, generator=torch.Generator().manual_seed(0)
        )
        acc[w] = prompt_accuracy(base.decode(latents), labels, classifier)
    assert 0.4 <= acc[1.0] <= 0.8
    assert acc[3.0] >= 0.9 and acc[3.0] - acc[1.0] >= 0.15


def test_rewards_shapes_ranges_and_registry(split, classifier):
    _, _, heldout_x, heldout_y = split
    images, prompts = to_unit_range(heldout_x[:16]), heldout_y[:16]
    rewards = {name: make_reward(name, classifier=classifier) for name in reward_names(("digits",))}
    out = {name: fn(images, prompts, None) for name, fn in rewards.items()}
    for name, r in out.items():
        assert isinstance(rewards[name], Reward) and rewards[name].name == name
        assert r.shape == (16,) and r.dtype == torch.float32 and torch.isfinite(r).all()
    assert (out["classifier_prob"] >= 0).all() and (out["classifier_prob"] <= 1).all()
    assert torch.allclose(out["classifier_logprob"].exp(), out["classifier_prob"], atol=1e-6)
    assert (out["ink"] <= 0).all() and (out["ink"] >= -1).all()
    assert torch.equal(rewards["classifier_prob"](images, [str(int(p)) for p in prompts]), out["classifier_prob"])
    with pytest.raises(ValueError, match="choose from classifier_prob, classifier_logprob, ink"):
        make_reward("aesthetic", kinds=("digits",))
    with pytest.raises(ValueError, match="null prompt"):
        rewards["classifier_prob"](images[:1], [10])


def test_classifier_reward_prefers_the_prompted_class(split, classifier):
    _, _, heldout_x, heldout_y = split
    images, labels = to_unit_range(heldout_x), heldout_y
    reward = make_reward("classifier_prob", classifier=classifier)
    right = reward(images, labels)
    wrong = torch.stack([reward(images, (labels + k) % 10) for k in range(1, 10)])  # (9, N)
    assert right.mean() > 0.9 and wrong.mean() < 0.05
    assert (right > wrong.max(0).values).float().mean() > 0.95


def test_ink_competes_with_legibility(split, classifier):
    _, _, heldout_x, heldout_y = split
    images = to_unit_range(heldout_x)
    prob, ink = make_reward("classifier_prob", classifier=classifier), make_reward("ink")
    faint = images * 0.4  # less ink: higher ink reward, lower classifier reward
    assert ink(faint, heldout_y).mean() > ink(images, heldout_y).mean()
    assert prob(faint, heldout_y).mean() < prob(images, heldout_y).mean() - 0.3


def test_feature_fid_and_group_diversity(split, classifier):
    train_x, _, heldout_x, heldout_y = split
    train, heldout = to_unit_range(train_x), to_unit_range(heldout_x)
    noise = torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fid_real = feature_fid(heldout, train, classifier)
    fid_noise = feature_fid(noise, train, classifier)
    assert 0 <= fid_real < 0.1 * fid_noise
    assert feature_fid(train, train, classifier) < 1e-6
    same = heldout[:1].repeat(8, 1, 1, 1)
    assert group_diversity(same, [0] * 4 + [1] * 4) == 0.0
    assert group_diversity(heldout, heldout_y) > 1.0
    pair = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    assert group_diversity(pair, torch.tensor([3, 3])) == pytest.approx(8.0)  # sqrt(64)
    with pytest.raises(ValueError, match="two or more"):
        group_diversity(heldout[:3], [0, 1, 2])


def test_upsampled_digits_round_trip(split):
    """digits.upsample: bicubic upsampling, pixel_unshuffle into u*u channels; decoding pools back to 8x8."""
    import torch.nn.functional as F

    from flowdppo.tasks.digits.data import decode_latents, to_latent, upsample_digits

    x = split[0][:32]
    assert torch.equal(decode_latents(x), to_unit_range(x))  # u = 1: the 8x8 task, bit for bit
    big = upsample_digits(x, 4, max_shift=0)
    latents = to_latent(big, 4)
    assert big.shape == (32, 1, 32, 32) and latents.shape == (32, 16, 8, 8) and latents.abs().max() <= 1
    assert torch.equal(F.pixel_shuffle(latents, 4), big)
    assert (decode_latents(latents) - to_unit_range(x)).abs().mean() < 0.05  # close to the original digit
    shifted = upsample_digits(x, 4, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == big.shape and not torch.equal(shifted, big)


def test_upsampled_task_has_shipped_bases_and_trains_on_a_pretrained_one(tmp_path):
    """digits.upsample 4 and 8 load their shipped bases; `digits pretrain --upsample 4` makes one that `model=`
    trains on for an epoch, with the mechanism metrics in the row."""
    from flowdppo.cli import main
    from flowdppo.config import load_config
    from flowdppo.errors import ConfigError
    from flowdppo.tasks.digits.task import DigitsTask
    from flowdppo.trainer import train

    for u in (4, 8):  # the shipped bases
        assert DigitsTask(load_config(overrides=[f"digits_upsample={u}"])).policy.latent_shape == (u * u, 8, 8)
    with pytest.raises(ConfigError, match="digits.upsample"):
        load_config(overrides=["digits_upsample=3"])

    base = tmp_path / "base4"
    assert main(["digits", "pretrain", "--upsample", "4", "--steps", "2", "--out", str(base)]) == 0
    policy = DigitsPolicy.from_pretrained(base)
    assert policy.latent_shape == (16, 8, 8) and policy.decode(torch.zeros(2, 16, 8, 8)).shape == (2, 1, 8, 8)
    small = [
        "epochs=1",
        "prompts_per_epoch=2",
        "group_size=4",
        "eval_samples_per_class=2",
        "checkpoint_every=1000",
        "optim.minibatch_size=4",
    ]  # 8 samples x 2 steps = 4 mini-batches
    with pytest.raises(ConfigError, match="latents"):  # the 8x8 base cannot run at upsample 4
        train(
            load_config(overrides=[*small, "digits_upsample=4", f"model={BASE_WEIGHTS_DIR}"]),
            tmp_path / "bad",
            progress=False,
        )
    run = train(load_config(overrides=[*small, "digits_upsample=4", f"model={base}"]), tmp_path / "run", progress=False)
    (row,) = run.rows()
    assert 0 <= row["eval/accuracy"] <= 1 and math.isfinite(row["eval/fid"])
    assert 0 <= row["dim_kl_p50"] <= row["dim_kl_p90"] <= row["dim_kl_p99"]
    assert math.isfinite(row["first_moved_log_ratio_mean"]) and row["first_moved_log_ratio_std"] >= 0
    assert 0 <= row["masked_fraction_pos_adv"] <= 1 and 0 <= row["masked_fraction_neg_adv"] <= 1


def test_held_out_classes_train_on_some_digits_and_measure_the_others():
    """digits_classes=[0..4]: prompts only from those; eval/* over their samples, eval_heldout/* over 5-9's (FID
    against real digits of the same classes); a bad list is one line."""
    from functools import partial

    from flowdppo.config import load_config
    from flowdppo.errors import ConfigError
    from flowdppo.rollout import sample
    from flowdppo.tasks.digits.data import decode_latents
    from flowdppo.tasks.digits.rewards import feature_fid, group_diversity, prompt_accuracy
    from flowdppo.tasks.digits.task import DigitsTask

    task = DigitsTask(load_config(overrides=["digits_classes=[3, 0, 4, 1, 2]"]))
    cond, _ = task.prompts(10, 2, seed=0, epoch=0)
    assert sorted(cond.tolist()) == sorted(list(range(5)) * 4)
    velocity = partial(task.policy, guidance_scale=1.0)
    measures = task.evaluate(velocity, 4)
    noise, labels = task.eval_noise(4)
    images = decode_latents(sample(velocity, labels, noise, task.sigmas()))
    _, _, real, real_labels = load_digits_split()
    for prefix, rows in (("eval", labels < 5), ("eval_heldout", labels >= 5)):
        assert measures[f"{prefix}/accuracy"] == prompt_accuracy(images[rows], labels[rows], task.classifier)
        assert measures[f"{prefix}/diversity"] == group_diversity(images[rows], labels[rows])
        ref = to_unit_range(real[(real_labels < 5) == (prefix == "eval")])
        assert measures[f"{prefix}/fid"] == pytest.approx(feature_fid(images[rows], ref, task.classifier))
    for bad in ("[3, 3]", "[10]"):
        with pytest.raises(ConfigError, match="digits.classes: distinct digits 0-9"):
            load_config(overrides=[f"digits_classes={bad}"])
