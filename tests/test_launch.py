"""Launchers through nemo-run: the real rendered sbatch script of a 2 x 8 GPU dry run, sweeps, bad input,
and a real local 2-process CPU run. NEMORUN_HOME and every job dir are under tmp_path."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("nemo_run")

from launch import local as local_launch  # noqa: E402
from launch import slurm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "examples", "qwen2.5-7b-gift.yaml")


@pytest.fixture(autouse=True)
def nemorun_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))
    monkeypatch.chdir(ROOT)  # the git packager archives this repository


def cluster_file(tmp_path, **extra):
    data = {"account": "acct", "partition": "batch", "container_image": "nvcr.io/nvidia/pytorch:25.01-py3",
            "container_mounts": ["/lustre/data:/data"], "env": {"NCCL_IB_TIMEOUT": "22"},
            "job_dir": str(tmp_path / "jobs"), **extra}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def launch(script: str, *args: str) -> subprocess.CompletedProcess:
    """The launcher as users run it (a subprocess: nemo-run's git packager reads stdin, which pytest owns)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def scripts_of(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [s for s in re.split(r"^# ===== task .*$", proc.stdout, flags=re.M)[1:]]


def test_two_nodes_by_eight_gpus_dry_run(tmp_path):
    (script,) = scripts_of(launch("slurm.py", "--config-file", cluster_file(tmp_path), "--nodes", "2", "--time",
                                  "02:30:00", "--exclusive", "--retries", "2", "--dryrun", RECIPE, "train.steps=7",
                                  "optimizer.lr=2e-6"))
    sbatch = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(.*))?$", script, flags=re.M))
    assert sbatch["account"] == "acct" and sbatch["partition"] == "batch" and sbatch["nodes"] == "2"
    assert sbatch["gpus-per-node"] == "8" and sbatch["time"] == "02:30:00" and "exclusive" in sbatch
    assert sbatch["ntasks-per-node"] == "1"  # torchrun: one task per node starting 8 processes
    assert str(tmp_path / "jobs") in sbatch["output"]
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--container-image nvcr.io/nvidia/pytorch:25.01-py3" in srun
    assert re.search(r"--container-mounts /lustre/data:/data,", srun) and "--mpi=pmix" in srun
    torchrun = srun[srun.index("torchrun"):]
    assert "--nnodes 2" in torchrun and "--nproc-per-node 8" in torchrun and "--rdzv-backend c10d" in torchrun
    assert "--rdzv-endpoint $head_node_ip:29500" in torchrun and "--node-rank $SLURM_NODEID" in torchrun
    assert torchrun.endswith(f"-m gift_megatron.train {RECIPE} train.steps=7 optimizer.lr=2e-6 run.resume=auto")
    assert "export NCCL_IB_TIMEOUT=22" in script and "export TORCHX_MAX_RETRIES=2" in script
    assert 'head_node=${nodes_array[0]}' in script


def test_sweep_is_one_experiment_with_a_job_per_value(tmp_path):
    scripts = scripts_of(launch("slurm.py", "--config-file", cluster_file(tmp_path), "--sweep",
                                "objective.name=gift,grpo", "--dryrun", RECIPE, "objective.options={}"))
    assert len(scripts) == 2
    for script, value in zip(scripts, ("gift", "grpo")):
        cmd = next(line for line in script.splitlines() if line.startswith("srun "))
        assert f"objective.name={value}" in cmd
        assert f"run.output_dir=/results/qwen2.5-7b-gift/name_{value}" in cmd


@pytest.mark.parametrize("args, message", [
    (["--account", ""], "needs --account"),
    (["--container-image", ""], "needs --container-image"),
    (["--nodes", "1", "--gpus-per-node", "3"], "world size 3 is not divisible by tensor x pipeline"),
    (["--tunnel", "ssh", "--host", "login"], "--tunnel ssh needs --host, --user and --job-dir"),
    (["--sweep", "objective.name"], "expected key=value1,value2"),
])
def test_bad_slurm_input_fails_before_submission(tmp_path, capsys, args, message):
    path = cluster_file(tmp_path)
    if "--tunnel" in args:
        data = yaml.safe_load(open(path))
        data.pop("job_dir")
        open(path, "w").write(yaml.safe_dump(data))
    rc = slurm.main(["--config-file", path, *args, "--dryrun", RECIPE])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "nemorun").exists() or not any((tmp_path / "nemorun").rglob("*.sh"))


def test_bad_cluster_file_and_training_config(tmp_path, capsys):
    assert slurm.main(["--config-file", cluster_file(tmp_path, gpus=8), "--dryrun", RECIPE]) == 2
    assert "unknown key 'gpus'" in capsys.readouterr().err
    assert slurm.main(["--config-file", cluster_file(tmp_path), "--dryrun", RECIPE, "train.stpes=3"]) == 2
    assert "unknown key train.stpes" in capsys.readouterr().err


def test_local_dry_run_and_bad_layout(capsys):
    cfg = os.path.join(ROOT, "examples", "tiny_cpu_gift.yaml")
    assert local_launch.main(["--nproc-per-node", "3", cfg]) == 2
    assert "data-parallel size (3)" in capsys.readouterr().err


@pytest.mark.timeout(400)
def test_local_launcher_runs_the_cpu_demo_config(tmp_path):
    from gift_megatron.data.toy import write_toy_task

    task = write_toy_task(str(tmp_path / "toy"), num_train=50, num_eval=8, seed=0)
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--nproc-per-node", "2",
           os.path.join(ROOT, "examples", "tiny_cpu_gift.yaml"), "train.steps=2", f"run.output_dir={out}",
           f"data.train_files={task['train']}", f"data.eval_files={task['eval']}",
           f"data.tokenizer={task['tokenizer']}", "run.progress=false", "train.eval_prompts=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", NEMORUN_HOME=str(tmp_path / "nemorun"))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    assert (out / "metrics.jsonl").is_file() and (out / "checkpoints" / "step_00000002").is_dir()
