"""What a person reads: a short 2-rank run's console in a log file (no terminal), the one-line start-up
error, the degenerate-groups warning and the reward labels of the progress line.

One real run (GFT, 4 steps, log_interval 2) serves several assertions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from gift_megatron.trainer.metrics import DegenerateGroupsWatch, MetricsLogger
from tests.test_train_e2e import CONFIG, ROOT, data_overrides, torchrun, toy_task  # noqa: F401 (fixture)

PY = sys.executable
# What third-party noise looks like: Python warnings ("...py:25: UserWarning: ..." and the source line
# "  warnings.warn("), torch's rank-prefixed log records ("[rank0]:W1207 ..."), Megatron's log lines.
NOISE = re.compile(
    r"Warning:|warnings\.warn|^\[rank\d+\]:[WE]\d|DEPRECATED|deprecated|Apex|Transformer Engine"
    r"|No CUDA runtime|MimoModelConfig|full_param_layout",
    re.M,
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "GIFT_MEGATRON_SHOW_WARNINGS"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")  # the workers import this checkout
    return env


@pytest.fixture(scope="module")
def gft_run(toy_task, tmp_path_factory):
    """A 2-rank GFT run under plain torchrun with stdout and stderr going to pipes (not a terminal)."""
    run = str(tmp_path_factory.mktemp("console") / "run")
    args = data_overrides(toy_task) + [
        f"run.output_dir={run}",
        "train.steps=4",
        "run.log_interval=2",
        "run.save_interval=0",
        "train.eval_interval=0",
        "train.eval_prompts=8",
        "run.plots=false",
        "objective.name=gft",
        "objective.options={}",
        "train.prompts_per_step=4",
        "rollout.n=4",
        "run.progress=true",
    ]
    proc = subprocess.run(
        torchrun(args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, start_new_session=True
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return run, proc


@pytest.mark.timeout(360)
def test_a_short_run_prints_plain_lines_and_a_summary_without_third_party_noise(gft_run):
    run, proc = gft_run
    out, err = proc.stdout, proc.stderr
    print(f"\n2-rank 4-step run: {len(out.splitlines())} stdout + {len(err.splitlines())} stderr lines")
    assert not NOISE.search(out + err), (out, err)
    assert err.strip() == "", err  # nothing at all on stderr: no warnings, no progress bar
    assert "\r" not in out  # a log file gets lines, not carriage-return bars (run.progress=true here)
    lines = out.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split(" |")[0] for s in steps] == ["step 2/4", "step 4/4"], lines  # every run.log_interval steps
    records = {r["step"]: r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))}
    # The progress line says whose reward it shows: GFT trains on experts and teachers too.
    for line, step in zip(steps, (2, 4)):
        assert f"rollout reward {records[step]['rollout/reward_mean']:.3f}" in line, line
        assert f"trained-member reward {records[step]['reward/mean']:.3f}" in line, line
        assert re.search(r"loss \S+ \| tok/s \d+ \| [\d.]+ s/step \| eta \d+:\d\d:\d\d$", line), line
    # The summary: output dir, last checkpoint, steps run, elapsed time, eval reward from start to end.
    done = lines.index(next(line for line in lines if line.startswith("done:")))
    summary = "\n".join(lines[done:])
    assert re.match(r"done: step 4/4 \(4 steps this job\) in 0:\d\d:\d\d\n", summary), summary
    assert f"output dir:      {os.path.abspath(run)}" in summary
    assert f"last checkpoint: {os.path.join(run, 'checkpoints', 'step_00000004')}" in summary
    assert (
        f"eval reward:     {records[0]['eval/reward']:.3f} at step 0 -> {records[4]['eval/reward']:.3f} at step 4"
    ) in summary
    assert len(lines) == 1 + 2 + 4, lines  # start, two step lines, four summary lines


@pytest.mark.timeout(200)
def test_a_start_up_error_is_one_line_from_the_launcher(toy_task, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+2=", "answer": "3"}\n{"answer": "4"}\n')
    proc = subprocess.run(
        [
            PY,
            "-m",
            "gift_megatron.train",
            CONFIG,
            "--nproc-per-node",
            "2",
            *data_overrides(toy_task),
            f"run.output_dir={tmp_path / 'r'}",
            f"data.train_files=[{bad}]",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr  # the error (rank 0 only) and the launcher's line
    assert lines[0].startswith("error: ") and f"{bad}:2: needs 'prompt' or 'messages'" in lines[0], lines
    assert lines[1].startswith("error: training stopped: 2 of 2 rank(s) failed") and "exited with code 2" in lines[1]
    assert proc.stdout == ""


def test_show_warnings_switch_and_environment_variable():
    """Quiet by default; GIFT_MEGATRON_SHOW_WARNINGS=1 (and run.show_warnings, through configure) shows them."""
    code = (
        "import logging, warnings; from gift_megatron import console; console.configure(); "
        "warnings.warn_explicit('LOUD-WARNING', UserWarning, 'megatron/core/x.py', 1, module='megatron.core.x'); "
        "logging.getLogger('megatron.core.x').warning('LOUD-LOG'); "
        "console.configure(show_warnings=True); "
        "logging.getLogger('megatron.core.y').warning('SHOWN-LOG')"
    )
    quiet = subprocess.run([PY, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0, quiet.stderr
    assert "LOUD" not in quiet.stderr and "SHOWN-LOG" in quiet.stderr, quiet.stderr
    loud = subprocess.run(
        [PY, "-c", code],
        cwd=ROOT,
        env=_env(GIFT_MEGATRON_SHOW_WARNINGS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "LOUD-WARNING" in loud.stderr and "LOUD-LOG" in loud.stderr, loud.stderr


def test_degenerate_groups_warn_once_per_streak():
    watch = DegenerateGroupsWatch(3)
    said = [watch.update(s, {"groups/degenerate_frac": 1.0, "reward/mean": 0.0}) for s in range(1, 6)]
    assert said[:2] == [None, None] and said[3:] == [None, None]
    assert "nothing is learning" in said[2] and "last 3 steps (1-3)" in said[2] and "mean reward 0.000" in said[2]
    assert watch.update(6, {"groups/degenerate_frac": 0.5}) is None  # the streak ends ...
    said = [watch.update(s, {"groups/degenerate_frac": 1.0}) for s in (7, 8, 9)]
    assert said[:2] == [None, None] and "(7-9)" in said[2]  # ... and a new one warns again
    assert DegenerateGroupsWatch(0).update(1, {"groups/degenerate_frac": 1.0}) is None
    assert DegenerateGroupsWatch(1).update(1, {"loss": 0.0}) is None  # objectives without groups


def test_reward_labels_and_plain_lines_without_a_terminal(tmp_path, capsys):
    metrics = {"rollout/reward_mean": 0.0, "reward/mean": 0.375, "loss": 0.5, "perf/tokens_per_s": 1000.0}
    gft = MetricsLogger(
        str(tmp_path / "a"),
        enabled=True,
        tensorboard=False,
        total_steps=10,
        progress=True,
        demo_members=True,
        interactive=False,
    )
    assert gft._bar is None  # no terminal: no bar, even with progress=True
    gft.log(1, metrics)
    line = capsys.readouterr().out.strip()
    assert line.startswith("step 1/10 | rollout reward 0.000 | trained-member reward 0.375 | loss 0.5"), line
    gift = MetricsLogger(
        str(tmp_path / "b"), enabled=True, tensorboard=False, total_steps=10, progress=False, interactive=True
    )
    gift.log(1, metrics)
    line = capsys.readouterr().out.strip()
    assert "rollout reward 0.000" in line and "trained-member" not in line, line  # progress=false: lines too
    bar = MetricsLogger(
        str(tmp_path / "c"), enabled=True, tensorboard=False, total_steps=10, progress=True, interactive=True
    )
    assert bar._bar is not None
    bar.log(1, metrics)
    bar.close()
    assert capsys.readouterr().out == ""  # the terminal gets the bar (on stderr), not lines


def test_only_start_up_errors_are_one_line(monkeypatch, capsys):
    """A StartupError (or a subclass) from train() is one line and exit code 2; any other exception, a
    ValueError from a bug mid-run included, propagates with its traceback."""
    import gift_megatron.trainer as trainer_pkg
    from gift_megatron import cli
    from gift_megatron.data import DatasetError
    from gift_megatron.errors import StartupError

    monkeypatch.delenv("GIFT_MEGATRON_TRACEBACK", raising=False)
    # main(["train", ...]) quiets third-party warnings for its process: give them back to pytest after.
    monkeypatch.setattr("gift_megatron.console.configure", lambda show_warnings=None: None)
    for exc in (StartupError("data.tokenizer: /nowhere does not exist"), DatasetError("train.jsonl:3: bad row")):

        def fail(cfg, exc=exc):
            raise exc

        monkeypatch.setattr(trainer_pkg, "train", fail)
        assert cli.main(["train", CONFIG]) == 2
        err = capsys.readouterr().err
        assert str(exc) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    def bug(cfg):
        raise ValueError("step 500: shapes [3] and [4] do not match")

    monkeypatch.setattr(trainer_pkg, "train", bug)
    with pytest.raises(ValueError, match="step 500"):
        cli.main(["train", CONFIG])
