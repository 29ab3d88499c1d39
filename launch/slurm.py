"""Launch ``gift-megatron train`` on a SLURM cluster through nemo-run (Pyxis/enroot containers, torchrun on
every node).

    python launch/slurm.py --config-file cluster.yaml examples/qwen2.5-7b-gift.yaml train.steps=500
    python launch/slurm.py --config-file cluster.yaml --nodes 2 --dryrun examples/qwen2.5-7b-gift.yaml
    python launch/slurm.py --config-file cluster.yaml --sweep objective.name=gift,grpo examples/x.yaml

Settings come from ``--config-file`` (YAML, keys = flag names with underscores; see
launch/example_cluster.yaml) and flags, flags winning. Before anything is submitted the training config is
loaded with its overrides and checked against nodes x gpus_per_node ranks, and the SLURM settings
(account, container image) are checked. ``--dryrun`` prints the sbatch script(s) and submits nothing.

Preemption: jobs are submitted with ``--requeue`` and the training command carries ``run.resume=auto``, so
a requeued job continues from the newest complete checkpoint in ``run.output_dir``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import (  # noqa: E402
    LaunchError,
    dryrun_scripts,
    load_cluster_file,
    sweep_overrides,
    sweep_points,
    training_args,
    validate_training_config,
)

DEFAULTS = {
    "account": None, "partition": None, "nodes": 1, "gpus_per_node": 8, "time": "04:00:00",
    "container_image": None, "container_mounts": [], "env": {}, "mpi": "pmix", "exclusive": True,
    "tunnel": "local", "host": None, "user": None, "job_dir": None, "name": "gift-megatron", "qos": None,
    "signal": "USR1@120", "rdzv_port": 29500, "retries": 0, "packager": "git",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Launch gift-megatron training on SLURM through nemo-run.")
    p.add_argument("config", help="training config (YAML)")
    p.add_argument("overrides", nargs="*", help="training config overrides key=value")
    p.add_argument("--config-file", help="cluster settings (YAML); flags override its values")
    p.add_argument("--account", help="SLURM account (required)")
    p.add_argument("--partition")
    p.add_argument("--qos")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--time", help="wall time limit, HH:MM:SS")
    p.add_argument("--container-image", help="Pyxis/enroot image (required), e.g. nvcr.io/nvidia/pytorch:25.01-py3")
    p.add_argument("--container-mounts", help="comma-separated SRC:DST mounts")
    p.add_argument("--env", action="append", default=None, help="KEY=VALUE environment variable (repeatable)")
    p.add_argument("--mpi", help="srun --mpi value (pmix, pmi2, none)")
    p.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--signal", help="sbatch --signal, e.g. USR1@120 (warning before the time limit)")
    p.add_argument("--tunnel", choices=["local", "ssh"], help="submit from this machine (local) or over SSH")
    p.add_argument("--host", help="SSH tunnel: login node")
    p.add_argument("--user", help="SSH tunnel: user")
    p.add_argument("--job-dir", help="where nemo-run keeps job files (on the cluster for ssh)")
    p.add_argument("--name", help="experiment name")
    p.add_argument("--retries", type=int, help="requeue a failed job up to N times (it resumes from its checkpoint)")
    p.add_argument("--packager", choices=["git", "none"],
                   help="git: ship this repository's committed code to the job (default); none: use the image's")
    p.add_argument("--sweep", help="one job per value: key=v1,v2 (one nemo-run experiment)")
    p.add_argument("--dryrun", action="store_true", help="print the sbatch script(s), submit nothing")
    return p


def settings_from(args: argparse.Namespace) -> dict:
    s = dict(DEFAULTS)
    s.update(load_cluster_file(args.config_file, set(DEFAULTS)))
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    if isinstance(s["container_mounts"], str):
        s["container_mounts"] = [m for m in s["container_mounts"].split(",") if m]
    if isinstance(s["env"], list):
        env = {}
        for item in s["env"]:
            if "=" not in item:
                raise LaunchError(f"--env {item!r}: expected KEY=VALUE")
            k, v = item.split("=", 1)
            env[k] = v
        s["env"] = env
    for key, flag in (("account", "--account"), ("container_image", "--container-image")):
        if not s[key]:
            raise LaunchError(f"SLURM launch needs {flag} (or '{key}' in --config-file)")
    if s["nodes"] < 1 or s["gpus_per_node"] < 1:
        raise LaunchError(f"--nodes ({s['nodes']}) and --gpus-per-node ({s['gpus_per_node']}) must be >= 1")
    if s["tunnel"] == "ssh" and not (s["host"] and s["user"] and s["job_dir"]):
        raise LaunchError("--tunnel ssh needs --host, --user and --job-dir")
    return s


def executor(s: dict):
    import nemo_run as run

    job_dir = s["job_dir"] or os.path.join(os.environ.get("NEMORUN_HOME", os.path.expanduser("~/.nemo_run")), "slurm")
    tunnel = (run.SSHTunnel(host=s["host"], user=s["user"], job_dir=job_dir) if s["tunnel"] == "ssh"
              else run.LocalTunnel(job_dir=job_dir))
    ex = run.SlurmExecutor(
        account=s["account"], partition=s["partition"], qos=s["qos"], nodes=s["nodes"],
        ntasks_per_node=s["gpus_per_node"], gpus_per_node=s["gpus_per_node"], time=s["time"],
        container_image=s["container_image"], container_mounts=list(s["container_mounts"]),
        exclusive=s["exclusive"] or None, signal=s["signal"], tunnel=tunnel, env_vars=dict(s["env"]),
        srun_args=[f"--mpi={s['mpi']}"] if s["mpi"] else None,
        # git: the committed tree (configs in examples/ included) runs from /nemo_run/code in the container,
        # whose image provides the dependencies; none: the image's installed gift_megatron runs as is.
        packager=run.GitArchivePackager() if s["packager"] == "git" else run.Packager(),
        job_name_prefix=f"{s['name']}-",
    )
    ex.retries = s["retries"]
    # torchrun on every node: nemo-run then runs one task per node and torchrun starts gpus_per_node
    # processes, meeting at a c10d rendezvous on the head node.
    ex.launcher = run.Torchrun(rdzv_port=s["rdzv_port"])
    return ex


def build_experiment(config: str, overrides: list[str], s: dict, sweep: str | None):
    """(experiment, [(task name, overrides)]) after validating every sweep point's config."""
    import nemo_run as run

    world = s["nodes"] * s["gpus_per_node"]
    base = validate_training_config(config, overrides, world)
    tasks = []
    for key, value in sweep_points(sweep):
        name, task_overrides = sweep_overrides(overrides, key, value, base.run.output_dir)
        validate_training_config(config, task_overrides, world)
        tasks.append((name, task_overrides))
    ex = executor(s)
    exp = run.Experiment(s["name"], executor=ex)
    exp.__enter__()
    for name, task_overrides in tasks:
        script = run.Script(path="gift_megatron.train", m=True, entrypoint="python",
                            args=training_args(config, task_overrides))
        exp.add(script, executor=ex.clone(), name=name)
    return exp, tasks


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        s = settings_from(args)
        exp, tasks = build_experiment(args.config, args.overrides, s, args.sweep)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.dryrun:
            for (name, _), script in zip(tasks, dryrun_scripts(exp)):
                print(f"# ===== task {name}: sbatch --requeue --parsable <script> =====")
                print(script)
            return 0
        exp.run(detach=True)
        print(f"submitted {len(tasks)} job(s) as experiment {exp._id}; watch with: nemo experiment logs {exp._id}")
        return 0
    finally:
        exp.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())
