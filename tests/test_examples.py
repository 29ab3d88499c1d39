"""The integration example runs as a user would run it (a subprocess, under a timeout)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("objective,extra", [("gift", []), ("gft", ["--micro-batch-tokens", "64"])],
                         ids=["gift", "gft-packed"])
def test_megatron_lm_plugin_example_trains(objective, extra, tmp_path):
    env = dict(os.environ, MASTER_PORT=str(29600 + len(objective)), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "megatron_lm_plugin.py"),
                          "--objective", objective, "--steps", "2", *extra], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [l for l in out.stdout.splitlines() if l.startswith("step ")]
    assert len(lines) == 2, out.stdout
    assert ("stats in_place" if objective == "gift" else "stats data") in lines[0]
    assert "nan" not in out.stdout.lower()
