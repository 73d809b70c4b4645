"""The per-update mechanism test: what DPPO's mask and GRPO's clip would drop, the ratio's sign vs the mean shift."""

import json
import math

import pytest
import torch

from flowdppo import mechanism as mech
from flowdppo.cli import main
from flowdppo.config import load_config
from flowdppo.losses import StepBatch
from flowdppo.outputs import OUTPUT_FILES
from flowdppo.sde import gaussian_kl, log_prob

TAU, EPS = 1e-5, 1e-4
# A, log rho, D, shift, dim * D; what DPPO (tau 1e-5) and GRPO (eps 1e-4) drop, and whether the signs disagree
ELEMENTS = [
    (1.0, 2e-4, 2e-5, 1.0, 5e-5),  # both drop (bin 0: below 1e-4)
    (1.0, 5e-5, 2e-5, -1.0, 1e-4),  # DPPO only (rho inside 1 + eps); disagrees (bin 1 starts at 1e-4)
    (1.0, 2e-4, 5e-6, 1.0, 0.5),  # GRPO only (D below tau) (bin 8: [10^-0.5, 1))
    (-1.0, -2e-4, 2e-5, -1.0, 20.0),  # both drop (last bin: from 10 up)
    (-1.0, 2e-4, 2e-5, -1.0, 20.0),  # neither: a corrective move (rho > 1 with A < 0); disagrees
    (0.0, 2e-4, 1.0, 1.0, 0.5),  # A = 0: neither
    (-1.0, -5e-5, 5e-6, 1.0, 0.5),  # neither (inside both); disagrees
]


def columns(rows):
    return [torch.tensor(col, dtype=torch.float64) for col in zip(*rows, strict=True)]


def test_counts_of_a_constructed_batch():
    record = mech.summary(mech.counts(*columns(ELEMENTS), TAU, EPS), TAU, EPS)
    # table[sign][DPPO drops][GRPO drops]
    assert record["table"] == {"pos": [[0, 1], [1, 1]], "neg": [[2, 0], [0, 1]], "zero": [[1, 0], [0, 0]]}
    assert record["elements"] == 7 and record["nonfinite"] == 0
    elements = [0] * mech.BINS
    disagree = [0] * mech.BINS
    for bin_, wrong in ((0, 0), (1, 1), (8, 0), (11, 0), (11, 1), (8, 0), (8, 1)):
        elements[bin_] += 1
        disagree[bin_] += wrong
    assert record["bins"] == {"elements": elements, "disagree": disagree}
    assert mech.as_vector(record) == mech.counts(*columns(ELEMENTS), TAU, EPS).tolist()
    bad = columns([*ELEMENTS, (1.0, math.nan, 1.0, 1.0, 1.0)])
    assert mech.summary(mech.counts(*bad, TAU, EPS), TAU, EPS)["nonfinite"] == 1


def test_sign_disagreement_on_constructed_gaussians():
    # dim 4, std 1, mean moved by 0.1 on the first coordinate: D = 0.01 / 4 / 2, shift = x_0 * 0.1 / 4
    mean_old = torch.zeros(3, 4)
    mean_new = torch.tensor([[0.1, 0, 0, 0]] * 3)
    x_next = torch.tensor([[0.04, 0, 0, 0], [1.0, 0, 0, 0], [-1.0, 0, 0, 0]])
    std = torch.ones(3)
    shift = mech.mean_shift(x_next, mean_old, mean_new, std)
    assert shift.tolist() == pytest.approx([0.001, 0.025, -0.025])
    log_ratio = log_prob(x_next, mean_new, std.view(3, 1)) - log_prob(x_next, mean_old, std.view(3, 1))
    d = gaussian_kl(mean_new, mean_old, std.view(3, 1))
    assert log_ratio.tolist() == pytest.approx((shift - d).tolist(), abs=1e-7)  # log rho = shift / s - D
    # towards the sample by less than D: the ratio says "away"; the other two agree
    assert mech.sign_disagrees(log_ratio, shift).tolist() == [True, False, False]


def test_null_disagreement_is_the_rate_of_a_pure_noise_shift():
    gen = torch.Generator().manual_seed(0)
    dim, n, d = 64, 20_000, 0.02  # dim * D = 1.28
    delta = torch.full((n, dim), math.sqrt(2 * d))  # mean(delta^2) / 2 = D at std 1
    x_next = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    std = torch.ones(n, 1, dtype=torch.float64)
    log_ratio = log_prob(x_next, delta, std) - log_prob(x_next, torch.zeros_like(delta), std)
    shift = mech.mean_shift(x_next, torch.zeros_like(delta), delta, std.flatten())
    rate = mech.sign_disagrees(log_ratio, shift).double().mean().item()
    assert rate == pytest.approx(mech.null_disagreement(dim * d), abs=0.012)
    assert mech.null_disagreement(0.0) == 0 and mech.null_disagreement(1e6) == pytest.approx(0.5)


def random_elements(n, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=gen).round()
    log_dim_kl = 6 * torch.rand(n, generator=gen) - 5  # dim * D from 1e-5 to 10
    return [
        a,
        3e-4 * torch.randn(n, generator=gen),
        3e-5 * torch.rand(n, generator=gen),
        torch.randn(n, generator=gen),
        10**log_dim_kl,
    ]


def test_counts_over_mini_batches_equal_the_counts_of_their_concatenation(tmp_path):
    whole = random_elements(300, 1)
    parts = [mech.counts(*(c[i : i + 64] for c in whole), TAU, EPS) for i in range(0, 300, 64)]
    assert torch.equal(sum(parts), mech.counts(*whole, TAU, EPS))
    assert mech.summary(sum(parts), TAU, EPS)["elements"] == 300
    path = tmp_path / mech.FILE
    records = [mech.summary(p, TAU, EPS) for p in parts]
    for epoch, record in enumerate(records):
        path.write_text(json.dumps(mech.with_epoch(path, epoch, record)))
    data = json.loads(path.read_text())
    assert data["total"] == mech.summary(sum(parts), TAU, EPS) and list(data["epochs"]) == ["0", "1", "2", "3", "4"]
    again = mech.with_epoch(path, 2, records[0])  # a resumed run's epoch 2 again: epochs 3, 4 were not kept
    assert list(again["epochs"]) == ["0", "1", "2"]
    assert again["total"] == mech.summary(parts[0] * 2 + parts[1], TAU, EPS)


def test_batch_counts_read_the_run_constants():
    cfg = load_config("flow_dppo").loss
    n, dim = 6, 4
    gen = torch.Generator().manual_seed(3)
    mean_old, std = torch.randn(n, dim, generator=gen), torch.full((n,), 0.5)
    mean_new = mean_old + 0.01 * torch.randn(n, dim, generator=gen)
    x_next = mean_old + 0.5 * torch.randn(n, dim, generator=gen)
    logp = [log_prob(x_next, m, std.view(n, 1)) for m in (mean_new, mean_old)]
    adv = torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0, 1.0])
    batch = StepBatch(logp[0], logp[1], adv, mean_new, mean_old, std, -0.1 * torch.ones(n), torch.zeros(n).long())
    d = gaussian_kl(mean_new, mean_old, std.view(n, 1))
    shift = mech.mean_shift(x_next, mean_old, mean_new, std)
    expected = mech.counts(adv, logp[0] - logp[1], d, shift, dim * d, cfg.kl_mask_threshold, cfg.clip_range)
    assert torch.equal(mech.batch_counts(batch, x_next, cfg), expected)


def test_a_flow_dppo_run_writes_mechanism_json_counting_every_moved_element(tmp_path):
    out = tmp_path / "run"
    tiny = ["epochs=2", "prompts_per_epoch=2", "group_size=4", "eval_every=1000", "eval_samples_per_class=2"]
    args = ["train", "--no-progress", "--method", "flow_dppo", "--out", str(out), *tiny, "optim.minibatch_size=4"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    data = json.loads((out / mech.FILE).read_text())
    assert list(data["epochs"]) == ["0", "1"] and data["dim_kl_edges"] == list(mech.DIM_KL_EDGES)
    assert mech.FILE in OUTPUT_FILES  # a run's output: --overwrite replaces it
    for row in rows:  # 8 samples x the trained steps; the first mini-batch of 4 is replayed before any step
        record = data["epochs"][str(row["epoch"])]
        moved = 8 * len(row["trained_steps"]) - 4
        assert record["elements"] + record["nonfinite"] == moved
        assert sum(record["bins"]["elements"]) == record["elements"]
        assert sum(n for rows_ in record["table"].values() for r in rows_ for n in r) == record["elements"]
        assert (record["tau"], record["clip_range"]) == (1e-5, 1e-4)
    assert data["total"]["elements"] == sum(r["elements"] for r in data["epochs"].values())


def test_the_report_renders_both_tables_from_a_synthetic_results_json(tmp_path):
    from test_compare import synthetic_results

    from flowdppo.compare_report import render_report

    results = synthetic_results(seeds=2)
    (tmp_path / "results.json").write_text(json.dumps(results))
    plain = render_report(tmp_path).read_text()
    assert "## Mechanism test" not in plain  # runs that predate it: no section
    record = mech.summary(mech.counts(*columns(ELEMENTS), TAU, EPS), TAU, EPS)
    for seed in results["arms"]["flow_dppo"]["seeds"].values():
        seed["mechanism"] = record
    (tmp_path / "results.json").write_text(json.dumps(results))
    report = render_report(tmp_path).read_text()
    assert report.split("\n## Mechanism test")[0] == plain.split("\n## Plots")[0]  # the rest as it was
    section = report.split("## Mechanism test")[1].split("## Plots")[0]
    assert "### flow_dppo" in section and "### flow_grpo" not in section
    assert "tau 1e-05, eps 0.0001; 14 moved elements over 2 seeds (0 non-finite left out)" in section
    assert "| A > 0 | keeps | 0.0% (0) | 33.3% (2) |" in section
    assert "| A > 0 | drops | 33.3% (2) | 33.3% (2) |" in section
    assert "| A < 0 | keeps | 66.7% (4) | 0.0% (0) |" in section
    assert "| A < 0 | drops | 0.0% (0) | 33.3% (2) |" in section
    assert "A = 0: 2 elements, which neither test drops." in section
    assert "| < 0.0001 | 2 | 0.0% (0) | 0.0-0.3% |" in section
    assert "| [0.0001, 0.00032) | 2 | 100.0% (2) | 0.3-0.5% |" in section
    assert "| [0.32, 1) | 6 | 33.3% (2) |" in section
    assert "| >= 10 | 4 | 50.0% (2) | 48.7-50.0% |" in section
