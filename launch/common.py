"""What the SLURM and local launchers share: the training command, config validation before anything is
submitted, cluster files, sweeps, and reading nemo-run's rendered scripts."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

# Importable both as `launch.common` (tests) and from `python launch/slurm.py` (the launch dir on sys.path).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class LaunchError(ValueError):
    """A launch that must not be submitted; the message names the flag, key or file."""


def training_args(config: str, overrides: list[str], *, resume_auto: bool = True) -> list[str]:
    """Arguments of ``python -m gift_megatron.train``. ``run.resume=auto`` by default so that a requeued or
    restarted job continues from its newest checkpoint instead of starting over (an explicit
    ``run.resume=...`` among the overrides wins)."""
    args = [config, *overrides]
    if resume_auto and not any(o.startswith("run.resume=") for o in overrides):
        args.append("run.resume=auto")
    return args


def validate_training_config(config: str, overrides: list[str], world_size: int):
    """Load the training config with its overrides and check its layout on ``world_size`` ranks; a
    LaunchError carries the config's own message (naming the key or the numbers)."""
    from gift_megatron.config import ConfigError, check_world_size, load_config

    try:
        cfg = load_config(config, overrides)
        check_world_size(cfg, world_size)
    except ConfigError as exc:
        raise LaunchError(f"training config does not validate for {world_size} ranks: {exc}") from exc
    return cfg


def load_cluster_file(path: str | None, known: set[str]) -> dict[str, Any]:
    """A YAML mapping of launcher settings (keys = the flags' names with underscores)."""
    if not path:
        return {}
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise LaunchError(f"--config-file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise LaunchError(f"--config-file {path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise LaunchError(f"--config-file {path}: expected a mapping of settings")
    unknown = sorted(set(data) - known)
    if unknown:
        raise LaunchError(f"--config-file {path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return data


def sweep_points(sweep: str | None) -> list[tuple[str, str]]:
    """``key=v1,v2`` -> [(key, v1), (key, v2)]; no sweep -> [("", "")] (one job)."""
    if not sweep:
        return [("", "")]
    if "=" not in sweep:
        raise LaunchError(f"--sweep {sweep!r}: expected key=value1,value2")
    key, values = sweep.split("=", 1)
    points = [(key.strip(), v.strip()) for v in values.split(",") if v.strip()]
    if not key.strip() or not points:
        raise LaunchError(f"--sweep {sweep!r}: expected key=value1,value2")
    return points


def sweep_overrides(overrides: list[str], key: str, value: str, output_dir: str) -> tuple[str, list[str]]:
    """(task name, overrides) of one sweep point: the swept key set, and its own output dir so that the
    points never share checkpoints."""
    if not key:
        return "train", list(overrides)
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{key.split('.')[-1]}_{value}")
    kept = [o for o in overrides if not o.startswith(f"{key}=") and not o.startswith("run.output_dir=")]
    return tag, kept + [f"{key}={value}", f"run.output_dir={os.path.join(output_dir, tag)}"]


def dryrun_scripts(experiment) -> list[str]:
    """The scripts nemo-run would submit for each task of ``experiment`` (rendered, nothing submitted)."""
    experiment.dryrun(log=False)
    scripts = []
    for job in experiment.jobs:
        info = getattr(job, "_dryrun_info", None)
        request = getattr(info, "request", None)
        scripts.append(request.materialize() if hasattr(request, "materialize") else str(info))
    return scripts
