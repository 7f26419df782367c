"""The Python example the README quotes runs as written."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_build_models_example_runs():
    result = subprocess.run(
        [sys.executable, "examples/build_models.py"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore", "MASTER_PORT": "29517"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("v1: ") and "parameters" in line for line in lines), result.stdout
    assert any(line.startswith("v2: ") and "parameters" in line for line in lines), result.stdout
    assert "eval logits (2, 128, 512)" in result.stdout
