"""The README's library examples run as written."""

import re
from pathlib import Path

from flowdppo.losses import LOSSES


def test_readme_python_examples_run(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    first, extending, plugin = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    # the algorithm example is the plugin tests/test_new_algorithm.py trains (the file but its docstring)
    assert plugin in (Path(__file__).parent / "plugins" / "rwr_algorithm.py").read_text()
    exec(compile(first, "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("tensor(")
    namespace = {}
    try:
        exec(compile(extending, "README.md", "exec"), namespace)  # registers a loss and trains with it
    finally:
        LOSSES.pop("symmetric_mask", None)
    row = namespace["run"].rows()[-1]
    assert "ratio_mean" not in row and 0 <= row["masked_fraction"] <= 1  # the new loss's metrics, not DPPO's
    assert namespace["cfg"].loss.loss_mode == "symmetric_mask"
