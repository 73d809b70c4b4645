"""Hostile inputs and interrupted runs: one line naming what to fix, exit code 2 (130 when interrupted), and
nothing lost or changed on disk."""

import json
import os
import random
import re
import shutil
import signal
import string
from pathlib import Path

import pytest
import yaml

import flowdppo.cli as cli
from flowdppo.cli import main
from flowdppo.config import load_config
from flowdppo.errors import ConfigError

TINY = ["prompts_per_epoch=2", "group_size=4", "eval_samples_per_class=2", "eval_every=100"]


def one_line_error(capsys, pattern: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("flowdppo: error: ") and re.search(pattern, err), err
    return err


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def nested(depth: int) -> str:
    return "a: " + "[" * depth + "]" * depth


# "billion laughs": under 1 KB, 9 levels of 10 aliases each: 10^9 strings once expanded
BILLION_LAUGHS = (
    "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))
    + "epochs: *i\n"
)

CONFIG_FILES = {
    "malformed": ("epochs: [1, 2\nloss: {", r"--config .*bad\.yaml: not valid YAML at line \d+"),
    "python tag": ("epochs: !!python/object/apply:os.system ['echo hi']\n", r"not valid YAML .*python/object"),
    "list for a name": ("method: [flow_dppo, flow_grpo]\n", r"method: must be one of"),
    "not a mapping": ("- epochs\n", r"must hold a mapping of keys, got list"),
    "deeply nested": (nested(20000), r"(nested too deeply|not valid YAML)"),
    "not UTF-8": (b"epochs: 3\n\xff\xfe\n", r"--config: .*bad\.yaml is not UTF-8 text"),
    "alias bomb": (BILLION_LAUGHS, r"--config .*bad\.yaml: YAML aliases are not accepted \(\*a at line 2, column 8\)"),
    "one alias": ("loss: &l {beta: 0.1}\nsampler: *l\n", r"YAML aliases are not accepted \(\*l at line 2"),
    "a huge integer": ("epochs: " + "9" * 5000 + "\n", r"--config .*bad\.yaml: a value that cannot be read"),
}


@pytest.mark.parametrize("case", list(CONFIG_FILES))
def test_bad_config_files_are_one_line(tmp_path, capsys, case):
    text, pattern = CONFIG_FILES[case]
    path = write(tmp_path / "bad.yaml", text)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, pattern)
    assert not (tmp_path / "out").exists()


BAD_VALUES = {
    "malformed override": (["loss.beta=[1,"], r"override 'loss\.beta=\[1,': not valid YAML"),
    "list for a name": (["sampler.kind=[ode, cps]"], r"sampler\.kind: expected str"),
    "nan grad norm": (["optim.max_grad_norm=nan"], r"optim\.max_grad_norm: must be a finite number"),
    "nan beta": (["loss.beta=.nan"], r"loss\.beta: must be a finite number"),
    "infinite lr": (["optim.lr=inf"], r"optim\.lr: must be a finite number"),
    "weights sum to 0": (["reward.weights=[0]"], r"reward\.weights: must not sum to 0"),
    "huge seed": (["seed=100000000000000000000000"], r"seed: must be in \[0, 2\^63\)"),
    "float seed": (["seed=1e23"], r"seed: expected int, got '1e23'"),
    "absurd steps": (["sampler.num_steps=1000000000"], r"sampler\.num_steps: at most 10,000"),
    "absurd group": (["group_size=1000000000"], r"group_size: at most 100,000"),
    "absurd batch": (["group_size=90000", "prompts_per_epoch=90000"], r"at most 10,000,000 samples per rollout"),
    "unknown device": (["device=tpu9"], r"device: 'tpu9' is not a device name"),
    "absent GPU": (["device=cuda:7"], r"device: cuda:7 is not available on this machine"),
    "zero eval samples": (["eval_samples_per_class=0"], r"eval_samples_per_class: must be > 0"),
    "alias in an override": (
        ["reward.weights=[&w 1, *w]"],
        r"override 'reward\.weights=\[&w 1, \*w\]': YAML aliases "
        r"are not accepted",
    ),
    "nft decay above 1": (["method=diffusion_nft", "nft.old_decay_max=2"], r"nft\.old_decay_max: must be in \[0, 1\]"),
    "awm decay above 1": (["method=awm", "awm.ema_decay_max=1.5"], r"awm\.ema_decay_max: must be in \[0, 1\]"),
    "lora alpha 0": (["optim.lora_alpha=0"], r"optim\.lora_alpha: must not be 0 with LoRA .* could never move"),
    "absurd lora rank": (
        ["optim.lora_rank=1000000000"],
        r"optim\.lora_rank: at most 64 for these layers .*got "
        r"1,000,000,000",
    ),
    "a block as a target": (
        ["optim.lora_target_modules=[attn]"],
        r"optim\.lora_target_modules: transformer_blocks\.0"
        r"\.attn \(Attention\) is not a layer LoRA wraps .*"
        r"e\.g\. transformer_blocks\.0\.attn\.to_q",
    ),
    "misspelt reward": (
        ["reward.names=[clasifier_prob]"],
        r"unknown reward 'clasifier_prob' \(did you mean "
        r"classifier_prob\?\)",
    ),
    "misspelt sampler": (["sampler.kind=flow_sd"], r"sampler\.kind: .* got 'flow_sd' \(did you mean flow_sde\?\)"),
    "misspelt method": (["method=flow_grp"], r"method: .* got 'flow_grp' \(did you mean flow_grpo\?\)"),
    "one evaluation sample per class": (
        ["eval_samples_per_class=1"],
        r"digits evaluation: at least 2 samples per class \(eval_samples_per_class, eval --per-class\), got 1",
    ),
    "misspelt key": (["sampler.knd=ode"], r"unknown config key 'sampler\.knd' \(did you mean sampler\.kind\?\)"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_are_one_line_and_write_nothing(tmp_path, capsys, case):
    overrides, pattern = BAD_VALUES[case]
    assert main(["train", "--no-progress", "--out", str(tmp_path / "out"), *TINY, "epochs=1", *overrides]) == 2
    one_line_error(capsys, pattern)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override",
    [
        "sampler.kind=" + "x" * 100_000,  # a long string
        "epochs=[" + ", ".join(["1"] * 100_000) + "]",  # a long list
        "sampler=" + "y" * 100_000,  # a long string where a section was expected
        "x" * 100_000 + "=1",  # a long unknown key
        "x" * 100_000,  # no "="
    ],
)
def test_no_error_line_is_arbitrarily_long(tmp_path, capsys, override):
    assert main(["train", "--out", str(tmp_path / "out"), override]) == 2
    err = one_line_error(capsys, r"(sampler\.kind|epochs|sampler|unknown config key|override)")
    assert len(err) < 700, len(err)  # the value cut where it is echoed: the line keeps the list of allowed keys
    assert len(cli._one_line(ConfigError("z" * 10**6))) == cli.MAX_MESSAGE  # whatever a message holds


def test_the_cpu_allocator_failing_is_the_out_of_memory_line(tmp_path, capsys, monkeypatch):
    import flowdppo.trainer as trainer_module

    def fail(*args, **kwargs):  # what torch raises when malloc fails (a RuntimeError, not a MemoryError)
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 128000000000 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(trainer_module, "rollout", fail)
    assert main(["train", "--no-progress", "--out", str(tmp_path / "out"), *TINY, "epochs=1"]) == 2
    one_line_error(capsys, r"^flowdppo: error: out of memory; reduce group_size, .*sampler\.rollout_batch_size$")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(trainer_module, "rollout", lambda *a, **k: 1 / 0)  # any other error stays a defect
    with pytest.raises(ZeroDivisionError):
        main(["train", "--no-progress", "--out", str(tmp_path / "out"), *TINY, "epochs=1"])


def test_out_that_is_a_file_or_under_a_file(tmp_path, capsys):
    file = write(tmp_path / "file", "x")
    for out in (file, file / "run"):
        assert main(["train", "--out", str(out), *TINY, "epochs=1"]) == 2
        one_line_error(capsys, rf"--out: {re.escape(str(file))} is a file, not a folder")
    assert file.read_text() == "x"


def test_out_that_cannot_be_created(capsys):
    assert main(["train", "--no-progress", "--out", "/proc/flowdppo-run", *TINY, "epochs=1"]) == 2
    one_line_error(capsys, r"/proc/flowdppo-run")


def test_command_line_values_are_checked(tmp_path, capsys):
    assert main(["compare", "--seeds", "0", "--out", str(tmp_path / "c")]) == 2
    one_line_error(capsys, r"--seeds: must be at least 1, got 0")
    assert main(["eval", str(tmp_path), "--per-class", "-1"]) == 2
    one_line_error(capsys, r"--per-class: must be at least 1")
    assert main(["compare", "--preset", "singel", "--out", str(tmp_path / "c")]) == 2
    one_line_error(capsys, r"--preset: unknown preset 'singel' \(did you mean single\?\)")
    assert main(["compare", "--methods", "flow_dppo,flow_grpoo", "--out", str(tmp_path / "c")]) == 2
    one_line_error(capsys, r"--methods: unknown method 'flow_grpoo' \(did you mean flow_grpo\?\)")
    assert not (tmp_path / "c").exists()


def test_debug_anywhere_shows_the_traceback():
    with pytest.raises(ConfigError, match="method: must be one of"):
        main(["train", "--method", "ppo", "--debug"])


def test_only_process_0_prints(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--method", "ppo"]) == 2
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "reward,pattern",
    [
        ("user_rewards:raises", r"reward 'user_rewards:raises' raised RuntimeError: the reward server is down"),
        (
            "user_rewards:two_arguments",
            r"reward 'user_rewards:two_arguments' raised TypeError: .*reward\(images, prompts, "
            r"metadata\)",
        ),
    ],
)
def test_a_failing_user_reward_is_named(tmp_path, capsys, reward, pattern):
    out = tmp_path / "out"
    assert main(["train", "--no-progress", "--out", str(out), *TINY, "epochs=1", f"reward.names=[{reward}]"]) == 2
    one_line_error(capsys, pattern)
    assert not out.exists()  # it failed in its first epoch: nothing is left, the same command can run again


def test_a_user_reward_module_in_the_working_folder_is_found(tmp_path, capsys, monkeypatch):
    write(tmp_path / "my_reward_here.py", "def dark(images, prompts, metadata):\n    return -images.mean((1, 2, 3))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", os.getcwd())])
    args = ["train", "--no-progress", "--out", "run", *TINY, "epochs=1", "reward.names=[my_reward_here:dark]"]
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["reward/my_reward_here:dark"] < 0


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_interrupt_exits_130_with_a_resume_hint(tmp_path, capsys, monkeypatch, how):
    import flowdppo.trainer as trainer_module

    real_log = trainer_module.RunFolder.log

    def log_then_interrupt(self, row):
        real_log(self, row)
        if row["epoch"] == 1:
            if how == "SIGINT":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer_module.RunFolder, "log", log_then_interrupt)
    out = tmp_path / "run"
    assert main(["train", "--no-progress", "--out", str(out), *TINY, "epochs=4", "checkpoint_every=1"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"flowdppo: interrupted ({how}); continue with: flowdppo train --resume {out}"
    assert not (out / ".lock").exists()  # released
    monkeypatch.setattr(trainer_module.RunFolder, "log", real_log)
    assert main(["train", "--no-progress", "--resume", str(out)]) == 0
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0, 1, 2, 3]


def test_a_pickle_only_model_folder_is_refused(tmp_path, capsys):
    from flowdppo.tasks.digits.policy import load_base_policy

    folder = tmp_path / "model"
    policy = load_base_policy()
    policy.save_pretrained(folder)
    policy.transformer.save_pretrained(folder / "transformer", safe_serialization=False)  # .bin next to ...
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()  # ... and no safetensors
    assert main(["train", "--out", str(tmp_path / "out"), *TINY, "epochs=1", f"model={folder}"]) == 2
    one_line_error(capsys, r"model: .* is not a digits policy saved with save_pretrained .*safetensors")


def random_override(rng: random.Random) -> str:
    keys = [
        "epochs",
        "seed",
        "loss.beta",
        "sampler.kind",
        "sampler.window_range",
        "reward.weights",
        "optim.lr",
        "nft.b",
        "loss",
        "sampler",
        "x.y.z",
        "method",
        "reward.names",
        "sampler.eta",
        "",
    ]
    values = [
        "1",
        "-1",
        "0",
        "1e400",
        "nan",
        "[",
        "]",
        "{a: 1}",
        "[1, 2]",
        "!!python/name:os.system",
        "'s'",
        "~",
        "true",
        "flow_sde",
        "[ode]",
        "\x00",
        "é",
        "1" * 40,
        ": :",
        "*a",
        "&a [1]",
    ]
    if rng.random() < 0.6:  # a valid one, so that some combinations load
        return rng.choice(["epochs=3", "loss.beta=0.01", "seed=5", "sampler.eta=0.5", "optim.lr=1e-4"])
    key = rng.choice(keys) + rng.choice(["", "", ".kind", "x"])
    value = rng.choice(values) + rng.choice(["", "", rng.choice(string.printable)])
    return f"{key}={value}" if rng.random() < 0.9 else key + value


def random_yaml(rng: random.Random) -> str:
    pieces = [
        "epochs: 3\n",
        "loss:\n  beta: ",
        "[",
        "{",
        "}",
        "]",
        "- ",
        "!!python/tuple [1]",
        "\t",
        ": ",
        "'",
        '"',
        "sampler: {kind: ode}\n",
        "method: awm\n",
        "&x 1\n",
        "*x\n",
        "---\n",
        "? a\n",
        "%YAML 1.1\n",
        "nft: {b: -1}\n",
        "reward: {weights: [0]}\n",
    ]
    if rng.random() < 0.3:
        return rng.choice(["epochs: 3\n", "loss:\n  beta: 0.1\n", "{}\n", "optim: {lr: 0.001}\n"])
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))


def test_fuzzed_overrides_and_yaml_give_a_config_or_one_line(tmp_path):
    """Seeded random override strings and YAML documents: every outcome is a valid config or a one-line
    ``ConfigError``, never another exception."""
    rng = random.Random(1234)
    outcomes = {"config": 0, "error": 0}
    for i in range(300):
        overrides = [random_override(rng) for _ in range(rng.randint(1, 3))]
        config_file = write(tmp_path / f"f{i}.yaml", random_yaml(rng)) if i % 2 else None
        try:
            load_config(config_file=config_file, overrides=overrides)
            outcomes["config"] += 1
        except ConfigError as err:
            assert "\n" not in cli._one_line(err) and str(err), (overrides, err)
            outcomes["error"] += 1
    assert outcomes["config"] > 10 and outcomes["error"] > 100, outcomes


def test_failed_first_epoch_leaves_nothing_and_overwrite_keeps_nothing_stale(tmp_path, capsys):
    out = tmp_path / "out"
    bad = ["train", "--no-progress", "--out", str(out), *TINY, "epochs=1", "reward.names=[user_rewards:nan_reward]"]
    for _ in range(2):  # the same command again is not refused as "already holds a run"
        assert main(bad) == 2
        one_line_error(capsys, r"non-finite reward at epoch 0")
        assert not out.exists()
    out.mkdir()
    assert main(bad) == 2  # a folder that existed stays, empty of what the failed run wrote
    assert out.is_dir() and not list(out.iterdir())
    capsys.readouterr()


def test_yaml_of_a_run_is_safe_loaded_and_shell_commands_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = write(tmp_path / "run" / "config.yaml", f"epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["train", "--resume", str(run.parent)]) == 2
    one_line_error(capsys, r"--resume .*config\.yaml: not valid YAML")
    assert not marker.exists()
    shutil.rmtree(run.parent)
    assert yaml.safe_load("a: 1") == {"a": 1}


def test_importing_the_library_prints_nothing():
    import subprocess
    import sys

    code = "import flowdppo.trainer, flowdppo.tasks.text_to_image, flowdppo.rewards.image, flowdppo.compare_runs"
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_constant_reward_warns_then_stops_with_the_epochs_kept(tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "train",
        "--no-progress",
        "--out",
        str(out),
        *TINY,
        "epochs=6",
        "checkpoint_every=1",
        "reward.names=[user_rewards:constant]",
    ]
    assert main([*args, "stall_epochs=2"]) == 2
    captured = capsys.readouterr()
    assert "flowdppo: warning: nothing to learn at epoch 0: every group's rewards are equal" in captured.out
    assert "(stall_epochs)" in captured.out
    err = captured.err.strip()
    assert err.count("\n") == 0 and re.fullmatch(
        r"flowdppo: error: nothing to learn for 2 epochs in a row \(up to "
        r"epoch 1\): every group's rewards are equal \(mean 0\.5\): no "
        r"advantage signal; .*reward\.names.*\(stall_epochs=0 trains on "
        r"regardless\)",
        err,
    ), err
    assert [r["epoch"] for r in rows_of(out)] == [0, 1]  # what ran is kept, checkpointed, resumable
    assert (out / "checkpoints" / "epoch_000002").is_dir()


def test_stall_epochs_0_trains_on_and_the_summary_states_its_sample_count(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                "--no-progress",
                "--out",
                str(out),
                *TINY,
                "epochs=2",
                "stall_epochs=0",
                "reward.names=[user_rewards:constant]",
            ]
        )
        == 0
    )
    assert [r["epoch"] for r in rows_of(out)] == [0, 1]
    summary = capsys.readouterr().out
    assert f"evaluation       2 samples per class (`flowdppo eval {out}` uses 50, less noisy)" in summary
    assert re.search(r"eval/fid +base [\d.]+ -> trained [\d.]+", summary)


def test_an_update_that_does_not_move_the_policy_stops_the_run(tmp_path, capsys, monkeypatch):
    from flowdppo.algorithms.policy_gradient import PolicyGradient

    real_loss = PolicyGradient.loss

    def zero_loss(self, *args, **kwargs):  # a loss identically 0: every gradient is 0, the policy never moves
        loss, metrics = real_loss(self, *args, **kwargs)
        return loss * 0, metrics

    monkeypatch.setattr(PolicyGradient, "loss", zero_loss)
    out = tmp_path / "out"
    assert main(["train", "--no-progress", "--out", str(out), *TINY, "epochs=5", "stall_epochs=3"]) == 2
    captured = capsys.readouterr()
    assert "flowdppo: warning: nothing to learn at epoch 0: the gradient norm is 0" in captured.out
    err = captured.err.strip()
    assert err.count("\n") == 0 and err.startswith(
        "flowdppo: error: nothing to learn for 3 epochs in a row (up to "
        "epoch 2): the gradient norm is 0: the update did not move the "
        "policy; check optim.lora_alpha"
    ), err
    assert all(r["grad_norm"] == 0 for r in rows_of(out)) and len(rows_of(out)) == 3


def test_settings_that_leave_nothing_to_train_are_refused():
    from torch import nn

    from flowdppo.policies.lora import make_trainable

    class Frozen(nn.Module):  # a policy whose transformer holds no parameter
        def __init__(self):
            super().__init__()
            self.transformer = nn.Identity()

    with pytest.raises(ConfigError, match=r"^optim: these settings leave no parameter to train .*could never move$"):
        make_trainable(Frozen(), 0, 16.0)
