"""``flowdppo eval RUN --out FILE.json`` on the digits task: the printed measures, saved; an earlier result is kept
unless ``--overwrite``."""

from __future__ import annotations

import json

import pytest
from tiny_pipelines import digits_run

from flowdppo.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def printed_table(out: str) -> dict[str, tuple[float, float]]:
    rows = [line.split() for line in out.splitlines()[1:] if line.startswith("eval")]
    return {key: (float(base), float(trained)) for key, base, trained in rows}


def test_eval_out_saves_what_it_prints_and_keeps_an_earlier_result(tmp_path, capsys):
    run, _ = digits_run(tmp_path)
    out = tmp_path / "results" / "eval.json"
    assert main(["eval", str(run), "--per-class", "2", "--out", str(out)]) == 0
    table = printed_table(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    assert saved["per_class"] == 2 and saved["run"] == str(run.resolve())
    assert {"eval/accuracy", "eval/reward", "eval/fid", "eval/diversity"} <= table.keys()
    for key, (base, trained) in table.items():  # printed to 4 decimals
        assert saved["base"][key] == pytest.approx(base, abs=5e-5) and saved["trained"][key] == pytest.approx(
            trained, abs=5e-5
        )

    out.write_text("an earlier result")
    assert main(["eval", str(run), "--per-class", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds an earlier result; give --overwrite to replace it" in err
    assert out.read_text() == "an earlier result"  # refused before anything was sampled or written
    assert main(["eval", str(run), "--per-class", "2", "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert main(["eval", str(run), "--per-class", "2", "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["base"] == saved["base"]  # the same fixed noise: the same measures
