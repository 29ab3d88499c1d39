"""The integration example runs as a user would run it (a subprocess, under a timeout)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "objective,extra", [("gift", []), ("gft", ["--micro-batch-tokens", "64"])], ids=["gift", "gft-packed"]
)
def test_megatron_lm_plugin_example_trains(objective, extra, tmp_path):
    env = dict(os.environ, MASTER_PORT=str(29600 + len(objective)), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "megatron_lm_plugin.py"),
            "--objective",
            objective,
            "--steps",
            "2",
            *extra,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [l for l in out.stdout.splitlines() if l.startswith("step ")]
    assert len(lines) == 2, out.stdout
    assert ("stats in_place" if objective == "gift" else "stats data") in lines[0]
    assert "nan" not in out.stdout.lower()


@pytest.mark.timeout(120)
def test_qwen3_moe_recipe_passes_validate_with_its_layout_and_memory_plan():
    """`gift-megatron validate` as a user runs it on the MoE recipe: the layout (TP 2 x DP 16, experts over EP 8
    with ETP 1, expert data parallel 4) and the per-GPU plan the recipe's header quotes."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gift_megatron.cli",
            "validate",
            os.path.join(ROOT, "examples", "qwen3-30b-a3b-gift.yaml"),
            "--world-size",
            "32",
            "--layout-only",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    plan = dict(line.split(None, 1) for line in out.stdout.splitlines()[2:] if len(line.split(None, 1)) == 2)
    assert (plan["tp"], plan["dp"], plan["ep"], plan["etp"], plan["expert_dp"]) == ("2", "16", "8", "1", "4")
    header = open(os.path.join(ROOT, "examples", "qwen3-30b-a3b-gift.yaml"), encoding="utf-8").read()
    for key, quoted in (
        ("train_states_gib", "{} GiB of model states"),
        ("train_peak_gib", "{} GiB while training"),
        ("generation_peak_gib", "{} GiB while generating"),
        ("rollout_weights_gib", "{} GiB of weights"),
    ):
        value = f"{float(plan[key]):.1f}"
        assert quoted.format(value) in " ".join(header.replace("#", " ").split()), (key, value)
