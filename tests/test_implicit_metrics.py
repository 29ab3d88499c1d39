"""GIFT ``reference: rollout``: beta(x) of the updated policy (gift_megatron/trainer/implicit_metrics.py).

At the step's only update u = lp - olp is 0, so the update's own beta(x) is undefined (NaN); after the
update one forward-only pass measures it. Checked against an independent computation from the model's
logits (torch.log_softmax, torch.std per group).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.multiproc import run_ranks
from tests.test_megatron_step import SPEC, make_optimizer, my_micro_batches
from tests.tiny_gpt import Layout, build_model, setup_parallel, teardown_parallel


def post_update_worker(rank, world):
    from gift_megatron.megatron.step import ObjectiveStep
    from gift_megatron.objectives import build_objective
    from gift_megatron.trainer.implicit_metrics import post_update_implicit_metrics, wants_post_update_metrics

    setup_parallel(Layout())
    try:
        model = build_model(SPEC, Layout())
        ddp, opt = make_optimizer(model, model.config)
        obj = build_objective("gift", reference="rollout", std_floor=0.05)
        assert wants_post_update_metrics(obj) and not wants_post_update_metrics(build_objective("gift"))
        step = ObjectiveStep(obj, [ddp], opt)
        mbs = my_micro_batches(0, 1, 2, False)
        step.fill_reference_logprobs(mbs)  # the rollout policy's log-probs, as the trainer does once a step
        during = step(mbs).metrics["gift/beta_x_mean"]
        after = post_update_implicit_metrics(obj, [ddp], mbs)
        # Independent: the updated model's logits, a plain log_softmax, per-group torch.std.
        with torch.no_grad():
            us, rewards, gids = [], [], []
            for mb in mbs:
                pos = torch.arange(mb["tokens"].shape[1])[None].expand_as(mb["tokens"])
                logits = ddp.module(mb["tokens"], pos, None).float()
                lp = torch.log_softmax(logits, -1).gather(-1, mb["labels"][..., None])[..., 0]
                us.append(((lp - mb["old_logp"]) * mb["loss_mask"]).sum(1))
                rewards.append(mb["rewards"])
                gids.append(mb["group_ids"])
        u, R, gid = torch.cat(us), torch.cat(rewards), torch.cat(gids)
        ratios = torch.stack([R[gid == g].std() / u[gid == g].std() for g in gid.unique()])
        return during, after, float(ratios.mean()), float(ratios.median()), float(u.std())
    finally:
        teardown_parallel()


@pytest.mark.timeout(120)
def test_post_update_beta_x_matches_an_independent_computation():
    during, after, mean, median, u_std = run_ranks(post_update_worker, 1, timeout=100)[0]
    assert math.isnan(during)  # the problem: u = 0 at the update, beta(x) undefined
    assert after["gift/beta_x_mean"] == pytest.approx(mean, rel=1e-4)
    assert after["gift/beta_x_median"] == pytest.approx(median, rel=1e-4)
    assert after["gift/implicit_reward_std"] == pytest.approx(u_std, rel=1e-4)
    assert mean > 0
