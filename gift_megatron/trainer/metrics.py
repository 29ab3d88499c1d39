"""Observability: metrics to JSONL, TensorBoard and (when asked) W&B, a progress bar, and the run's plots.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per step (``{"step": k, "reward/mean": ...}``);
after a resume the lines of steps past the checkpoint are dropped first, so the file always describes one
consistent history.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

METRICS_FILE = "metrics.jsonl"

# (file name, title, metric keys, y label) of each plot; plots without data are left out.
PANELS = (
    ("reward", "reward", ("rollout/reward_mean", "eval/reward"), "reward"),
    ("loss", "loss", ("loss",), "loss"),
    ("kl", "KL to the reference", ("kl/reference",), "nats / response"),
    ("response_length", "response length", ("response/length_mean",), "tokens"),
    ("gift_beta", "GIFT beta(x) = std(R) / std(u)", ("gift/beta_x_mean", "gift/beta_x_median"), "beta(x)"),
)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """Every record of ``run_dir/metrics.jsonl`` (a truncated last line from a killed job is skipped)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a gift-megatron run directory?)")
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsLogger:
    """Writes step metrics on rank 0 (every other rank gets a logger that does nothing).

    Args:
        run_dir: the run's output directory.
        enabled: False on every rank but 0.
        resume_step: drop records of steps > resume_step already in the file (None: start a new file).
        tensorboard: also write TensorBoard events to ``run_dir/tensorboard``.
        wandb_project: also log to W&B (needs ``wandb`` installed; an error names the missing package).
        total_steps, progress: a tqdm bar showing step, reward, loss and throughput, when stderr is a
            terminal. Otherwise (a SLURM log file, ``progress=False``) each logged training step is one plain
            line on stdout: carriage-return bars in a file are one endless line.
        demo_members: the trained members include demonstrations (GFT's experts and teachers, SFT's
            expert), so the line shows the trained-member reward (``reward/mean``) next to the rollout
            reward (``rollout/reward_mean``): the two differ, and one number labelled "reward" misleads.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        enabled: bool,
        resume_step: int | None = None,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        config: dict | None = None,
        total_steps: int = 0,
        initial_step: int = 0,
        progress: bool = True,
        demo_members: bool = False,
        interactive: bool | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._tb = self._wandb = self._bar = None
        self.total_steps, self.demo_members = total_steps, demo_members
        self._t0, self._step0 = time.monotonic(), initial_step
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._truncate(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=initial_step + 1)
        if wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("run.wandb_project is set but wandb is not installed (pip install wandb)") from exc
            self._wandb = wandb.init(
                project=wandb_project,
                config=config,
                dir=run_dir,
                resume="allow",
                name=os.path.basename(os.path.abspath(run_dir)),
            )
        if interactive is None:
            interactive = sys.stderr.isatty()
        if progress and interactive:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def _truncate(self, resume_step: int | None) -> None:
        if not os.path.isfile(self.path):
            return
        if resume_step is None:
            os.replace(self.path, self.path + ".old")
            return
        kept = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    continue  # the half-written line of a killed job
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._bar is not None:
            shown = {k: f"{v:.4g}" for k, v in self.shown(metrics).items()}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.n = step
            self._bar.refresh()
        elif "loss" in metrics:  # a training step (not step 0's evaluation): one plain line
            print(self.line(step, metrics), flush=True)

    def shown(self, metrics: dict[str, float]) -> dict[str, float]:
        """The numbers of a progress line, labelled by whose they are."""
        out = {"rollout reward": metrics.get("rollout/reward_mean")}
        if self.demo_members:
            out["trained-member reward"] = metrics.get("reward/mean")
        out.update(
            {
                "eval reward": metrics.get("eval/reward"),
                "loss": metrics.get("loss"),
                "tok/s": metrics.get("perf/tokens_per_s"),
            }
        )
        return {k: v for k, v in out.items() if v is not None}

    def line(self, step: int, metrics: dict[str, float]) -> str:
        """``step 4/12 | rollout reward 0.266 | loss 0.82 | tok/s 2905 | 0.71 s/step | eta 0:00:06``."""
        parts = [f"step {step}/{self.total_steps}"]
        fmt = {"loss": "{:.4g}", "tok/s": "{:.0f}"}
        parts += [f"{k} " + fmt.get(k, "{:.3f}").format(v) for k, v in self.shown(metrics).items()]
        done = step - self._step0
        if done > 0:
            per_step = (time.monotonic() - self._t0) / done
            parts.append(f"{per_step:.2f} s/step")
            parts.append(f"eta {_hms(per_step * max(self.total_steps - step, 0))}")
        return " | ".join(parts)

    def write(self, text: str) -> None:
        """A line of text that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def first_eval_record(run_dir: str) -> tuple[int, float] | None:
    """(step, eval/reward) of the earliest evaluation in ``run_dir/metrics.jsonl``: the run's real start,
    also after a resume (the file keeps the records up to the checkpoint)."""
    try:
        records = read_metrics(run_dir)
    except FileNotFoundError:
        return None
    evals = [(r["step"], r["eval/reward"]) for r in records if r.get("eval/reward") is not None and "step" in r]
    return min(evals) if evals else None


class DegenerateGroupsWatch:
    """Warns when every group of ``patience`` steps in a row had equal rewards for all its members
    (``groups/degenerate_frac == 1``): group-relative objectives then have no learning signal at all, the
    run only spends compute. One warning per streak.

        watch = DegenerateGroupsWatch(5)
        text = watch.update(step, metrics)   # None, or the warning once the streak reaches 5 steps
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.streak: list[int] = []
        self.warned = False

    def update(self, step: int, metrics: dict[str, float]) -> str | None:
        frac = metrics.get("groups/degenerate_frac")
        if frac is None or self.patience <= 0:
            return None
        if frac < 1.0:
            self.streak, self.warned = [], False
            return None
        self.streak.append(step)
        if len(self.streak) < self.patience or self.warned:
            return None
        self.warned = True
        reward = metrics.get("reward/mean")
        same = f" (mean reward {reward:.3f})" if reward is not None else ""
        return (
            f"warning: nothing is learning: in each of the last {len(self.streak)} steps "
            f"({self.streak[0]}-{self.streak[-1]}) every group's rewards were all equal{same} "
            "(groups/degenerate_frac = 1), so group-relative advantages are zero. The task may be too hard "
            "or too easy for the policy, or the reward constant: check the reward function and the data, "
            "or raise rollout.n / rollout.temperature"
        )


def _series(records: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get(key) is not None:
            xs.append(r["step"])
            ys.append(r[key])
    return xs, ys


def _draw(ax: Any, title: str, series: Sequence[tuple], ylabel: str, legend: bool = False) -> None:
    """series: (label, xs, ys) or (label, xs, ys, style kwargs for ax.plot)."""
    for label, xs, ys, *style in series:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label, **(style[0] if style else {}))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1 or legend:
        ax.legend(fontsize=7)


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """PNG plots of reward, loss, KL to the reference, response length and GIFT's beta(x) over steps, from
    ``run_dir/metrics.jsonl``; one file per panel plus ``summary.png``. Returns the files written."""
    records = read_metrics(run_dir)
    panels = [(f, t, [(k, *_series(records, k)) for k in keys], yl) for f, t, keys, yl in PANELS]
    panels = [(f, t, [s for s in series if s[1]], yl) for f, t, series, yl in panels]
    panels = [p for p in panels if p[2]]
    if not panels:
        raise ValueError(f"{os.path.join(run_dir, METRICS_FILE)}: no plottable metrics")
    return _write_panels(panels, out_dir or os.path.join(run_dir, "plots"))


def run_label(run_dir: str, name: str | None = None) -> str:
    """``NAME (OBJECTIVE)`` for a legend: the run directory's name and the objective of its resolved
    ``config.yaml`` (with GIFT's reference, which changes its behaviour the most)."""
    import yaml

    name = name or os.path.basename(os.path.normpath(run_dir))
    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path, encoding="utf-8") as fh:
            objective = (yaml.safe_load(fh) or {}).get("objective") or {}
    except (OSError, yaml.YAMLError):
        return f"{name} (objective unknown: no readable config.yaml)"
    label = str(objective.get("name", "?"))
    reference = (objective.get("options") or {}).get("reference")
    if label == "gift" and reference:
        label += f", reference {reference}"
    return f"{name} ({label})"


def plot_runs(run_dirs: list[str], out_dir: str) -> list[str]:
    """The panels of :func:`plot_run` with several runs overlaid: one colour per run (legend: its name and
    objective, see :func:`run_label`), one line style per metric of a panel. Runs lacking a metric are
    left out of that panel. Returns the files written to ``out_dir``."""
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    # Two runs with the same directory name (runs/a/x, runs/b/x) get their paths as names instead.
    names = [d if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]
    runs = [(run_label(d, n), read_metrics(d)) for d, n in zip(run_dirs, names)]
    styles = ("-", "--", ":", "-.")
    panels = []
    for file, title, keys, ylabel in PANELS:
        series = []
        for i, (label, records) in enumerate(runs):
            for j, key in enumerate(keys):
                xs, ys = _series(records, key)
                if xs:
                    text = label if len(keys) == 1 else f"{label} {key}"
                    series.append((text, xs, ys, {"color": f"C{i % 10}", "linestyle": styles[j % len(styles)]}))
        if series:
            panels.append((file, title, series, ylabel))
    if not panels:
        raise ValueError(f"no plottable metrics in any of {', '.join(run_dirs)}")
    return _write_panels(panels, out_dir, legend=True)


def _write_panels(panels: Sequence[tuple], out_dir: str, legend: bool = False) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # headless: cluster nodes and CI have no display
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (file, title, series, ylabel) in zip(axes[0], panels):
        _draw(ax, title, series, ylabel, legend)
        single, sax = plt.subplots(figsize=(5, 3.5))
        _draw(sax, title, series, ylabel, legend)
        name = os.path.join(out_dir, file + ".png")
        single.tight_layout()
        single.savefig(name, dpi=110)
        plt.close(single)
        written.append(name)
    fig.tight_layout()
    summary = os.path.join(out_dir, "summary.png")
    fig.savefig(summary, dpi=110)
    plt.close(fig)
    return written + [summary]
