"""``gift-megatron plot A B ... --out DIR``: several runs overlaid, each named with its objective."""

from __future__ import annotations

import json
import os

import matplotlib.figure
import pytest
import yaml

from gift_megatron import cli
from gift_megatron.trainer.metrics import plot_runs, run_label


def _run(path, objective, options, rewards):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as fh:
        for step, r in enumerate(rewards, 1):
            fh.write(
                json.dumps(
                    {
                        "step": step,
                        "rollout/reward_mean": r,
                        "loss": 1.0 / step,
                        **({"gift/beta_x_mean": 2.0} if objective == "gift" else {}),
                    }
                )
                + "\n"
            )
    with open(os.path.join(path, "config.yaml"), "w") as fh:
        yaml.safe_dump({"objective": {"name": objective, "options": options}}, fh)
    return str(path)


@pytest.fixture
def legends(monkeypatch):
    """Legend texts of every figure saved, keyed by file name."""
    seen = {}
    original = matplotlib.figure.Figure.savefig

    def savefig(fig, fname, *args, **kwargs):
        seen[os.path.basename(str(fname))] = [
            [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else [] for ax in fig.axes
        ]
        return original(fig, fname, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return seen


def test_plot_overlays_runs_with_name_and_objective(tmp_path, legends, capsys):
    a = _run(tmp_path / "gift-rollout", "gift", {"reference": "rollout"}, [0.1, 0.3, 0.6])
    b = _run(tmp_path / "grpo-base", "grpo", {}, [0.1, 0.2, 0.25, 0.3])
    out = tmp_path / "compare"
    assert cli.main(["plot", a, b, "--out", str(out)]) == 0
    files = capsys.readouterr().out.split()
    assert sorted(os.path.basename(f) for f in files) == ["gift_beta.png", "loss.png", "reward.png", "summary.png"]
    for f in files:
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    reward = legends["reward.png"][0]
    assert "gift-rollout (gift, reference rollout) rollout/reward_mean" in reward
    assert "grpo-base (grpo) rollout/reward_mean" in reward
    assert legends["loss.png"][0] == ["gift-rollout (gift, reference rollout)", "grpo-base (grpo)"]
    assert legends["gift_beta.png"][0] == ["gift-rollout (gift, reference rollout) gift/beta_x_mean"]  # grpo has none


def test_plot_overlay_errors_and_labels(tmp_path, capsys):
    a = _run(tmp_path / "x" / "run", "gft", {}, [0.1])
    b = _run(tmp_path / "y" / "run", "dapo", {}, [0.2])
    assert cli.main(["plot", a, b]) == 2
    assert "--out DIR is required with several run directories" in capsys.readouterr().err
    # same directory name twice: the paths tell them apart
    files = plot_runs([a, b], str(tmp_path / "o"))
    assert files and run_label(a, a) == f"{a} (gft)"
    os.remove(os.path.join(b, "config.yaml"))
    assert run_label(b) == "run (objective unknown: no readable config.yaml)"
    assert cli.main(["plot", a, str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no metrics" in capsys.readouterr().err
