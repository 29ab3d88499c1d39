"""The objective contract: a new objective is one file plus one import (docs/objectives.md, "Adding an objective").

The toy objective below is registered in this file only, and trains one step through the whole trainer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from gift_megatron.objectives import (
    OBJECTIVES,
    SINGLE_PROCESS,
    BatchLayout,
    BatchStats,
    LossOutput,
    Members,
    Objective,
    TokenBatch,
    build_objective,
    count_totals,
    register,
)


@dataclass(frozen=True)
class RewardWeightedLikelihood(Objective):
    """L = -sum_{i,t} m[i,t] (R_i - baseline) lp[i,t] / (counted tokens of the global batch)."""

    baseline: float = 0.0

    name: ClassVar[str] = "toy_reward_weighted"
    inputs: ClassVar[frozenset[str]] = frozenset({"rewards"})

    def statistics(self, members: Members, layout: BatchLayout = SINGLE_PROCESS) -> BatchStats:
        n_members, n_tokens = count_totals(members, layout)
        return BatchStats(n_members, n_tokens)

    def loss(self, batch: TokenBatch, stats: BatchStats, layout: BatchLayout = SINGLE_PROCESS) -> LossOutput:
        weight = (batch.rewards.float() - self.baseline)[:, None]
        loss = -(weight * batch.masked("logp")).sum() / stats.n_tokens
        # A share whose global sum is the mean reward of the trained members (each counted once under CP).
        reward = batch.rewards.float().sum() / (stats.n_members * layout.cp_size)
        return LossOutput(loss=loss, shares={"loss": loss.detach(), "toy/reward_mean": reward}, metrics={})


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if RewardWeightedLikelihood.name not in OBJECTIVES:  # spawned ranks import this file again
    register(RewardWeightedLikelihood)


def test_toy_objective_loss_and_gradient_match_the_closed_form():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 5)).requires_grad_()
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.float32)
    rewards = torch.tensor([1.0, 0.0, 0.5])
    obj = build_objective("toy_reward_weighted", baseline=0.25)
    out = obj(TokenBatch(logp, mask, rewards=rewards))
    out.loss.backward()
    w = (rewards - 0.25)[:, None]
    expected = -(w * logp.detach() * mask).sum() / mask.sum()
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert torch.allclose(logp.grad, -w * mask / mask.sum())
    assert obj.uses == {"rewards"} and not obj.policy_statistics and obj.trains_on_rollouts


def test_contract_declarations_are_checked():
    with pytest.raises(TypeError, match="policy_statistics"):

        class Undeclared(Objective):  # computes statistics from the policy without saying so
            def member_extras(self, batch, layout):
                return {}

    with pytest.raises(TypeError, match="unknown inputs"):

        class Misspelled(Objective):
            inputs: ClassVar[frozenset[str]] = frozenset({"reward"})

    with pytest.raises(ValueError, match="twice"):
        register(RewardWeightedLikelihood)


def test_options_are_checked_against_the_objective_fields():
    with pytest.raises(ValueError, match="unknown option 'beta'"):
        build_objective("toy_reward_weighted", beta=1.0)
    # A quoted number on the command line is a string: named here, not a TypeError inside the loss.
    with pytest.raises(ValueError, match=r"option baseline must be float, got str '3e-4'"):
        build_objective("toy_reward_weighted", baseline="3e-4")
    with pytest.raises(ValueError, match=r"option beta must be float, got str"):
        build_objective("gift", beta="3e-4")
    with pytest.raises(ValueError, match=r"clip_ratio_c must be float or null"):
        build_objective("grpo", clip_ratio_c="off")
    assert build_objective("gift", beta=1).beta == 1  # an int is a float


def _train_one_step(task: str, out: str) -> list[dict]:
    """One trainer step of the toy objective, in this process (a world of one)."""
    from gift_megatron.config import load_config
    from gift_megatron.trainer.loop import train
    from tests.test_train_e2e import CONFIG, data_overrides

    cfg = load_config(
        CONFIG,
        data_overrides(task)
        + [
            f"run.output_dir={out}",
            "run.plots=false",
            "run.resume=none",
            "objective.name=toy_reward_weighted",
            "objective.options={baseline: 0.5}",
            "train.steps=1",
            "train.prompts_per_step=4",
            "train.micro_batch_size=8",
            "train.eval_prompts=4",
            "rollout.n=4",
        ],
    )
    return train(cfg)["history"]


@pytest.mark.timeout(240)
def test_toy_objective_trains_one_step_through_the_trainer(tmp_path):
    from gift_megatron.data.toy import write_toy_task

    write_toy_task(str(tmp_path / "toy"), num_train=20, num_eval=4, seed=0)
    # Its own process (the trainer owns the process group and Megatron's state); the registration is
    # this file's, imported there.
    code = (
        "import json, sys; from tests.test_objective_contract import _train_one_step; "
        "print('HISTORY', json.dumps(_train_one_step(sys.argv[1], sys.argv[2])))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "toy"), str(tmp_path / "run")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("HISTORY ")]
    (step,) = json.loads(line[len("HISTORY ") :])
    assert torch.isfinite(torch.tensor(step["loss"]))
    assert step["optim/grad_norm"] > 0
    # The objective's own metric, summed through the step's plumbing, equals the trainer's independent mean
    # of the rollout rewards (every member is a trained rollout here).
    assert step["toy/reward_mean"] == pytest.approx(step["rollout/reward_mean"], abs=1e-6)
