"""Shared helpers of the benchmarks: interleaved timing and result files."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def interleaved_times(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall time of each function, alternating their order every repeat so drift hits both alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio_summary(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """min / median / max of per-repeat ratios."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}


def write_result(name: str, result: dict, out_dir: Path = RESULTS_DIR) -> Path:
    result = {
        **result,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
