"""Faults a long run must survive or report: non-finite values (by injection), bad inputs, unsafe loads."""

import re
from pathlib import Path

import pytest
import torch
import yaml

import flowdppo
import flowdppo.trainer as trainer_module
from flowdppo.algorithms.policy_gradient import PolicyGradient
from flowdppo.cli import main
from flowdppo.config import load_config, resume_config, save_config
from flowdppo.errors import ConfigError, NonFiniteError
from flowdppo.trainer import train

TINY = ["prompts_per_epoch=2", "group_size=4", "eval_samples_per_class=2", "eval_every=100"]


def inject(monkeypatch, quantity: str) -> None:
    """Make ``quantity`` non-finite at every occurrence, by patching what produces it."""
    if quantity == "advantage":
        real = trainer_module.aggregate_rewards
        monkeypatch.setattr(trainer_module, "aggregate_rewards", lambda *a, **k: real(*a, **k) * float("inf"))
    elif quantity == "loss":
        real_loss = PolicyGradient.loss

        def nan_loss(self, *args):
            loss, metrics = real_loss(self, *args)
            return loss * float("nan"), metrics

        monkeypatch.setattr(PolicyGradient, "loss", nan_loss)
    elif quantity == "grad_norm":
        real_make_trainable = trainer_module.make_trainable

        def make_trainable_with_inf_grad(policy, *args):
            real_make_trainable(policy, *args)
            first = next(p for p in policy.parameters() if p.requires_grad)
            first.register_hook(lambda grad: grad * float("inf"))

        monkeypatch.setattr(trainer_module, "make_trainable", make_trainable_with_inf_grad)


def overrides_for(quantity: str) -> list[str]:
    return ["reward.names=[user_rewards:nan_reward]"] if quantity == "reward" else []


def lora_b_norm(run) -> float:
    from safetensors.torch import load_file

    weights = load_file(str(run.path / "final" / "pytorch_lora_weights.safetensors"))
    return sum(float(v.abs().sum()) for k, v in weights.items() if "lora_B" in k)


@pytest.mark.parametrize("quantity", ["reward", "advantage", "loss", "grad_norm"])
def test_nonfinite_stops_by_default_naming_the_quantity_and_where(tmp_path, monkeypatch, quantity):
    inject(monkeypatch, quantity)
    cfg = load_config(overrides=TINY + ["epochs=1"] + overrides_for(quantity))
    with pytest.raises(NonFiniteError, match=rf"non-finite {quantity} at epoch 0\b.*not trained on"):
        train(cfg, tmp_path / "run", progress=False)


@pytest.mark.parametrize("quantity", ["reward", "advantage", "loss", "grad_norm"])
def test_nonfinite_skip_mode_never_trains_on_it_and_counts(tmp_path, monkeypatch, quantity):
    inject(monkeypatch, quantity)
    cfg = load_config(
        overrides=TINY + ["epochs=2", "on_nonfinite=skip", "max_nonfinite_in_a_row=100"] + overrides_for(quantity)
    )
    run = train(cfg, tmp_path / "run", progress=False)
    rows = run.rows()
    # LoRA's B starts at zero: any optimizer step would move it. Every step was skipped, so none did.
    assert lora_b_norm(run) == 0.0
    assert 2 * 4 * cfg.sampler.window_size <= cfg.optim.minibatch_size  # one rollout, one mini-batch per epoch
    assert [r["nonfinite_skipped"] for r in rows] == [1, 2]


def test_nonfinite_skip_mode_stops_after_k_in_a_row(tmp_path, monkeypatch):
    inject(monkeypatch, "loss")
    cfg = load_config(overrides=TINY + ["epochs=3", "on_nonfinite=skip", "max_nonfinite_in_a_row=2"])
    with pytest.raises(NonFiniteError, match="2 skipped in a row"):
        train(cfg, tmp_path / "run", progress=False)


def test_a_skipped_step_does_not_stop_training_that_follows(tmp_path, monkeypatch):
    """NaN loss on the first mini-batch only: that step is skipped, the others train."""
    real_loss = PolicyGradient.loss
    calls = []

    def nan_once(self, *args):
        loss, metrics = real_loss(self, *args)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 1 else loss), metrics

    monkeypatch.setattr(PolicyGradient, "loss", nan_once)
    cfg = load_config(overrides=TINY + ["epochs=1", "on_nonfinite=skip", "optim.minibatch_size=8"])
    run = train(cfg, tmp_path / "run", progress=False)
    assert run.rows()[-1]["nonfinite_skipped"] == 1 and lora_b_norm(run) > 0


def write_run_config(path: Path, overrides: list[str] | None = None) -> Path:
    path.mkdir(parents=True)
    save_config(load_config(overrides=TINY + (overrides or [])), path / "config.yaml")
    return path


def not_a_model(tmp_path: Path) -> str:
    folder = tmp_path / "not_a_model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text("{}")
    (folder / "prompt_embeddings.safetensors").write_text("not safetensors")
    return str(folder)


BAD_INPUTS = {
    "unknown method": (lambda t: ["--method", "ppo"], r"method: must be one of flow_dppo, flow_grpo"),
    "unknown key": (lambda t: ["loss.kl_mask_treshold=1e-4"], r"did you mean loss\.kl_mask_threshold"),
    "wrong type": (lambda t: ["epochs=many"], r"epochs: expected int, got 'many'"),
    "negative threshold": (lambda t: ["loss.kl_mask_threshold=-1e-5"], r"loss\.kl_mask_threshold: must be > 0"),
    "eta out of range": (lambda t: ["--method", "flow_cps", "sampler.eta=1.5"], r"sampler\.eta: must be in \(0\.0, 1"),
    "window too large": (lambda t: ["sampler.window_size=12"], r"does not fit the 10-step schedule"),
    "group size 1": (lambda t: ["group_size=1"], r"group_size: must be >= 2"),
    "sampler vs method": (lambda t: ["--method", "grpo_guard", "sampler.kind=cps"], r"grpo_guard needs sampler"),
    "unknown value": (lambda t: ["on_nonfinite=ignore"], r"on_nonfinite: must be one of stop, skip"),
    "missing config file": (lambda t: ["--config", str(t / "none.yaml")], r"--config: no such file"),
    "unknown reward": (lambda t: ["reward.names=[sharpness]"], r"reward\.names: unknown reward 'sharpness'"),
    "reward not importable": (lambda t: ["reward.names=[no_such_module:f]"], r"cannot import 'no_such_module:f'"),
    "reward wrong shape": (
        lambda t: ["reward.names=[user_rewards:two_scores_per_image]"],
        r"returned \(8, 2\); a reward returns a tensor of shape \(8,\)",
    ),
    "reward NaN": (lambda t: ["reward.names=[user_rewards:nan_reward]"], r"non-finite reward at epoch 0"),
    "model missing": (lambda t: [f"model={t / 'nowhere'}"], r"model: no such folder"),
    "model not a diffusers model": (lambda t: [f"model={not_a_model(t)}"], r"model: .* is not a digits policy"),
    "resume of a non-run": (lambda t: ["--resume", str(t)], r"--resume: .* is not a run folder"),
    "resume with conflicting overrides": (
        lambda t: ["--resume", str(write_run_config(t / "run")), "loss.kl_mask_threshold=1e-4"],
        r"conflicts with the run's saved one: loss\.kl_mask_threshold \(run 1e-05, now 0\.0001\)",
    ),
    "out holds another run": (
        lambda t: ["--out", str(write_run_config(t / "run"))],
        r"already holds a run; continue it with --resume .*, choose another folder, or pass --overwrite",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys, case):
    make_args, message = BAD_INPUTS[case]
    args = make_args(tmp_path)
    options = [a for i, a in enumerate(args) if a.startswith("--") or (i and args[i - 1].startswith("--"))]
    overrides = [a for a in args if a not in options]
    if "--out" not in options and "--resume" not in options:
        options += ["--out", str(tmp_path / "out")]
    base = [] if "--resume" in options else TINY + ["epochs=1"]
    assert main(["train", "--no-progress", *options, *base, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("flowdppo: error: ") and re.search(message, err), err
    assert not (tmp_path / "out").exists()  # found before or in the first epoch: nothing is left


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigError, match="method: must be one of"):
        main(["--debug", "train", "--method", "ppo"])


def test_resume_accepts_overrides_equal_to_the_saved_config(tmp_path):
    run = write_run_config(tmp_path / "run", ["epochs=3"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert resume_config(saved, overrides=["epochs=3"]).epochs == 3


UNSAFE_LOADS = [
    (r"\bimport pickle\b|\bpickle\.loads?\(", "pickle"),
    (r"\bjoblib\.load\(", "joblib"),
    (r"allow_pickle\s*=\s*True", "numpy allow_pickle"),
    (r"torch\.load\((?![^)]*weights_only\s*=\s*True)[^)]*\)", "torch.load without weights_only=True"),
]


def test_no_unsafe_loads_in_the_package():
    sources = list(Path(flowdppo.__file__).parent.rglob("*.py"))
    assert len(sources) > 20
    found = [
        f"{path.name}: {what}"
        for path in sources
        for pattern, what in UNSAFE_LOADS
        if re.search(pattern, path.read_text())
    ]
    assert not found, found


def test_the_unsafe_load_scan_catches_each_pattern():
    samples = [
        "import pickle",
        "x = pickle.load(f)",
        "joblib.load('m.pkl')",
        "np.load(p, allow_pickle=True)",
        "torch.load('w.pt')",
        "torch.load(p, map_location='cpu')",
    ]
    for sample in samples:
        assert any(re.search(pattern, sample) for pattern, _ in UNSAFE_LOADS), sample
    assert not any(re.search(p, "torch.load(path, weights_only=True)") for p, _ in UNSAFE_LOADS)


def test_nonfinite_guard_agrees_on_the_verdict_and_resets_after_a_step():
    from flowdppo.trainer import NonFiniteGuard

    guard = NonFiniteGuard("skip", 3)
    bad = torch.tensor([1.0, float("inf")])
    assert guard.ok("here", loss=torch.tensor(1.0))
    assert not guard.ok("here", loss=bad) and not guard.ok("here", grad_norm=bad)
    guard.stepped()
    assert not guard.ok("here", loss=bad) and not guard.ok("here", loss=bad)
    with pytest.raises(NonFiniteError, match="3 skipped in a row"):
        guard.ok("here", loss=bad)
    assert guard.skipped == 5
