"""How far the recorded reference rows (tests/data/reference_rows.json) move across CPU kernel paths and threads.

Each setting runs every reference case in a fresh process: the default kernels, the AVX2 and SSE paths of ATen,
MKL and oneDNN, and MKL's compatible path (what another CPU would run), each at 1 and 2 threads. Prints, per metric,
the largest relative and absolute difference from the recorded rows and the largest fraction of the test's
tolerance used, and writes benchmarks/results/reference_spread.json. The tolerance in tests/test_reference_rows.py
is set from these figures.

    python benchmarks/reference_spread.py            # ~10 minutes on 2 cores
    python benchmarks/reference_spread.py --threads 1 --settings avx2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402
from test_reference_rows import NEW_KEYS, REFERENCE, row_tolerance  # noqa: E402

SETTINGS = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"},
    "sse": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "DNNL_MAX_CPU_ISA": "SSE41"},
    "mkl_compatible": {"MKL_CBWR": "COMPATIBLE"},  # MKL's conditional-reproducibility code path
}
CHILD = """
import json, sys, tempfile, torch
from pathlib import Path
from flowdppo.config import load_config
from flowdppo.trainer import train
torch.set_num_threads(int(sys.argv[1]))
cases = json.loads(Path(sys.argv[2]).read_text())
rows = {}
for name, case in cases.items():
    with tempfile.TemporaryDirectory() as folder:
        rows[name] = train(load_config(case["method"], overrides=case["overrides"]), Path(folder) / "run",
                           progress=False).rows()
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}))
"""


def run_setting(env: dict[str, str], threads: int) -> dict:
    """The reference cases' rows in a fresh process under ``env`` with ``threads`` intra-op threads."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as cases:
        json.dump(REFERENCE, cases)
        cases.flush()
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(threads), cases.name],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return json.loads(out.splitlines()[-1])


def spread(rows: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Per metric: largest relative and absolute difference from the recorded rows, and of the tolerance used."""
    worst: dict[str, dict[str, float]] = {}
    for name, case in REFERENCE.items():
        for recorded, got in zip(case["rows"], rows[name], strict=True):
            for key, want in recorded.items():
                if key in NEW_KEYS or not isinstance(want, float):
                    continue
                diff = abs(got[key] - want)
                rel, atol = row_tolerance(key, recorded)
                allowed = max(rel * abs(want), atol)
                entry = worst.setdefault(key, {"rel": 0.0, "abs": 0.0, "of_tolerance": 0.0})
                entry["rel"] = max(entry["rel"], diff / abs(want) if want else (math.inf if diff else 0.0))
                entry["abs"] = max(entry["abs"], diff)
                entry["of_tolerance"] = max(entry["of_tolerance"], diff / allowed if allowed else 0.0)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    args = parser.parse_args()
    results = {}
    for setting in args.settings:
        for threads in args.threads:
            got = run_setting(SETTINGS[setting], threads)
            worst = spread(got["rows"])
            tag = f"{setting}/{threads}t ({got['capability']})"
            results[tag] = worst
            used = max(w["of_tolerance"] for w in worst.values())
            print(f"{tag:<24} largest share of the tolerance used: {used:.3f}")
    print(f"\n{'metric':<28} {'max rel':>9} {'max abs':>9} {'of tol':>7}")
    for key in sorted({k for worst in results.values() for k in worst}):
        rel = max(w[key]["rel"] for w in results.values())
        diff = max(w[key]["abs"] for w in results.values())
        used = max(w[key]["of_tolerance"] for w in results.values())
        print(f"{key:<28} {rel:>9.2e} {diff:>9.2e} {used:>7.3f}")
    print(f"wrote {write_result('reference_spread', {'settings': results})}")


if __name__ == "__main__":
    main()
