"""Training cost per epoch of each method on the digits task: time, measured in turn in one process, and the
trained elements and optimizer steps of an update (machine-independent: they follow from the method's settings).

Each repeat trains every method for a few epochs (default config, its preset) in an alternating order
and takes the median of the rows' ``time_s`` (rollout + rewards + update; evaluation excluded). Ratios
to Flow-DPPO are per repeat, so a slow spell of the machine hits all methods alike.

    python benchmarks/method_cost.py [--repeats 3] [--epochs 3] [--methods flow_dppo,flow_grpo,...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import RESULTS_DIR, ratio_summary, write_result

from flowdppo.config import load_config
from flowdppo.trainer import train

METHODS = "flow_dppo,flow_grpo,grpo_guard,dance_grpo,diffusion_nft,awm"


def epoch_cost(method: str, epochs: int, folder: Path) -> tuple[float, float, float]:
    """(median seconds, trained elements, optimizer steps) per epoch of ``method``."""
    cfg = load_config(
        method, overrides=[f"epochs={epochs}", "eval_every=1000", "eval_samples_per_class=2", "checkpoint_every=1000"]
    )
    rows = train(cfg, folder / method, overwrite=True, progress=False).rows()
    return tuple(
        statistics.median(row[key] for row in rows) for key in ("time_s", "trained_elements", "optimizer_steps")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    methods = args.methods.split(",")
    times: dict[str, list[float]] = {m: [] for m in methods}
    counts: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for method in methods if i % 2 == 0 else methods[::-1]:
                seconds, *counts[method] = epoch_cost(method, args.epochs, Path(tmp))
                times[method].append(seconds)
    reference = methods[0]
    result = {
        "seconds_per_epoch": {m: statistics.median(t) for m, t in times.items()},
        f"ratio_to_{reference}": {m: ratio_summary(t, times[reference]) for m, t in times.items()},
        "trained_elements_per_epoch": {m: counts[m][0] for m in methods},
        "optimizer_steps_per_epoch": {m: counts[m][1] for m in methods},
        "epochs": args.epochs,
        "repeats": args.repeats,
    }
    for m in methods:
        r = result[f"ratio_to_{reference}"][m]
        print(
            f"{m:>14}: {result['seconds_per_epoch'][m]:.2f} s/epoch, {r['median']:.2f}x {reference} "
            f"(min {r['min']:.2f}, max {r['max']:.2f}); {counts[m][0]:,.0f} trained elements, "
            f"{counts[m][1]:.0f} optimizer steps"
        )
    print(f"wrote {write_result('method_cost', result, args.out)}")


if __name__ == "__main__":
    main()
