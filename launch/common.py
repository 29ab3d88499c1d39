"""What the SLURM and local launchers share: cluster files, environment variables, sweeps, the training
command, and the check of the training config that runs before anything is submitted.

Nothing here builds a nemo-run object except :func:`training_script`; the launchers own their executors.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# `python launch/slurm.py` puts launch/ on sys.path, not the repository: make `launch.*` and
# `gift_megatron` importable both ways (as a script and as `launch.common` from the tests).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: The training entry point every launcher runs (``gift-megatron train`` without the console script, so
#: that it works from a source checkout shipped into a container as well as from an installed package).
TRAIN_MODULE = "gift_megatron.train"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LaunchError(ValueError):
    """A launch that must not be submitted; the message names the flag, key, file or numbers at fault."""


@dataclass(frozen=True)
class TrainingJob:
    """One training run of a launch: its task name and the config overrides it runs with."""

    name: str
    overrides: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------------
# nemo-run


def import_nemo_run():
    """``nemo_run``, reporting a missing install as a LaunchError, and honouring ``NEMORUN_HOME`` as it is
    now: nemo-run reads it once at import, so a process that changes it later (tests) would otherwise write
    into the first value. Its console goes to stderr so that a dry run's stdout is the scripts alone."""
    try:
        import nemo_run
        from nemo_run.config import set_nemorun_home
        from nemo_run.core.frontend.console.api import CONSOLE
    except ImportError as exc:
        raise LaunchError(
            f"nemo-run is not importable ({exc}); install it with `pip install -e .[launch]` "
            "(nemo-run 0.11 also needs leptonai<0.47)"
        ) from exc
    if os.environ.get("NEMORUN_HOME"):
        set_nemorun_home(os.environ["NEMORUN_HOME"])
    CONSOLE.file = sys.stderr
    return nemo_run


def training_script(run, config: str, overrides: Iterable[str]):
    """The nemo-run task of one training run under an executor with nemo-run's torchrun launcher:
    ``python -m gift_megatron.train CONFIG OVERRIDES``, which the launcher turns into ``torchrun ... -m
    gift_megatron.train CONFIG OVERRIDES`` (each argument shell-quoted for the sbatch script)."""
    return run.Script(path=TRAIN_MODULE, m=True, entrypoint="python", args=[config, *overrides])


# ---------------------------------------------------------------------------------------------------------
# settings: cluster files and environment variables


def read_settings_file(path: str, known: Iterable[str], *, flag: str = "--config-file") -> dict[str, Any]:
    """The YAML mapping in ``path`` whose keys must all be in ``known`` (the launcher's flag names with
    underscores)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise LaunchError(f"{flag} {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise LaunchError(f"{flag} {path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LaunchError(f"{flag} {path}: expected a mapping of settings, got {type(data).__name__}")
    known = set(known)
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise LaunchError(f"{flag} {path}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
    return data


def parse_env(items: Any, what: str) -> dict[str, str]:
    """Environment variables from ``KEY=VALUE`` strings (flags) or a mapping (YAML); ``what`` names the
    source in errors."""
    if items is None:
        return {}
    if isinstance(items, dict):
        pairs = [(str(k), v) for k, v in items.items()]
    elif isinstance(items, (list, tuple)):
        pairs = []
        for item in items:
            if not isinstance(item, str) or "=" not in item:
                raise LaunchError(f"{what}: {item!r} is not KEY=VALUE")
            key, value = item.split("=", 1)
            pairs.append((key, value))
    else:
        raise LaunchError(f"{what}: expected a mapping of NAME: value, got {type(items).__name__}")
    env = {}
    for key, value in pairs:
        if not _ENV_NAME.match(key):
            raise LaunchError(f"{what}: {key!r} is not a valid environment variable name")
        if value is None or isinstance(value, (dict, list)):
            raise LaunchError(f"{what}: {key} needs a string value, got {value!r}")
        env[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


# ---------------------------------------------------------------------------------------------------------
# sweeps


def sweep_points(sweeps: Iterable[str] | None) -> list[tuple[tuple[str, str], ...]]:
    """``["a.b=1,2", "c=x,y"]`` -> the cartesian product ``[(("a.b","1"),("c","x")), ...]``; no sweep ->
    ``[()]`` (one run)."""
    axes = []
    for sweep in sweeps or []:
        key, sep, values = sweep.partition("=")
        key = key.strip()
        points = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not points:
            raise LaunchError(f"--sweep {sweep!r}: expected key=value1,value2 (for example objective.name=gift,grpo)")
        if len(set(points)) != len(points):
            raise LaunchError(f"--sweep {sweep!r}: a value is repeated")
        if key in (k for k, _ in axes):
            raise LaunchError(f"--sweep: {key} is swept twice")
        axes.append((key, points))
    return [tuple(zip((k for k, _ in axes), combo)) for combo in itertools.product(*(v for _, v in axes))]


def plan_jobs(overrides: Iterable[str], sweeps: Iterable[str] | None, output_dir: str) -> list[TrainingJob]:
    """The runs of a launch: one without a sweep (task ``train``), else one per sweep point, each with the
    swept values as overrides and its own ``run.output_dir`` (``OUTPUT_DIR/<point>``) so that sweep points
    never resume from each other's checkpoints."""
    overrides = list(overrides)
    jobs = []
    for point in sweep_points(sweeps):
        if not point:
            return [TrainingJob("train", tuple(overrides))]
        swept = {key for key, _ in point}
        tag = "__".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{key}-{value}") for key, value in point)
        kept = [o for o in overrides if o.split("=", 1)[0] not in swept]
        extra = [f"{key}={value}" for key, value in point]
        if "run.output_dir" not in swept:
            kept = [o for o in kept if not o.startswith("run.output_dir=")]
            extra.append(f"run.output_dir={os.path.join(output_dir, tag)}")
        jobs.append(TrainingJob(tag, tuple(kept + extra)))
    return jobs


def with_resume_auto(overrides: Iterable[str]) -> list[str]:
    """``overrides`` plus ``run.resume=auto`` unless they set ``run.resume`` themselves: a requeued or
    restarted job then continues from the newest complete checkpoint in ``run.output_dir`` instead of
    starting over (or, with ``none``, refusing the non-empty checkpoint directory)."""
    overrides = list(overrides)
    if not any(o.startswith("run.resume=") for o in overrides):
        overrides.append("run.resume=auto")
    return overrides


# ---------------------------------------------------------------------------------------------------------
# the training config, checked before anything is submitted


def check_training_config(config: str, overrides: Iterable[str], world_size: int, ranks: str, check_paths: bool = True):
    """Load ``config`` with ``overrides`` (gift_megatron.config.load_config) and check its parallel layout on
    ``world_size`` ranks; ``ranks`` says where that number comes from (``nodes (2) x gpus_per_node (8)``).
    Also checks the reward and (unless ``check_paths`` is False) the checkpoint, data and tokenizer paths
    as this machine sees them. Returns the TrainConfig; a LaunchError carries the config's own message,
    which names the key."""
    from gift_megatron.config import ConfigError, load_config

    overrides = list(overrides)
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        where = "" if config in str(exc) else f" {config}"
        raise LaunchError(f"training config{where} does not validate: {exc}") from exc
    from gift_megatron.config import check_inputs

    try:  # what would otherwise fail only once the job starts: paths, reward name and options
        check_inputs(cfg, paths=check_paths)
    except ConfigError as exc:
        hint = " (paths are checked from this machine; --no-check-paths skips them)" if check_paths else ""
        raise LaunchError(f"training config {config}: {exc}{hint}") from exc
    from gift_megatron.config import check_world_size

    try:  # the layout and whole micro-batches per data-parallel rank
        check_world_size(cfg, world_size)
    except ConfigError as exc:
        p = cfg.parallel
        layout = (
            f"TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} x CP {p.context_parallel_size}"
        )
        raise LaunchError(f"{ranks} = {world_size} ranks do not fit the layout of {config} ({layout}): {exc}") from exc
    return cfg


def check_jobs(config: str, jobs: list[TrainingJob], world_size: int, ranks: str, check_paths: bool = True) -> None:
    """:func:`check_training_config` for every run of a sweep; the error names the sweep point."""
    if len(jobs) < 2:
        return
    for job in jobs:
        try:
            check_training_config(config, job.overrides, world_size, ranks, check_paths)
        except LaunchError as exc:
            raise LaunchError(f"sweep point {job.name}: {exc}") from exc


def output_dir_of(config: str, overrides: Iterable[str], cfg=None) -> str:
    """``run.output_dir`` of the run: from the checked config, or (``--no-validate``) read from the YAML
    and the overrides, the last override winning as in load_config."""
    if cfg is not None:
        return cfg.run.output_dir
    value = None
    for override in overrides:
        if override.startswith("run.output_dir="):
            value = override.split("=", 1)[1]
    if value is None:
        import yaml

        try:
            with open(config, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
            value = (data.get("run") or {}).get("output_dir")
        except (OSError, yaml.YAMLError, AttributeError):
            value = None
    return str(value or "runs/default")
