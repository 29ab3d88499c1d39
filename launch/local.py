"""Launch ``gift-megatron train`` on this machine through nemo-run's LocalExecutor and torchrun.

    python launch/local.py --nproc-per-node 2 examples/tiny_cpu_gift.yaml train.steps=50
    python launch/local.py --nproc-per-node 8 --dryrun examples/qwen2.5-7b-gift.yaml

The training config is validated for ``--nproc-per-node`` ranks before anything starts. The job runs in the
foreground and its exit status is this script's; its logs are under nemo-run's job directory
(``$NEMORUN_HOME``, default ``~/.nemo_run``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import (  # noqa: E402
    LaunchError,
    sweep_overrides,
    sweep_points,
    training_args,
    validate_training_config,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run gift-megatron training locally through nemo-run + torchrun.")
    p.add_argument("config", help="training config (YAML)")
    p.add_argument("overrides", nargs="*", help="training config overrides key=value")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs, or CPU ranks)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE environment variable (repeatable)")
    p.add_argument("--name", default="gift-megatron-local", help="experiment name")
    p.add_argument("--sweep", help="one run per value, one after the other: key=v1,v2")
    p.add_argument("--dryrun", action="store_true", help="print the command(s), run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import nemo_run as run

    try:
        if args.nproc_per_node < 1:
            raise LaunchError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
        env = {}
        for item in args.env:
            if "=" not in item:
                raise LaunchError(f"--env {item!r}: expected KEY=VALUE")
            k, v = item.split("=", 1)
            env[k] = v
        base = validate_training_config(args.config, args.overrides, args.nproc_per_node)
        tasks = []
        for key, value in sweep_points(args.sweep):
            name, task_overrides = sweep_overrides(args.overrides, key, value, base.run.output_dir)
            validate_training_config(args.config, task_overrides, args.nproc_per_node)
            tasks.append((name, task_overrides))
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # nemo-run starts `torchrun` by name: make it the one of this interpreter's environment (a venv's bin
    # is not on PATH when its python is called by path).
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    # CPU ranks share the cores: one OpenMP thread each unless the caller set it.
    env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    executor = run.LocalExecutor(ntasks_per_node=args.nproc_per_node, launcher="torchrun", env_vars=env)
    with run.Experiment(args.name, executor=executor) as exp:
        for name, task_overrides in tasks:
            script = run.Script(path="gift_megatron.train", m=True, entrypoint="python",
                                args=training_args(args.config, task_overrides))
            exp.add(script, executor=executor.clone(), name=name)
        if args.dryrun:
            exp.dryrun()
            return 0
        exp.run(sequential=True, tail_logs=False)
        for job in exp.jobs:  # the runs' terminal states (run() may return while the last one finishes)
            job.wait(exp._runner)
        statuses = [str(job.state) for job in exp.jobs]
    failed = [s for s in statuses if "SUCCEEDED" not in s.upper()]
    print(f"finished {len(statuses)} run(s): {', '.join(statuses)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
