"""Launch ``gift-megatron train`` on this machine through nemo-run's LocalExecutor and torchrun.

    python launch/local.py --nproc-per-node 2 examples/tiny_cpu_gift.yaml train.steps=50
    python launch/local.py --nproc-per-node 8 --dryrun examples/qwen2.5-7b-gift.yaml
    python launch/local.py --nproc-per-node 2 --sweep objective.name=gift,grpo examples/tiny_cpu_gift.yaml

The training config is loaded with its overrides and checked for ``--nproc-per-node`` ranks before anything
starts. Runs go one after the other in the foreground (a sweep's runs each get their own
``run.output_dir``); this script exits non-zero when one fails. nemo-run keeps their logs under
``$NEMORUN_HOME/experiments`` (default ``~/.nemo_run``). ``--dryrun`` prints the torchrun command(s).
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import (
    TRAIN_MODULE,
    LaunchError,
    TrainingJob,
    check_jobs,
    check_training_config,
    import_nemo_run,
    output_dir_of,
    parse_env,
    plan_jobs,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python launch/local.py",
        description="Run gift-megatron training on this machine through nemo-run + torchrun.",
    )
    p.add_argument("config", help="training config (YAML), as for `gift-megatron train`")
    p.add_argument("overrides", nargs="*", help="training config overrides key=value (e.g. train.steps=50)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes: GPUs, or CPU ranks (default 1)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="environment variable (repeatable)")
    p.add_argument("--name", default="gift-megatron-local", help="nemo-run experiment name")
    p.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help="one run per value, one after the other (repeatable: the product)",
    )
    p.add_argument("--no-validate", action="store_true", help="do not load the training config before starting")
    p.add_argument(
        "--no-check-paths",
        action="store_true",
        help="validate the config but not its checkpoint / data / tokenizer paths",
    )
    p.add_argument("--quiet", action="store_true", help="do not stream the runs' logs here")
    p.add_argument("--dryrun", action="store_true", help="print the torchrun command(s); run nothing")
    return p


def planned_jobs(args: argparse.Namespace) -> list[TrainingJob]:
    """The runs, each checked for ``--nproc-per-node`` ranks. The config's own ``run.resume`` applies (no
    ``run.resume=auto`` is added: nothing requeues a local run)."""
    if args.nproc_per_node < 1:
        raise LaunchError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if not os.path.isfile(args.config):
        raise LaunchError(f"training config {args.config}: no such file")
    ranks = f"--nproc-per-node ({args.nproc_per_node})"
    paths = not args.no_check_paths
    cfg = (
        None
        if args.no_validate
        else check_training_config(args.config, args.overrides, args.nproc_per_node, ranks, paths)
    )
    jobs = plan_jobs(args.overrides, args.sweep, output_dir_of(args.config, args.overrides, cfg))
    if not args.no_validate:
        check_jobs(args.config, jobs, args.nproc_per_node, ranks, paths)
    return jobs


def torchrun_script(run, nproc_per_node: int, config: str, overrides: tuple[str, ...]):
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m gift_megatron.train CONFIG
    OVERRIDES`` (torchrun) as a nemo-run task.

    Why not nemo-run's ``launcher="torchrun"``: it shell-quotes every argument for the sbatch scripts it
    renders, but its local scheduler starts the command without a shell, so an override such as
    ``objective.options={}`` or ``data.train_files=[a.jsonl]`` would reach the trainer with literal quotes.
    This interpreter runs torchrun, so the job uses the same environment as the launcher."""
    args = [
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc_per_node),
        "-m",
        TRAIN_MODULE,
        config,
        *overrides,
    ]
    return run.Script(path="torch.distributed.run", m=True, entrypoint=sys.executable, args=args)


def command_of(job) -> str:
    """The command line (with the environment nemo-run adds) of a dry-run job, as the local scheduler
    would start it."""
    request = job._dryrun_info.request
    lines = []
    for replicas in request.role_params.values():
        for replica in replicas:
            # PATH is not replaced but prepended to this process's PATH by the local scheduler
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(replica.env.items()) if k != "PATH")
            lines.append(f"{env} {shlex.join(replica.args)}".strip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        env = parse_env(args.env, "--env")
        jobs = planned_jobs(args)
        run = import_nemo_run()
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = os.path.abspath(args.config)
    executor = run.LocalExecutor(env_vars=env)
    with run.Experiment(args.name, executor=executor) as exp:
        for job in jobs:
            exp.add(
                torchrun_script(run, args.nproc_per_node, config, job.overrides),
                executor=executor,
                name=job.name,
                tail_logs=not args.quiet,
            )
        if args.dryrun:
            exp.dryrun(log=False)
            for job, nemo_job in zip(jobs, exp.jobs):
                print(f"# ===== {job.name} =====")
                print(command_of(nemo_job))
            return 0
        exp.run(sequential=True)
        log_dir = exp._exp_dir
    # Leaving the `with` waited for every run; their states are final now.
    states = {job.name: str(nemo_job.state) for job, nemo_job in zip(jobs, exp.jobs)}
    print(f"finished {len(states)} run(s): " + ", ".join(f"{n} {s}" for n, s in states.items()))
    print(f"logs: {log_dir}")
    failed = [nemo_job for nemo_job in exp.jobs if not str(nemo_job.state).upper().endswith("SUCCEEDED")]
    for nemo_job in failed:
        for log in sorted(
            glob.glob(os.path.join(nemo_job.executor.job_dir, "nemo_run", "*", "*", "*", "combined.log"))
        ):
            print(f"{nemo_job.id} failed, its log: {log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
