"""The nemo-run launchers.

SLURM: the sbatch script nemo-run itself writes in a dry run (2 nodes x 8 GPUs) is parsed line by line, and
then executed by bash against a fake `srun` / `scontrol` on PATH, so that what is checked is the command each
node would really start: torchrun's arguments parsed by torchrun's own parser, the environment, the
container flags, and the training config read back from the job directory the container mounts. Sweeps,
requeue and every bad input that must stop the launcher before anything is submitted.

Local: the dry-run command, a bad layout, and (when the demo config exists) a real 2-rank CPU run.

NEMORUN_HOME, job directories and the git repository the packager ships all live under tmp_path.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("nemo_run")

from launch import local as local_launch
from launch import slurm
from launch.common import LaunchError, plan_jobs, sweep_points

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_7B = os.path.join(ROOT, "examples", "qwen2.5-7b-gift.yaml")  # TP 2
RECIPE_32B = os.path.join(ROOT, "examples", "qwen2.5-32b-gift.yaml")  # TP 8 x PP 2
TINY = os.path.join(ROOT, "examples", "tiny_cpu_gift.yaml")
IMAGE = "nvcr.io/nvidia/pytorch:25.01-py3"
HEAD_IP = "10.1.2.3"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # nemo-run's packaging runs shell commands through invoke, which reads stdin; pytest's stdin raises.
    monkeypatch.setattr(sys, "stdin", open(os.devnull))


@pytest.fixture
def training_config(monkeypatch):
    """The validation path needs the training config module. The recipes name cluster paths (/ckpt, /data)
    this machine does not have: their path checks are off here (tests/test_preflight.py covers them); the
    reward is still checked."""
    mod = pytest.importorskip("gift_megatron.config")
    real = mod.check_inputs
    monkeypatch.setattr(mod, "check_inputs", lambda cfg, paths=True: real(cfg, paths=False))
    return mod


@pytest.fixture
def repo(tmp_path):
    """A small git repository for the git packager to ship (the real one would get temporary files)."""
    path = tmp_path / "repo"
    (path / "gift_megatron").mkdir(parents=True)
    (path / "gift_megatron" / "__init__.py").write_text("")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q", str(path)], check=True)
    subprocess.run(git + ["-C", str(path), "add", "."], check=True)
    subprocess.run(git + ["-C", str(path), "commit", "-q", "-m", "code"], check=True)
    return str(path)


def cluster_file(tmp_path, repo, drop=(), **extra):
    data = {
        "account": "acct",
        "partition": "batch",
        "container_image": IMAGE,
        "container_mounts": ["/lustre/data:/data", "/lustre/results:/results"],
        "env": {"NCCL_IB_TIMEOUT": "22", "CUDA_DEVICE_MAX_CONNECTIONS": "1"},
        "job_dir": str(tmp_path / "jobs"),
        "repo": repo,
        **extra,
    }
    for key in drop:
        data.pop(key)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def dryrun(capsys, *argv):
    """The scripts `launch/slurm.py ... --dryrun` prints (stdout holds nothing else)."""
    rc = slurm.main([*argv, "--dryrun"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    parts = re.split(r"^# ===== (\S+): .*=====$", out, flags=re.M)
    assert parts[0] == ""
    return dict(zip(parts[1::2], parts[2::2]))


def sbatch_flags(script):
    flags = {}
    for key, value in re.findall(r"^#SBATCH --([a-z-]+)(?:=(.*))?$", script, flags=re.M):
        flags[key] = value if value else True
    return flags


def srun_of(script):
    (line,) = [line for line in script.splitlines() if line.startswith("srun --output")]
    return shlex.split(line)


def run_on_fake_slurm(tmp_path, script, srun_rc=0, restart_count=0):
    """Execute the sbatch script with bash as SLURM would on the head node, with fake `srun` (records its
    argv and environment, answers `hostname --ip-address`) and `scontrol` (two nodes; records requeues)."""
    fake = tmp_path / "fake_slurm"
    fake.mkdir(exist_ok=True)
    record = fake / "record"
    (fake / "srun").write_text(f"""#!/usr/bin/env python3
import json, os, sys
if "hostname" in sys.argv:
    print("{HEAD_IP}")
    sys.exit(0)
with open({str(record)!r}, "a") as fh:
    fh.write(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
sys.exit({srun_rc})
""")
    (fake / "scontrol").write_text(f"""#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\\nnode-b\\n'; exit 0; fi
echo "$@" >> {fake}/scontrol_calls
""")
    for name in ("srun", "scontrol"):
        os.chmod(fake / name, os.stat(fake / name).st_mode | stat.S_IEXEC)
    path = fake / "job.sbatch"
    path.write_text(script)
    env = {
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_JOB_ID": "4242",
        "SLURM_NODEID": "0",
        "SLURM_RESTART_COUNT": str(restart_count),
        "HOME": str(tmp_path),
    }
    proc = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=60)
    import json

    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    requeues = (fake / "scontrol_calls").read_text().split("\n") if (fake / "scontrol_calls").exists() else []
    return proc, calls, [r for r in requeues if r]


def torchrun_args(argv):
    """torchrun's own parsing of what follows `torchrun` on the srun line."""
    from torch.distributed.run import get_args_parser

    i = argv.index("torchrun")
    # The literal script passes `--node-rank $SLURM_NODEID`, which the batch shell expands (to the head
    # node's 0 on every node: c10d rendezvous ignores it and assigns ranks itself).
    rest = ["0" if a == "$SLURM_NODEID" else a for a in argv[i + 1 :]]
    return argv[:i], get_args_parser().parse_args(rest)


# ---------------------------------------------------------------------------------------------------------
# SLURM


def test_two_nodes_by_eight_gpus(tmp_path, capsys, repo, training_config):
    cfg_file = cluster_file(tmp_path, repo)
    s = slurm.settings_from(
        slurm.parser().parse_args(
            [
                "--config-file",
                cfg_file,
                "--nodes",
                "2",
                "--time",
                "02:30:00",
                "--requeue",
                "--retries",
                "2",
                "--env",
                "WANDB_MODE=offline",
                "--env",
                "GREETING=hello world",
                RECIPE_7B,
            ]
        )
    )
    overrides = ["train.steps=7", "optimizer.lr=2e-6", "objective.options={beta: 0.5, reference: rollout}"]
    jobs = slurm.planned_jobs(RECIPE_7B, overrides, None, s)
    (script,) = slurm.launch(RECIPE_7B, jobs, s, dryrun=True, keep_dryrun_files=True)

    flags = sbatch_flags(script)
    assert flags["account"] == "acct" and flags["partition"] == "batch" and flags["nodes"] == "2"
    assert flags["ntasks-per-node"] == "1"  # torchrun: one task per node, starting 8 processes
    assert flags["gpus-per-node"] == "8" and flags["time"] == "02:30:00"
    assert flags["exclusive"] is True and flags["requeue"] is True
    assert flags["job-name"] == "gift-megatron-train" and flags["open-mode"] == "append"
    job_folder = os.path.dirname(flags["output"])
    assert job_folder.startswith(str(tmp_path / "jobs" / "experiments" / "gift-megatron"))

    argv = srun_of(script)
    srun_part, targs = torchrun_args(argv)
    assert srun_part[srun_part.index("--container-image") + 1] == IMAGE
    mounts = srun_part[srun_part.index("--container-mounts") + 1].split(",")
    assert mounts[:2] == ["/lustre/data:/data", "/lustre/results:/results"]
    assert f"{job_folder}:/nemo_run" in mounts  # the job directory, where the code and config were put
    assert srun_part[srun_part.index("--container-workdir") + 1] == "/nemo_run/code"
    assert "--mpi=pmix" in srun_part and "--kill-on-bad-exit=1" in srun_part
    assert (targs.nnodes, targs.nproc_per_node, targs.rdzv_backend) == ("2", "8", "c10d")
    assert targs.rdzv_endpoint == "$head_node_ip:29500" and targs.module
    assert targs.training_script == "gift_megatron.train"
    assert targs.training_script_args == ["launch_configs/qwen2.5-7b-gift.yaml", *overrides, "run.resume=auto"]
    # The rendezvous host is the first node of the allocation, resolved once by the batch script.
    assert "head_node=${nodes_array[0]}" in script
    assert 'head_node_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address)' in script
    assert "export TORCHX_MAX_RETRIES=2" in script and 'export GREETING="hello world"' in script

    # What the container would run: the shipped config, loaded with the shipped overrides, validates for
    # the 16 ranks and is the file the launcher read.
    config_on_node = os.path.join(job_folder, "code", targs.training_script_args[0])
    assert open(config_on_node).read() == open(RECIPE_7B).read()
    assert os.path.isfile(os.path.join(job_folder, "code", "gift_megatron", "__init__.py"))  # the repo's HEAD
    cfg = training_config.load_config(config_on_node, targs.training_script_args[1:])
    assert cfg.objective.options["beta"] == 0.5 and cfg.train.steps == 7 and cfg.run.resume == "auto"

    # bash runs it as SLURM would: one srun per node set, the head node's IP substituted, the environment set.
    proc, calls, requeues = run_on_fake_slurm(tmp_path, script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (call,) = calls
    _, targs_run = torchrun_args(call["argv"])
    assert targs_run.rdzv_endpoint == f"{HEAD_IP}:29500" and targs_run.nnodes == "2"
    assert targs_run.training_script_args == targs.training_script_args
    env = call["env"]
    assert env["NCCL_IB_TIMEOUT"] == "22" and env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert env["WANDB_MODE"] == "offline" and env["GREETING"] == "hello world"
    assert requeues == []


def test_submission_through_a_fake_sbatch(tmp_path, repo, training_config):
    """A real (not dry) launch with a local tunnel: sbatch gets nemo-run's script, and the directory that
    script mounts at /nemo_run holds the shipped code and config."""
    fake = tmp_path / "fake_bin"
    fake.mkdir()
    (fake / "sbatch").write_text(f'#!/usr/bin/env bash\necho "$@" >> {fake}/sbatch_calls\necho 4242\n')
    (fake / "sacct").write_text(
        "#!/usr/bin/env bash\necho 'JobID|JobName|State|ExitCode'\necho '4242|gift-megatron-train|PENDING|0:0'\n"
    )
    (fake / "squeue").write_text("#!/usr/bin/env bash\nexit 0\n")
    for name in ("sbatch", "sacct", "squeue"):
        os.chmod(fake / name, 0o755)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "slurm.py"),
            "--config-file",
            cluster_file(tmp_path, repo),
            "--nodes",
            "2",
            "--no-check-paths",
            RECIPE_7B,
            "train.steps=3",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted 1 job(s) as nemo-run experiment gift-megatron_" in proc.stdout
    (call,) = (fake / "sbatch_calls").read_text().splitlines()
    flag1, flag2, path = call.split()
    assert (flag1, flag2) == ("--requeue", "--parsable") and path.startswith(str(tmp_path / "jobs"))
    script = open(path).read()
    srun_part, targs = torchrun_args(srun_of(script))
    mounted = [
        m.split(":")[0]
        for m in srun_part[srun_part.index("--container-mounts") + 1].split(",")
        if m.endswith(":/nemo_run")
    ]
    assert mounted == [os.path.dirname(sbatch_flags(script)["output"])]
    assert open(os.path.join(mounted[0], "code", targs.training_script_args[0])).read() == open(RECIPE_7B).read()


def test_failed_command_requeues_until_retries_are_spent(tmp_path, capsys, repo, training_config):
    scripts = dryrun(capsys, "--config-file", cluster_file(tmp_path, repo, retries=2), "--nodes", "2", RECIPE_7B)
    proc, _, requeues = run_on_fake_slurm(tmp_path, scripts["train"], srun_rc=1, restart_count=1)
    assert proc.returncode == 1 and requeues == ["requeue 4242"]
    proc, _, requeues = run_on_fake_slurm(tmp_path, scripts["train"], srun_rc=1, restart_count=2)
    assert proc.returncode == 1 and requeues == ["requeue 4242"]  # no second one: retries are spent


def test_requeue_only_when_asked_and_explicit_resume_wins(tmp_path, capsys, repo, training_config):
    scripts = dryrun(
        capsys,
        "--config-file",
        cluster_file(tmp_path, repo),
        "--mpi",
        "none",
        "--no-exclusive",
        "--cpus-per-task",
        "64",
        RECIPE_7B,
        "run.resume=none",
    )
    flags = sbatch_flags(scripts["train"])
    assert "requeue" not in flags and "exclusive" not in flags and flags["cpus-per-task"] == "64"
    srun_part, targs = torchrun_args(srun_of(scripts["train"]))
    assert "--mpi=none" in srun_part and "--cpus-per-task=64" in srun_part
    assert targs.training_script_args[-1] == "run.resume=none"
    assert "run.resume=auto" not in targs.training_script_args


def test_sweep_is_one_experiment_with_a_job_per_value(tmp_path, capsys, repo, training_config):
    scripts = dryrun(
        capsys,
        "--config-file",
        cluster_file(tmp_path, repo),
        "--sweep",
        "objective.name=gift,grpo",
        RECIPE_7B,
        "objective.options={}",
        "train.steps=3",
    )
    assert list(scripts) == ["objective.name-gift", "objective.name-grpo"]
    experiments = set()
    for (name, script), value in zip(scripts.items(), ("gift", "grpo")):
        _, targs = torchrun_args(srun_of(script))
        assert targs.training_script_args == [
            "launch_configs/qwen2.5-7b-gift.yaml",
            "objective.options={}",
            "train.steps=3",
            f"objective.name={value}",
            f"run.output_dir=/results/qwen2.5-7b-gift/{name}",
            "run.resume=auto",
        ]
        assert sbatch_flags(script)["job-name"] == f"gift-megatron-{name}"
        experiments.add(os.path.dirname(os.path.dirname(sbatch_flags(script)["output"])))
    assert len(experiments) == 1


def test_sweep_points_and_plan():
    assert sweep_points(None) == [()]
    assert sweep_points(["a=1,2", "b=x"]) == [(("a", "1"), ("b", "x")), (("a", "2"), ("b", "x"))]
    jobs = plan_jobs(["a=0", "run.output_dir=/old", "c=3"], ["a=1,2"], "/out")
    assert [j.overrides for j in jobs] == [
        ("c=3", "a=1", "run.output_dir=/out/a-1"),
        ("c=3", "a=2", "run.output_dir=/out/a-2"),
    ]
    for bad in (["a"], ["a="], ["a=1,1"], ["a=1", "a=2"]):
        with pytest.raises(LaunchError):
            sweep_points(bad)


def test_ssh_tunnel_dry_run_needs_no_cluster(tmp_path, capsys, repo, training_config):
    scripts = dryrun(
        capsys,
        "--config-file",
        cluster_file(tmp_path, repo, tunnel="ssh", host="login.example.com", user="me", job_dir="/lustre/me/nemo_run"),
        RECIPE_7B,
    )
    flags = sbatch_flags(scripts["train"])
    assert flags["output"].startswith("/lustre/me/nemo_run/gift-megatron/gift-megatron_")
    _, targs = torchrun_args(srun_of(scripts["train"]))
    assert targs.nnodes == "1" and targs.rdzv_endpoint == "localhost:0"  # one node: no head-node rendezvous


def test_example_cluster_file(tmp_path, capsys, repo, training_config):
    example = os.path.join(ROOT, "launch", "example_cluster.yaml")
    assert set(yaml.safe_load(open(example))) == set(slurm.DEFAULTS)  # documents every setting
    scripts = dryrun(capsys, "--config-file", example, "--repo", repo, "--nodes", "4", RECIPE_32B)
    flags = sbatch_flags(scripts["train"])
    assert flags["account"] == "my_account" and flags["nodes"] == "4" and flags["requeue"] is True
    _, targs = torchrun_args(srun_of(scripts["train"]))
    assert (targs.nnodes, targs.nproc_per_node) == ("4", "8")
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in scripts["train"]


def test_packager_none_runs_the_images_code_with_an_absolute_config(tmp_path, capsys, training_config):
    scripts = dryrun(capsys, "--config-file", cluster_file(tmp_path, None), "--packager", "none", RECIPE_7B)
    _, targs = torchrun_args(srun_of(scripts["train"]))
    assert targs.training_script_args[0] == RECIPE_7B


def test_entry_point_from_another_directory(tmp_path, repo, training_config):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "slurm.py"),
            "--config-file",
            cluster_file(tmp_path, repo),
            "--nodes",
            "2",
            "--no-check-paths",
            "--dryrun",
            os.path.relpath(RECIPE_7B, tmp_path),
            "train.steps=5",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("# ===== train: ") and proc.stdout.count("#!/bin/bash") == 1
    assert "-m gift_megatron.train launch_configs/qwen2.5-7b-gift.yaml train.steps=5 run.resume=auto" in proc.stdout


def test_default_repo_is_this_one():
    assert (
        slurm.git_repo({"repo": None})
        == subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    )


@pytest.mark.parametrize(
    "drop, extra, args, message",
    [
        (["account"], {}, [], "needs --account (or 'account' in --config-file)"),
        (["container_image"], {}, [], "needs --container-image (or 'container_image' in --config-file)"),
        (
            [],
            {},
            ["--nodes", "1", "--gpus-per-node", "3"],
            "nodes (1) x gpus_per_node (3) = 3 ranks do not fit the layout of",
        ),
        ([], {}, ["--nodes", "1", "--gpus-per-node", "3"], "(2 x 1 x 1 = 2)"),
        ([], {"gpus": 8}, [], "unknown key 'gpus'"),
        ([], {}, ["--env", "NOVALUE"], "--env: 'NOVALUE' is not KEY=VALUE"),
        ([], {"env": {"1X": "a"}}, [], "'1X' is not a valid environment variable name"),
        ([], {}, ["--tunnel", "ssh", "--host", "login"], "--tunnel ssh needs --user"),
        ([], {}, ["--time", "4h"], "'4h' is not a SLURM time"),
        ([], {}, ["--container-mounts", "/lustre"], "'/lustre' is not SRC:DST"),
        ([], {}, ["--sweep", "objective.name"], "expected key=value1,value2"),
        ([], {"nodes": 0}, [], "--nodes (or 'nodes' in --config-file) must be an integer >= 1, got 0"),
        ([], {"extra_sbatch": {"nodes": 4}}, [], "extra_sbatch: nodes is set by the launcher; use --nodes"),
        ([], {"exclusive": "yes"}, [], "--exclusive (or 'exclusive' in --config-file) must be true or false"),
    ],
)
def test_bad_slurm_input_fails_before_submission(tmp_path, capsys, repo, training_config, drop, extra, args, message):
    path = cluster_file(tmp_path, repo, drop=drop, **extra)
    if "--tunnel" in args:
        os.remove(path)
        path = cluster_file(tmp_path, repo, drop=["job_dir"])
    assert slurm.main(["--config-file", path, *args, "--dryrun", RECIPE_7B]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "nemorun").exists() and not (tmp_path / "jobs").exists()


def test_bad_training_config_fails_before_submission(tmp_path, capsys, repo, training_config):
    path = cluster_file(tmp_path, repo)
    assert slurm.main(["--config-file", path, "--dryrun", RECIPE_7B, "train.stpes=3"]) == 2
    assert "does not validate" in (err := capsys.readouterr().err) and "train.stpes" in err
    assert slurm.main(["--config-file", path, "--dryrun", RECIPE_32B]) == 2  # TP 8 x PP 2 on 8 GPUs
    assert "= 8 ranks do not fit the layout" in (err := capsys.readouterr().err) and "(8 x 2 x 1 = 16)" in err
    assert slurm.main(["--config-file", path, "--dryrun", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert (
        slurm.main(["--config-file", path, "--packager", "none", "--dryrun", os.path.relpath(RECIPE_7B, os.getcwd())])
        == 2
    )
    assert "absolute path" in capsys.readouterr().err
    assert slurm.main(["--config-file", path, "--sweep", "objective.name=gift,nope", "--dryrun", RECIPE_7B]) == 2
    assert "sweep point objective.name-nope" in capsys.readouterr().err
    assert not (tmp_path / "nemorun").exists() and not (tmp_path / "jobs").exists()


# ---------------------------------------------------------------------------------------------------------
# local


@pytest.mark.skipif(not os.path.exists(TINY), reason="examples/tiny_cpu_gift.yaml not there yet")
def test_local_dry_run_passes_overrides_verbatim(tmp_path, capsys, training_config):
    overrides = ["train.steps=3", "data.train_files=[a.jsonl, b.jsonl]", "objective.options={beta: 2.0}"]
    rc = local_launch.main(["--nproc-per-node", "2", "--env", "FOO=bar", "--dryrun", TINY, *overrides])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (command,) = [line for line in out.splitlines() if not line.startswith("# =====")]
    argv = shlex.split(command)
    assert "FOO=bar" in argv
    i = argv.index("torch.distributed.run")
    assert argv[i - 2 : i] == [sys.executable, "-m"]
    from torch.distributed.run import get_args_parser

    targs = get_args_parser().parse_args(argv[i + 1 :])
    assert targs.standalone and targs.nproc_per_node == "2" and targs.module
    assert targs.training_script == "gift_megatron.train" and targs.training_script_args == [TINY, *overrides]


@pytest.mark.skipif(not os.path.exists(TINY), reason="examples/tiny_cpu_gift.yaml not there yet")
def test_local_bad_layout(capsys, training_config):
    assert local_launch.main(["--nproc-per-node", "3", TINY]) == 2
    err = capsys.readouterr().err
    assert "--nproc-per-node (3) = 3 ranks do not fit" in err and "data-parallel size (3)" in err


@pytest.mark.timeout(300)
@pytest.mark.skipif(not os.path.exists(TINY), reason="examples/tiny_cpu_gift.yaml not there yet")
def test_local_launcher_runs_the_cpu_demo_config(tmp_path):
    from gift_megatron.data.toy import write_toy_task

    task = write_toy_task(str(tmp_path / "toy"), num_train=50, num_eval=8, seed=0)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "launch", "local.py"),
        "--nproc-per-node",
        "2",
        TINY,
        "train.steps=2",
        f"run.output_dir={out}",
        f"data.train_files=[{task['train']}]",
        f"data.eval_files={task['eval']}",
        f"data.tokenizer={task['tokenizer']}",
        "run.progress=false",
        "train.eval_prompts=4",
    ]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, NEMORUN_HOME=str(tmp_path / "nemorun")),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finished 1 run(s): train SUCCEEDED" in proc.stdout
    assert (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()
    checkpoints = [p for p in (out / "checkpoints").iterdir() if p.is_dir() and not p.is_symlink()]
    assert checkpoints, sorted(os.listdir(out / "checkpoints"))
