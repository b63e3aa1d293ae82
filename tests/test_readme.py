"""The README's code runs, and CI runs exactly the README's test command."""

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    lstm = namespace["lstm"]
    assert all(not g.any() for g in lstm.grads.values())  # zero_grad ran after the step
    assert np.isfinite(namespace["loss"])
    assert np.isfinite(namespace["dx"]).all()
    assert namespace["h"].shape == (1, 64) and np.isfinite(namespace["h"]).all()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    test_command = next(c.strip() for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    install_and_bench = next(c.strip() for c in commands if "fastseq bench" in c)
    assert install_and_bench.startswith("python3 -m venv .venv && .venv/bin/pip install .")
