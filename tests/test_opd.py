"""On-policy distillation (``opd``): the per-step loss against closed forms and a Monte Carlo estimate, its gradient
on a linear model, teachers routed by prompt, a student that moves toward its teachers, refusals, exact resume."""

import math
import shutil
from functools import partial

import pytest
import torch
import yaml

from flowdppo.algorithms.opd import OPD
from flowdppo.algorithms.teachers import prompt_texts, read_routes, route, teacher_active
from flowdppo.cli import main
from flowdppo.config import load_config
from flowdppo.errors import ConfigError
from flowdppo.evaluate import load_trained_policy, run_config
from flowdppo.policies.lora import adapters_disabled, make_trainable, uses_lora
from flowdppo.rollout import rollout, sample_with_path_kl
from flowdppo.samplers import get_sampler, trained_steps
from flowdppo.tasks import load_task
from flowdppo.trainer import train

E, SHAPE = 6, (1, 3, 3)
TINY = ["prompts_per_epoch=4", "group_size=4", "eval_samples_per_class=2", "eval_every=100"]
LOW, HIGH = "0,1,2,3,4", "5,6,7,8,9"


def flow_sde_coefficients(sigma, sigma_next, eta, stand_in):
    """Flow-SDE's mean ``a x + c v`` and std, written out from Flow-GRPO eq. 9 (float64)."""
    dt = sigma_next - sigma
    g2 = eta**2 * sigma / (1 - torch.where(sigma >= 1, stand_in, sigma))
    a = 1 + g2 * dt / (2 * sigma)
    c = (1 + g2 * (1 - sigma) / (2 * sigma)) * dt
    return a.view(-1, 1, 1, 1), c.view(-1, 1, 1, 1), torch.sqrt(g2 * -dt)


def minibatch(seed=0):
    """Elements at steps of a 10-step schedule (one from sigma = 1), a teacher mean near the student's."""
    gen = torch.Generator().manual_seed(seed)
    sigmas = torch.linspace(1, 0, 11, dtype=torch.float64)
    step = torch.tensor([0, 2, 4, 5, 7, 9])
    x = torch.randn(E, *SHAPE, generator=gen, dtype=torch.float64)
    a, c, std = flow_sde_coefficients(sigmas[step], sigmas[step + 1], 0.7, sigmas[1])
    teacher_means = a * x + c * (0.5 * x) + 0.05 * torch.randn(E, *SHAPE, generator=gen, dtype=torch.float64)
    mb = {
        "latents": x,
        "next_latents": x.clone(),  # the loss does not read the sampled next latent
        "sigma": sigmas[step],
        "sigma_next": sigmas[step + 1],
        "stds": std,
        "teacher_means": teacher_means,
    }
    return mb, (a, c, std), sigmas[1]


def opd_algorithm(kl_reduce="mean", stand_in=None):
    algorithm = OPD(load_config("opd", overrides=["opd.teachers=[unused]", f"opd.kl_reduce={kl_reduce}"]))
    algorithm.sigma_stand_in = stand_in
    return algorithm


@pytest.mark.parametrize("kl_reduce", ["mean", "sum"])
def test_the_per_step_loss_is_the_gaussian_kl_from_the_student_to_its_teacher(kl_reduce):
    """The loss is the mean over elements of KL(N(mu_S, s^2 I) || N(mu_T, s^2 I)) (torch.distributions, float64),
    divided by the latent size with kl_reduce=mean; a Monte Carlo estimate on student samples agrees."""
    mb, (a, c, std), stand_in = minibatch()
    theta = 0.8
    loss, metrics = opd_algorithm(kl_reduce, stand_in).loss(lambda x, s, cond: theta * x, None, mb, None, True, None)
    mu_s = a * mb["latents"] + c * theta * mb["latents"]
    s = std.view(-1, 1, 1, 1).expand_as(mu_s)
    student, teacher = torch.distributions.Normal(mu_s, s), torch.distributions.Normal(mb["teacher_means"], s)
    full = torch.distributions.kl_divergence(student, teacher).flatten(1).sum(1)  # (E,)
    n = math.prod(SHAPE)
    expected = full if kl_reduce == "sum" else full / n
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["teacher_kl_max"], expected.max(), rtol=1e-12, atol=0)
    torch.manual_seed(0)
    draws = student.sample((40_000,))  # E[log p_S(x) - log p_T(x)] under the student: the reverse KL
    log_ratio = (student.log_prob(draws) - teacher.log_prob(draws)).flatten(2).sum(2)  # (N, E)
    estimate, error = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(len(draws))
    assert ((estimate - full).abs() < 5 * error).all(), (estimate, full, error)  # 5 standard errors


def test_the_gradient_on_a_linear_model_is_the_scaled_difference_of_means():
    """v = theta x: mu_S = a x + c theta x, so dL/dtheta = mean_e mean_d (mu_S - mu_T) c x / s^2 (mean reduce)."""
    mb, (a, c, std), stand_in = minibatch(1)
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss, _ = opd_algorithm("mean", stand_in).loss(lambda x, s, cond: theta * x, None, mb, None, True, None)
    (grad,) = torch.autograd.grad(loss, theta)
    x = mb["latents"]
    delta = a * x + c * 0.3 * x - mb["teacher_means"]
    expected = (delta * c * x / std.view(-1, 1, 1, 1) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


def test_routes_name_each_prompt_once_and_the_rest_goes_to_the_catch_all(tmp_path):
    prompts = tmp_path / "cats.txt"
    prompts.write_text("a cat\na black cat\n")
    routes = read_routes([LOW, str(prompts), ""])
    assert route(["3", "a cat", "9", "a black cat", "0"], routes) == [0, 1, 2, 1, 0]
    assert route(["7"], read_routes([])) == [0]  # one teacher, no route: every prompt
    assert prompt_texts(torch.tensor([3, 0])) == ["3", "0"]
    with pytest.raises(ConfigError, match="opd.route: the prompt '3' goes to teachers 0 and 1"):
        read_routes([LOW, "3,9"])
    with pytest.raises(ConfigError, match="opd.route: the prompt '7' goes to no teacher"):
        route(["7"], read_routes([LOW, "5,6"]))
    with pytest.raises(ConfigError, match='at most one entry may be ""'):
        read_routes(["", " "])


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two teachers trained 2 epochs each on their own classes: Flow-DPPO on 0-4, AWM on 5-9."""
    tmp = tmp_path_factory.mktemp("teachers")
    fast = [*TINY, "epochs=2", "optim.lr=3e-3"]
    low = train(load_config("flow_dppo", overrides=[*fast, "digits.classes=[0,1,2,3,4]"]), tmp / "low", progress=False)
    high = train(load_config("awm", overrides=[*fast, "digits.classes=[5,6,7,8,9]"]), tmp / "high", progress=False)
    return low.path, high.path


def student_overrides(teachers, epochs):
    return [*TINY, f"epochs={epochs}", f"opd.teachers=[{teachers[0]},{teachers[1]}]", f'opd.route=["{LOW}","{HIGH}"]']


def velocity_of(run_dir):
    cfg = run_config(run_dir)
    task = load_task(cfg, "cpu")
    return partial(load_trained_policy(run_dir, task), guidance_scale=1.0), task


def test_each_element_gets_the_transition_of_its_own_teacher(teachers):
    """The teacher means of the elements are those of the teacher a prompt's class is routed to, each teacher loaded
    on its own (and the two teachers differ on them); afterwards the student runs its own adapter again."""
    cfg = load_config("opd", overrides=student_overrides(teachers, 1))
    task = load_task(cfg, "cpu")
    make_trainable(task.policy, cfg.optim.lora_rank, cfg.optim.lora_alpha)
    cond = torch.tensor([1, 7, 4, 5, 0, 9])
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((6,), 0.5)
    with torch.no_grad():
        own = task.policy(noise, sigma, cond)
    algorithm = OPD(cfg)
    algorithm.setup(task.policy)
    steps = trained_steps(cfg.sampler, 0, 0)
    traj = rollout(task.policy, cond, noise, task.sigmas(), cfg.sampler, steps, generator=torch.Generator())
    data = algorithm.elements(traj, torch.zeros(6), task.policy, torch.Generator(), None).data
    kernel, x = get_sampler(cfg.sampler.kind), data["latents"]
    means = []
    for run_dir in teachers:
        velocity, _ = velocity_of(run_dir)
        v = velocity(x, data["sigma"], cond[data["sample"]])
        means.append(kernel.step(x, v, data["sigma"], data["sigma_next"], cfg.sampler.eta, traj.sigmas[1]).mean)
    for k in (0, 1):
        rows = data["teacher"] == k
        assert torch.equal(rows, (cond[data["sample"]] >= 5) == bool(k))
        torch.testing.assert_close(data["teacher_means"][rows], means[k][rows], rtol=1e-5, atol=1e-6)
        assert (data["teacher_means"][rows] - means[1 - k][rows]).abs().max() > 1e-4
    with torch.no_grad():
        torch.testing.assert_close(task.policy(noise, sigma, cond), own, rtol=0, atol=0)


def test_a_fully_fine_tuned_student_carries_its_teachers_on_a_frozen_copy(teachers):
    """With no adapter of its own the student trains its whole transformer; the teachers sit on a frozen copy."""
    cfg = load_config("opd", overrides=[*student_overrides(teachers, 1), "optim.lora_rank=0"])
    task = load_task(cfg, "cpu")
    make_trainable(task.policy, 0, 1.0)
    algorithm = OPD(cfg)
    algorithm.setup(task.policy)
    assert not uses_lora(task.policy) and algorithm.host.transformer is not task.policy.transformer
    assert not any(p.requires_grad for p in algorithm.host.parameters())
    x, sigma, cond = torch.randn(4, 1, 8, 8), torch.full((4,), 0.6), torch.tensor([5, 6, 8, 9])
    teacher, _ = velocity_of(teachers[1])
    with torch.no_grad(), teacher_active(algorithm.host, "teacher_1"):
        torch.testing.assert_close(algorithm.host(x, sigma, cond), teacher(x, sigma, cond), rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in algorithm.host.parameters())


def path_kl(velocity, teacher, task, classes):
    """The path KL from ``velocity`` to ``teacher`` along ``velocity``'s ODE samples of ``classes`` (eval noise)."""
    noise, cond = task.eval_noise(10)
    rows = torch.isin(cond, torch.tensor(classes))
    with torch.no_grad():
        _, kl = sample_with_path_kl(velocity, teacher, cond[rows], noise[rows], task.sigmas())
    return float(kl.mean())


def test_a_student_distilled_from_two_teachers_moves_toward_each_on_its_classes(teachers, tmp_path):
    """Three epochs of opd (every class in each rollout) bring the student's path KL to each teacher, on that
    teacher's classes, well below the base's (measured over seeds 0-3: to 0.35-0.51 of it; the test asks for 0.7)."""
    overrides = [*student_overrides(teachers, 3), "prompts_per_epoch=10"]
    run = train(load_config("opd", overrides=overrides), tmp_path / "student", progress=False)
    rows = run.rows()
    assert rows[-1]["teacher_kl"] < rows[0]["teacher_kl"]
    student, task = velocity_of(run.path)
    policy = student.func

    def base(x, sigma, cond):
        with adapters_disabled(policy):
            return policy(x, sigma, cond)

    for run_dir, classes in zip(teachers, ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9]), strict=True):
        teacher, _ = velocity_of(run_dir)
        before, after = path_kl(base, teacher, task, classes), path_kl(student, teacher, task, classes)
        assert after < 0.7 * before, (run_dir.name, before, after)


def test_an_opd_run_resumes_exactly(teachers, tmp_path):
    overrides = [*student_overrides(teachers, 2), "checkpoint_every=1"]
    whole = train(load_config("opd", overrides=overrides), tmp_path / "whole", progress=False)
    copy = tmp_path / "resumed"
    shutil.copytree(whole.path, copy)
    shutil.rmtree(copy / "checkpoints" / "epoch_000002")
    shutil.rmtree(copy / "final")
    resumed = train(load_config("opd", overrides=overrides), copy, resume=True, progress=False)
    drop = {"time_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.rows()] == [
        {k: v for k, v in r.items() if k not in drop} for r in whole.rows()
    ]


def refused(capsys, out, *overrides):
    """``flowdppo train --method opd`` with ``overrides``: exit 2, one line, nothing written at ``out``."""
    code = main(["train", "--no-progress", "--method", "opd", "--out", str(out), *TINY, "epochs=1", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and not out.exists(), err
    return err.removeprefix("flowdppo: error: ")


def test_refusals_are_one_line_and_leave_nothing(teachers, tmp_path, capsys):
    out = tmp_path / "student"
    assert refused(capsys, out).startswith("opd.teachers: opd distils one or more teachers")
    assert refused(capsys, out, f"opd.teachers=[{tmp_path / 'nowhere'}]").startswith(
        "opd.teachers: no such run folder or LoRA file"
    )
    unfinished = tmp_path / "unfinished"
    shutil.copytree(teachers[0], unfinished)
    shutil.rmtree(unfinished / "final")
    assert refused(capsys, out, f"opd.teachers=[{unfinished}]").startswith(
        f"opd.teachers: {unfinished} has no final adapter ({unfinished}/final/pytorch_lora_weights.safetensors)"
    )
    other = tmp_path / "other_latents"
    shutil.copytree(teachers[0], other)
    saved = yaml.safe_load((other / "config.yaml").read_text())
    saved["digits"]["upsample"] = 4
    (other / "config.yaml").write_text(yaml.safe_dump(saved))
    assert "has the latents of digits.upsample=4, this run digits.upsample=1" in refused(
        capsys, out, f"opd.teachers=[{other}]"
    )
    two = f"opd.teachers=[{teachers[0]},{teachers[1]}]"
    assert refused(capsys, out, two).startswith("opd.route: one entry per teacher (2 teachers, 0 entries)")
    assert refused(capsys, out, two, f'opd.route=["{LOW}","5,6,7,8"]', "prompts_per_epoch=10").startswith(
        "opd.route: the prompt '9' goes to no teacher"
    )
    assert refused(capsys, out, f"opd.teachers=[{teachers[0]}]", "sampler.kind=ode").startswith(
        "sampler.kind: opd matches per-step Gaussian transitions"
    )
    assert refused(capsys, out, f"opd.teachers=[{teachers[0]}]", "optim.lora_rank=0", "optim.fsdp=true").startswith(
        "optim.fsdp: opd keeps its teachers on an unsharded network"
    )
