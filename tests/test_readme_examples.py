"""The README's bring-your-own-data example runs as written."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def example(heading: str) -> str:
    section = README.read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_own_data_and_model_example_trains_saves_and_reloads(tmp_path):
    code = example("### Your own data and model")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "runs" / "my-vectors" / "results.json").read_text())
    assert set(results["test_metrics"]) == {"kind/accuracy", "size/mae"}
    assert len(results["epochs"]) == 2  # evaluated on the validation split each epoch
    assert result.stdout.splitlines()[-1].startswith("tensor([")  # predictions of the reloaded model
