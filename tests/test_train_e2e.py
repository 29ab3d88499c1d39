"""The trainer end to end: 2 CPU ranks under torchrun, the toy task, crash-safe resume after SIGKILL.

Each job runs in its own process group under a timeout, so a hang fails the test instead of eating CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.multiproc import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "tiny_cpu_gift.yaml")


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
    from gift_megatron.data.toy import write_toy_task

    out = tmp_path_factory.mktemp("toy")
    write_toy_task(str(out), num_train=200, num_eval=20, seed=0)
    return str(out)


def data_overrides(task: str) -> list[str]:
    return [
        f"data.train_files=[{task}/train.jsonl]",
        f"data.eval_files=[{task}/eval.jsonl]",
        f"data.tokenizer={task}/tokenizer",
        "run.progress=false",
        "run.tensorboard=false",
    ]


def torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        "-m",
        "gift_megatron.train",
        CONFIG,
        *args,
    ]


def run_job(args, *, timeout=300, nproc=2, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        torchrun(args, nproc),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.timeout(400)
def test_two_rank_run_writes_metrics_checkpoints_plots_and_config(toy_task, tmp_path):
    run = str(tmp_path / "run")
    # Packed micro-batches under a token budget: every replica's members are balanced over the 2 DP ranks;
    # a group of 8 (at most 8 x 10 tokens) fits a 96-token bin, so GIFT still computes in place.
    run_job(
        data_overrides(toy_task)
        + [
            f"run.output_dir={run}",
            "train.steps=3",
            "run.save_interval=2",
            "train.eval_interval=0",
            "train.eval_prompts=8",
            "objective.options.reference=frozen",
            "train.micro_batch_size=null",
            "train.micro_batch_tokens=96",
        ]
    )
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    steps = [r["step"] for r in records]
    assert steps == [0, 1, 2, 3], steps  # step 0: the greedy evaluation before training
    last = records[-1]
    for key in (
        "loss",
        "rollout/reward_mean",
        "response/length_mean",
        "kl/reference",
        "gift/beta_x_mean",
        "perf/tokens_per_s",
        "eval/reward",
    ):
        assert key in last, key
    assert last["stats_source/in_place"] == 1.0  # every group whole in one packed micro-batch
    # 16 prompts x 8 members of at most 10 tokens; packed bins of 96 tokens hold them with little padding.
    assert 0 < last["perf/tokens_real"] <= last["perf/tokens_computed"] <= 1.25 * last["perf/tokens_real"] + 2 * 96
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step_00000002", "step_00000003"]
    assert os.path.isfile(os.path.join(run, "config.yaml"))
    for name in ("reward.png", "loss.png", "kl.png", "summary.png"):
        assert os.path.isfile(os.path.join(run, "plots", name)), name


@pytest.mark.timeout(400)
def test_pipeline_parallel_run_completes_with_exact_weight_sync(toy_task, tmp_path):
    """PP=2 on 2 ranks with packed rows, GRPO with a KL term (reference and old-policy passes on both stages). It used to hang
    at step 1: the first stage, which never receives ref_logp, ran the reference pass a second time alone.
    The engine's sampling log-probs must equal the trainer's old-policy pass (weights gathered over PP), and
    the KL, computed on the last stage (not the rollout owner), must reach the metrics."""
    run = tmp_path / "pp2"
    run_job(
        data_overrides(toy_task)
        + [
            f"run.output_dir={run}",
            "parallel.pipeline_model_parallel_size=2",
            "train.steps=2",
            "run.save_interval=0",
            "train.eval_interval=0",
            "train.eval_prompts=4",
            "objective.name=grpo",
            "objective.options={kl_coef: 0.05}",
            "optimizer.use_distributed_optimizer=false",
            "run.plots=false",
            # packed rows, each padded to the budget (pipeline stages exchange fixed shapes)
            "train.micro_batch_size=null",
            "train.micro_batch_tokens=48",
        ],
        timeout=380,
    )
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert r["perf/tokens_real"] <= r["perf/tokens_computed"] <= 2 * r["perf/tokens_real"]
        assert r["rollout/logprob_gap_max"] < 1e-4, r["rollout/logprob_gap_max"]
        assert "kl/reference" in r and abs(r["kl/reference"]) < 1e3


@pytest.mark.timeout(400)
def test_moe_expert_parallel_run_syncs_experts_exactly(toy_task, tmp_path):
    """The MoE demo (Qwen3-MoE-shaped, 4 experts, EP=2 over 2 ranks that are separate replicas): every weight
    sync gathers the experts the other rank holds, so the engine's sampling log-probs equal the trainer's."""
    run = tmp_path / "moe"
    moe = os.path.join(ROOT, "examples", "tiny_cpu_moe_gift.yaml")
    args = data_overrides(toy_task) + [
        f"run.output_dir={run}",
        "train.steps=2",
        "run.save_interval=0",
        "train.eval_interval=0",
        "train.eval_prompts=4",
        "run.plots=false",
    ]
    cmd = torchrun(args)
    cmd[cmd.index(CONFIG)] = moe
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=360, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    for r in records[1:]:
        assert r["rollout/logprob_gap_max"] < 1e-4, r["rollout/logprob_gap_max"]
        assert r["moe/aux_loss"] > 0 and "moe/load_balance_max" in r


@pytest.mark.timeout(600)
def test_sigkill_mid_step_then_resume_auto_gives_the_same_losses(toy_task, tmp_path):
    common = data_overrides(toy_task) + [
        "train.steps=5",
        "run.save_interval=2",
        "train.eval_interval=0",
        "train.eval_prompts=4",
        "run.plots=false",
    ]
    straight = str(tmp_path / "straight")
    run_job(common + [f"run.output_dir={straight}"])
    expected = losses(straight)
    assert sorted(expected) == [1, 2, 3, 4, 5]
    # The tiny config's GIFT has reference: rollout and one update a step, so u = 0 at that update and its
    # beta(x) is undefined: the trainer reports it from the updated policy (trainer/implicit_metrics.py).
    with open(os.path.join(straight, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh if '"loss"' in line]
    for r in records:
        for key in ("gift/beta_x_mean", "gift/beta_x_median", "gift/implicit_reward_std"):
            assert r.get(key) is not None and r[key] > 0, (r["step"], key, r.get(key))

    crashed = str(tmp_path / "crashed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        torchrun(common + [f"run.output_dir={crashed}"]),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    metrics = os.path.join(crashed, "metrics.jsonl")
    deadline = time.time() + 300
    try:
        # Kill during step 4: after step 3 is logged (a checkpoint of step 2 exists), before step 4 ends.
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and 3 in losses(crashed):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert 5 not in losses(crashed)
    run_job(common + [f"run.output_dir={crashed}", "run.resume=auto"])
    resumed = losses(crashed)
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), (step, resumed, expected)


@pytest.mark.timeout(300)
def test_start_up_errors_before_any_compute(toy_task, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+2=", "answer": "3"}\n{"answer": "4"}\n')
    proc = run_job(
        data_overrides(toy_task) + [f"run.output_dir={tmp_path / 'r1'}", f"data.train_files=[{bad}]"], check=False
    )
    assert proc.returncode != 0 and f"{bad}:2" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "r1" / "checkpoints").exists()

    proc = run_job(
        data_overrides(toy_task)
        + [f"run.output_dir={tmp_path / 'r2'}", "model.vocab_size=8", "model.make_vocab_size_divisible_by=8"],
        check=False,
    )
    assert proc.returncode != 0 and "vocab" in proc.stderr.lower(), proc.stderr[-3000:]

    proc = run_job(
        data_overrides(toy_task) + [f"run.output_dir={tmp_path / 'r3'}", "parallel.tensor_model_parallel_size=4"],
        check=False,
    )
    assert proc.returncode != 0 and "world size 2 is not divisible" in proc.stderr, proc.stderr[-3000:]
