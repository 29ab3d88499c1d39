"""A small replication study on the toy task: GIFT vs GRPO, and GFT vs SFT / DFT (the toy rows carry an
expert answer and teacher responses), several seeds each, all through the real trainer on 2 CPU ranks.

    python benchmarks/toy_convergence.py [--steps 300] [--seeds 1 2 3] [--objectives gift grpo gft sft dft]

Per run it reports the greedy eval reward at the end, the mean rollout reward of the last 20 steps, and the
first step at which the 10-step moving average of the rollout reward reaches --threshold; then the mean and
spread over seeds, side by side. Every run uses examples/tiny_cpu_gift.yaml with only the objective (and its
group composition) changed, so the comparison is on equal terms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "gift": ["objective.name=gift", "objective.options.reference=rollout"],
    "gift_frozen": ["objective.name=gift", "objective.options.reference=frozen"],
    "grpo": ["objective.name=grpo", "objective.options={}"],
    "gft": ["objective.name=gft", "objective.options={}", "rollout.n=4"],
    "sft": ["objective.name=sft", "objective.options={}", "train.micro_batch_size=8"],
    "dft": ["objective.name=dft", "objective.options={}", "train.micro_batch_size=8"],
}


def run(variant: str, seed: int, steps: int, task: str, out: str, port: int) -> dict:
    run_dir = os.path.join(out, f"{variant}_seed{seed}")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port),
        "-m",
        "gift_megatron.train",
        os.path.join(ROOT, "examples", "tiny_cpu_gift.yaml"),
        f"run.output_dir={run_dir}",
        "run.resume=none",
        "run.progress=false",
        "run.plots=false",
        "run.tensorboard=false",
        f"run.seed={seed}",
        f"train.steps={steps}",
        "run.save_interval=0",
        f"data.train_files=[{task}/train.jsonl]",
        f"data.eval_files=[{task}/eval.jsonl]",
        f"data.tokenizer={task}/tokenizer",
        *VARIANTS[variant],
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    if proc.returncode:
        raise RuntimeError(f"{variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    rewards = [r["rollout/reward_mean"] for r in records if r.get("rollout/reward_mean") is not None]
    evals = [r["eval/reward"] for r in records if r.get("eval/reward") is not None]
    return {
        "rewards": rewards,
        "eval_start": evals[0],
        "eval_end": evals[-1],
        "step_s": statistics.median(r["perf/step_s"] for r in records if "perf/step_s" in r),
    }


def first_step(rewards: list[float], threshold: float, window: int = 10) -> int | None:
    for i in range(window, len(rewards) + 1):
        if sum(rewards[i - window : i]) / window >= threshold:
            return i
    return None


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--objectives", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threshold", type=float, default=0.6, help="rollout reward for 'steps to threshold'")
    p.add_argument("--out", default=None, help="directory for the runs (default: a temporary one)")
    a = p.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="toy_convergence_")
    task = os.path.join(out, "task")
    from gift_megatron.data.toy import write_toy_task

    write_toy_task(task, num_train=2000, num_eval=100, seed=0)
    results: dict[str, list[dict]] = {}
    port = 29700
    for variant in a.objectives:
        for seed in a.seeds:
            port += 1
            r = run(variant, seed, a.steps, task, out, port)
            r["to_threshold"] = first_step(r["rewards"], a.threshold)
            results.setdefault(variant, []).append(r)
            print(
                f"{variant:12s} seed {seed}: eval {r['eval_start']:.3f} -> {r['eval_end']:.3f}, rollout reward "
                f"(last 20) {statistics.mean(r['rewards'][-20:]):.3f}, steps to {a.threshold}: "
                f"{r['to_threshold']}, {r['step_s']:.3f} s/step",
                flush=True,
            )
    print(f"\n{a.steps} steps, seeds {a.seeds}, runs in {out}")
    print(
        f"| objective | greedy eval reward, end | rollout reward, last 20 steps | steps to rollout reward "
        f"{a.threshold} (10-step avg) | s/step |"
    )
    print("|---|---|---|---|---|")
    for variant, rs in results.items():
        reached = [r["to_threshold"] for r in rs if r["to_threshold"] is not None]
        steps = f"{fmt(reached)} ({len(reached)}/{len(rs)} seeds reached)"
        print(
            f"| {variant} | {fmt([r['eval_end'] for r in rs])} | "
            f"{fmt([statistics.mean(r['rewards'][-20:]) for r in rs])} | {steps} | "
            f"{statistics.mean(r['step_s'] for r in rs):.3f} |"
        )


if __name__ == "__main__":
    main()
