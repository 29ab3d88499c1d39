"""Launch ``gift-megatron train`` on a SLURM cluster through nemo-run: Pyxis/enroot containers, torchrun on
every node, requeue + resume, sweeps.

    python launch/slurm.py --config-file cluster.yaml --dryrun examples/qwen2.5-7b-gift.yaml train.steps=500
    python launch/slurm.py --config-file cluster.yaml --nodes 4 examples/qwen2.5-32b-gift.yaml
    python launch/slurm.py --config-file cluster.yaml --sweep objective.name=gift,grpo examples/qwen2.5-7b-gift.yaml

Settings come from ``--config-file`` (YAML; its keys are the flags' names with underscores, see
launch/example_cluster.yaml) and from flags, flags winning. Before anything is submitted the SLURM settings
are checked (account, container image, ...) and the training config is loaded with its overrides and checked
against nodes x gpus_per_node ranks. ``--dryrun`` prints the sbatch script nemo-run would submit for each
run and submits nothing.

What a job runs: one task per node, each ``torchrun --nnodes NODES --nproc-per-node GPUS --rdzv-backend
c10d --rdzv-endpoint $head_node_ip:PORT -m gift_megatron.train CONFIG OVERRIDES run.resume=auto`` inside the
container, in the committed code of this repository (``packager: git``) or in the image's installed
gift_megatron (``packager: none``). The training config file itself is always shipped as the launcher read
it (``launch_configs/<name>`` in the job's code directory), so uncommitted edits to it are what runs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import (
    ROOT,
    LaunchError,
    TrainingJob,
    check_jobs,
    check_training_config,
    import_nemo_run,
    output_dir_of,
    parse_env,
    plan_jobs,
    read_settings_file,
    training_script,
    with_resume_auto,
)

#: Every cluster setting with its default; the keys are also the YAML keys of --config-file.
DEFAULTS: dict[str, Any] = {
    "account": None,  # required
    "partition": None,
    "qos": None,
    "nodes": 1,
    "gpus_per_node": 8,
    "cpus_per_task": None,
    "time": "04:00:00",
    "container_image": None,  # required
    "container_mounts": [],
    "env": {},
    "mpi": "pmix",
    "exclusive": True,
    "requeue": False,
    "retries": 0,
    "signal": None,
    "extra_sbatch": {},
    "rdzv_port": 29500,
    "tunnel": "local",
    "host": None,
    "user": None,
    "identity": None,
    "job_dir": None,
    "packager": "git",
    "repo": None,
    "name": "gift-megatron",
}

#: The directory of the job's code directory that receives the training config (see ``stage_config``).
STAGED_CONFIG_DIR = "launch_configs"

_TIME = re.compile(r"^\d+(-\d{1,2}(:\d{1,2}){0,2}|(:\d{1,2}){0,2})$")  # SLURM's time formats


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python launch/slurm.py",
        description="Launch gift-megatron training on SLURM through nemo-run (torchrun on every node).",
        epilog="Every setting can also be given in --config-file (YAML, keys with underscores); flags win.",
    )
    p.add_argument("config", help="training config (YAML), as for `gift-megatron train`")
    p.add_argument("overrides", nargs="*", help="training config overrides key=value (e.g. train.steps=500)")
    p.add_argument("--config-file", help="cluster settings (YAML), e.g. a copy of launch/example_cluster.yaml")
    g = p.add_argument_group("allocation")
    g.add_argument("--account", help="SLURM account (required)")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--qos", help="SLURM quality of service")
    g.add_argument("--nodes", type=int, help=f"nodes (default {DEFAULTS['nodes']})")
    g.add_argument(
        "--gpus-per-node",
        type=int,
        help=f"GPUs per node = torchrun processes per node (default {DEFAULTS['gpus_per_node']})",
    )
    g.add_argument(
        "--cpus-per-task",
        type=int,
        help="CPUs of the one task per node (sbatch and srun); set it to the node's cores where a "
        "job step otherwise gets one CPU per task",
    )
    g.add_argument("--time", help=f"wall-time limit, SLURM format (default {DEFAULTS['time']})")
    g.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None, help="whole nodes (default: on)")
    g.add_argument(
        "--requeue",
        action="store_true",
        default=None,
        help="#SBATCH --requeue: a preempted job (or one whose node failed) goes back to the queue "
        "and continues from its newest checkpoint (the command carries run.resume=auto); "
        "nemo-run's own `sbatch --requeue` call asks for the same, the directive keeps it in "
        "the script",
    )
    g.add_argument(
        "--retries", type=int, help="requeue a job whose training command failed up to N times (counts SLURM restarts)"
    )
    g.add_argument("--signal", help="#SBATCH --signal, e.g. USR1@300 (see docs/cluster.md: time-limit requeue)")
    g.add_argument(
        "--extra-sbatch",
        action="append",
        metavar="KEY=VALUE",
        help="any other #SBATCH flag, e.g. reservation=r1 or constraint=h100 (repeatable)",
    )
    c = p.add_argument_group("container and processes")
    c.add_argument("--container-image", help="Pyxis/enroot image with gift_megatron's dependencies (required)")
    c.add_argument("--container-mounts", help="comma-separated SRC:DST[:FLAGS] mounts")
    c.add_argument(
        "--env",
        action="append",
        metavar="KEY=VALUE",
        help="environment variable of the job (repeatable; added to the file's `env`)",
    )
    c.add_argument("--mpi", help="srun --mpi value: pmix (default), pmi2, none, ...; `null` in YAML omits it")
    c.add_argument(
        "--rdzv-port", type=int, help=f"torchrun rendezvous port on the head node (default {DEFAULTS['rdzv_port']})"
    )
    c.add_argument(
        "--packager",
        choices=["git", "none"],
        help="git (default): run the committed code of --repo, shipped to the job; none: run the "
        "image's installed gift_megatron (the config path must then be absolute and mounted)",
    )
    c.add_argument("--repo", help="git repository shipped by the git packager (default: this one)")
    t = p.add_argument_group("submission")
    t.add_argument(
        "--tunnel",
        choices=["local", "ssh"],
        help="local (default): sbatch on this machine (a login node); ssh: over SSH from a workstation",
    )
    t.add_argument("--host", help="SSH tunnel: login node")
    t.add_argument("--user", help="SSH tunnel: user")
    t.add_argument("--identity", help="SSH tunnel: private key file")
    t.add_argument(
        "--job-dir",
        help="job files (scripts, code, logs) on a filesystem every node sees; required "
        "for ssh; local default: $NEMORUN_HOME/experiments",
    )
    t.add_argument("--name", help=f"experiment name and SLURM job-name prefix (default {DEFAULTS['name']})")
    t.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help="one job per value, all in one nemo-run experiment (repeatable: the product)",
    )
    t.add_argument(
        "--no-validate",
        action="store_true",
        help="do not load the training config here (when it reads files that exist only on the "
        "cluster, e.g. init.hf_config); the job still checks it at start-up",
    )
    t.add_argument(
        "--no-check-paths",
        action="store_true",
        help="validate the config but not its checkpoint / data / tokenizer paths (when the job sees "
        "another filesystem than this machine, e.g. container mounts)",
    )
    t.add_argument("--dryrun", action="store_true", help="print the sbatch script(s); submit nothing")
    return p


# ---------------------------------------------------------------------------------------------------------
# settings


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The checked cluster settings: defaults < --config-file < flags. Every error names the flag and the
    YAML key."""
    s = dict(DEFAULTS)
    if args.config_file:
        s.update(read_settings_file(args.config_file, DEFAULTS))
    env = parse_env(s["env"], "env (--config-file)")
    extra = s["extra_sbatch"]
    if not isinstance(extra, dict):
        raise LaunchError(f"extra_sbatch: expected a mapping of sbatch flag: value, got {extra!r}")
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None and key not in ("env", "extra_sbatch"):
            s[key] = value
    env.update(parse_env(args.env, "--env"))
    s["env"] = env
    for item in args.extra_sbatch or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--extra-sbatch {item!r}: expected KEY=VALUE")
        extra = {**extra, key: value}
    s["extra_sbatch"] = {str(k).replace("-", "_"): v for k, v in extra.items()}
    check_settings(s)
    return s


#: sbatch flags the launcher derives from its own settings: extra_sbatch must not contradict them (a
#: different --nodes there would no longer match torchrun's --nnodes).
OWN_SBATCH_FLAGS = {
    "account",
    "partition",
    "qos",
    "nodes",
    "ntasks",
    "ntasks_per_node",
    "gpus_per_node",
    "gpus",
    "cpus_per_task",
    "time",
    "exclusive",
    "requeue",
    "no_requeue",
    "signal",
    "job_name",
    "output",
    "error",
    "open_mode",
}


def _flag(key: str) -> str:
    return f"--{key.replace('_', '-')} (or '{key}' in --config-file)"


def check_settings(s: dict[str, Any]) -> None:
    for key in ("account", "container_image"):
        if not s[key]:
            raise LaunchError(f"a SLURM launch needs {_flag(key)}")
    for key, least in (("nodes", 1), ("gpus_per_node", 1), ("rdzv_port", 1), ("cpus_per_task", 1), ("retries", 0)):
        value = s[key]
        if key == "cpus_per_task" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise LaunchError(f"{_flag(key)} must be an integer >= {least}, got {value!r}")
    if not _TIME.match(str(s["time"])):
        raise LaunchError(f"{_flag('time')}: {s['time']!r} is not a SLURM time (HH:MM:SS, MM, D-HH:MM, ...)")
    mounts = s["container_mounts"]
    if isinstance(mounts, str):
        mounts = [m for m in mounts.split(",") if m]
    if not isinstance(mounts, list):
        raise LaunchError(f"{_flag('container_mounts')}: expected a list of SRC:DST, got {mounts!r}")
    for mount in mounts:
        if not isinstance(mount, str) or ":" not in mount:
            raise LaunchError(f"{_flag('container_mounts')}: {mount!r} is not SRC:DST[:FLAGS]")
    s["container_mounts"] = list(mounts)
    if s["mpi"] is not None and not re.match(r"^[A-Za-z0-9_]+$", str(s["mpi"])):
        raise LaunchError(f"{_flag('mpi')}: {s['mpi']!r} is not an srun --mpi type (pmix, pmi2, none, ...)")
    for key in ("exclusive", "requeue"):
        if not isinstance(s[key], bool):
            raise LaunchError(f"{_flag(key)} must be true or false, got {s[key]!r}")
    for key in sorted(OWN_SBATCH_FLAGS & set(s["extra_sbatch"])):
        hint = f"; use {_flag(key)}" if key in DEFAULTS else ""
        raise LaunchError(f"extra_sbatch: {key} is set by the launcher{hint}")
    if s["tunnel"] not in ("local", "ssh"):
        raise LaunchError(f"{_flag('tunnel')} must be local or ssh, got {s['tunnel']!r}")
    if s["tunnel"] == "ssh":
        missing = [f"--{k.replace('_', '-')}" for k in ("host", "user", "job_dir") if not s[k]]
        if missing:
            raise LaunchError(f"--tunnel ssh needs {', '.join(missing)} (or those keys in --config-file)")
        if not str(s["job_dir"]).startswith("/"):
            raise LaunchError(f"{_flag('job_dir')}: {s['job_dir']!r} must be an absolute path on the cluster")
    elif s["job_dir"]:
        s["job_dir"] = os.path.abspath(os.path.expanduser(str(s["job_dir"])))
    if s["packager"] not in ("git", "none"):
        raise LaunchError(f"{_flag('packager')} must be git or none, got {s['packager']!r}")
    if not re.match(r"^[A-Za-z0-9_.-]+$", str(s["name"])):
        raise LaunchError(f"{_flag('name')}: {s['name']!r} may only contain letters, digits, '_', '.', '-'")


# ---------------------------------------------------------------------------------------------------------
# what runs


def planned_jobs(
    config: str,
    overrides: list[str],
    sweeps: list[str] | None,
    s: dict[str, Any],
    validate: bool = True,
    check_paths: bool = True,
) -> list[TrainingJob]:
    """The runs of the launch, each checked against nodes x gpus_per_node ranks before anything is
    submitted; every job resumes automatically (``run.resume=auto``)."""
    world = s["nodes"] * s["gpus_per_node"]
    ranks = f"nodes ({s['nodes']}) x gpus_per_node ({s['gpus_per_node']})"
    cfg = check_training_config(config, overrides, world, ranks, check_paths) if validate else None
    jobs = plan_jobs(overrides, sweeps, output_dir_of(config, overrides, cfg))
    if validate:
        check_jobs(config, jobs, world, ranks, check_paths)
    return [TrainingJob(job.name, tuple(with_resume_auto(job.overrides))) for job in jobs]


def git_repo(s: dict[str, Any]) -> str:
    """The top level of the repository the git packager ships (--repo, default the launcher's own)."""
    path = os.path.abspath(s["repo"] or ROOT)
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=path,
            check=True,
            text=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise LaunchError(f"{_flag('repo')}: {path} is not a git repository (needed by packager: git)") from exc
    return out.stdout.strip()


def uncommitted_changes(repo: str) -> list[str]:
    """Tracked files of ``repo`` that differ from HEAD: the git packager ships HEAD, not these edits."""
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=repo,
        text=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    return [line[3:] for line in out.stdout.splitlines() if line.strip()]


def stage_config(config: str, stage_dir: str) -> str:
    """Copy the training config into ``stage_dir/launch_configs/`` (which the git packager adds to the
    shipped code) and return its path relative to the job's code directory, where the job runs."""
    name = os.path.basename(config)
    os.makedirs(os.path.join(stage_dir, STAGED_CONFIG_DIR), exist_ok=True)
    shutil.copyfile(config, os.path.join(stage_dir, STAGED_CONFIG_DIR, name))
    return f"{STAGED_CONFIG_DIR}/{name}"


def _env_value(value: str) -> str:
    # nemo-run writes `export KEY=value` verbatim into the sbatch script: double quotes keep spaces and
    # special characters intact while $VARS still expand on the node.
    if re.match(r"^[A-Za-z0-9_@%+=:,./${}-]*$", value):
        return value
    return '"' + re.sub(r'(["\\`])', r"\\\1", value) + '"'


def make_executor(run, s: dict[str, Any], *, repo: str | None, stage_dir: str | None):
    """The SlurmExecutor of every run of the launch (nemo-run clones it per task)."""
    if s["tunnel"] == "ssh":
        tunnel = run.SSHTunnel(host=s["host"], user=s["user"], job_dir=s["job_dir"], identity=s["identity"])
    else:
        # A local tunnel does not copy anything: the paths in the script must be where nemo-run writes the
        # job files, <experiment base>/experiments/<title>/<id>/<task> (the Experiment gets the same base).
        tunnel = run.LocalTunnel(job_dir=os.path.join(s["job_dir"], "experiments") if s["job_dir"] else "")
    if s["packager"] == "git":
        assert repo and stage_dir
        packager = run.GitArchivePackager(
            basepath=repo,
            include_pattern=[os.path.join(stage_dir, STAGED_CONFIG_DIR)],
            include_pattern_relative_path=[stage_dir],
        )
    else:
        packager = run.Packager()
    extra = dict(s["extra_sbatch"])
    if s["requeue"]:
        extra["requeue"] = True
    srun_args = []
    if s["mpi"] is not None:
        srun_args.append(f"--mpi={s['mpi']}")
    if s["cpus_per_task"]:
        # srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05): give it to the step too.
        srun_args.append(f"--cpus-per-task={s['cpus_per_task']}")
    executor = run.SlurmExecutor(
        account=s["account"],
        partition=s["partition"],
        qos=s["qos"],
        time=str(s["time"]),
        nodes=s["nodes"],
        gpus_per_node=s["gpus_per_node"],
        cpus_per_task=s["cpus_per_task"],
        # torchrun on every node: one SLURM task per node that starts gpus_per_node processes and meets the
        # other nodes at a c10d rendezvous on the head node ($head_node_ip, resolved by the batch script).
        ntasks_per_node=1,
        torchrun_nproc_per_node=s["gpus_per_node"],
        exclusive=True if s["exclusive"] else None,
        signal=s["signal"],
        container_image=s["container_image"],
        container_mounts=list(s["container_mounts"]),
        env_vars={k: _env_value(v) for k, v in s["env"].items()},
        srun_args=srun_args or None,
        additional_parameters=extra or None,
        tunnel=tunnel,
        packager=packager,
        job_name_prefix=f"{s['name']}-",
    )
    executor.launcher = run.Torchrun(rdzv_port=s["rdzv_port"])
    # nemo-run's script requeues itself after a failed command while SLURM_RESTART_COUNT < retries.
    executor.retries = s["retries"]
    return executor


@contextmanager
def _working_directory(path: str | None):
    # nemo-run's Slurm packaging asks git for the top level of the *current* directory.
    old = os.getcwd()
    if path:
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def launch(
    config: str, jobs: list[TrainingJob], s: dict[str, Any], *, dryrun: bool, keep_dryrun_files: bool = False
) -> list[str]:
    """Build one nemo-run Experiment with a task per job and submit it (detached), or with ``dryrun`` render
    it: returns the sbatch scripts nemo-run wrote, in job order (nothing is submitted). Without
    ``keep_dryrun_files`` the dry run's job directory is removed again."""
    run = import_nemo_run()
    config = os.path.abspath(config)
    repo = git_repo(s) if s["packager"] == "git" else None
    if repo:
        changed = uncommitted_changes(repo)
        if changed:
            print(
                f"note: the git packager ships the committed HEAD of {repo}; {len(changed)} changed file(s) "
                f"are not shipped ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}); the "
                "training config is shipped as it is now",
                file=sys.stderr,
            )
    with tempfile.TemporaryDirectory(prefix="gift-launch-") as stage_dir, _working_directory(repo):
        job_config = stage_config(config, stage_dir) if repo else config
        executor = make_executor(run, s, repo=repo, stage_dir=stage_dir)
        base_dir = s["job_dir"] if s["tunnel"] == "local" and s["job_dir"] else None
        with run.Experiment(s["name"], executor=executor, base_dir=base_dir) as exp:
            for job in jobs:
                exp.add(training_script(run, job_config, job.overrides), executor=executor, name=job.name)
            if not dryrun:
                exp.run(detach=True)
                home = f"NEMORUN_HOME={base_dir} " if base_dir else ""
                print(
                    f"submitted {len(jobs)} job(s) as nemo-run experiment {exp._id}; logs: "
                    f"`{home}nemo experiment logs {exp._id} 0`, status: `{home}nemo experiment status {exp._id}`"
                )
                return []
            exp.dryrun(log=False, delete_exp_dir=False)
            scripts = []
            for job in exp.jobs:
                # The file nemo-run itself wrote for sbatch, not a re-rendering.
                executor: Any = job.executor  # a SlurmExecutor; Executor's annotation lacks job_name
                path = os.path.join(executor.experiment_dir, f"{executor.job_name}_sbatch.sh")
                with open(path, encoding="utf-8") as fh:
                    scripts.append(fh.read())
            if not keep_dryrun_files:
                shutil.rmtree(exp._exp_dir, ignore_errors=True)
            return scripts


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        s = settings_from(args)
        if s["packager"] == "none" and not os.path.isabs(args.config):
            raise LaunchError(
                f"packager none runs the image's gift_megatron in an empty directory: give the "
                f"training config as an absolute path mounted into the container, not {args.config!r}"
            )
        if not os.path.isfile(args.config):
            raise LaunchError(f"training config {args.config}: no such file")
        jobs = planned_jobs(
            args.config,
            args.overrides,
            args.sweep,
            s,
            validate=not args.no_validate,
            check_paths=not args.no_check_paths,
        )
        scripts = launch(args.config, jobs, s, dryrun=args.dryrun)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for job, script in zip(jobs, scripts):
        print(f"# ===== {job.name}: nemo-run submits this with `sbatch --requeue --parsable` =====")
        print(script)
    return 0


if __name__ == "__main__":
    sys.exit(main())
