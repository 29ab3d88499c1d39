"""GIFT's implicit-reward metrics measured after a step's updates (``reference: rollout``).

With ``reference: rollout`` GIFT's implicit reward is u_i = sum_t (lp - olp), the log-ratio of the policy
being trained to the policy that sampled the step. At the first update of a step the two are the same
weights, so u is exactly 0 for every member, std_g(u) is 0, and the per-prompt coefficient
beta(x) = std_g(R) / std_g(u) that the objective's statistics report is undefined (null in the metrics at
every step when the step has one update). What the step did is only visible after it: this module runs
one forward-only pass of the updated policy over the step's micro-batches and computes u against the same
rollout log-probs, then beta(x) from those, with the objective's own statistics code (so the definitions
are exactly those of ``gift/beta_x_*`` elsewhere: groups with two or more members, a reward spread and an
implicit-reward spread).

The cost is one forward pass over the batch, paid on logged steps only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gift_megatron.comm import broadcast_objects
from gift_megatron.device import to_host_floats
from gift_megatron.objectives import Members, Objective

KEYS = ("gift/beta_x_mean", "gift/beta_x_median", "gift/implicit_reward_std")


def wants_post_update_metrics(objective: Objective) -> bool:
    """GIFT against the rollout policy: the one case whose in-step beta(x) starts undefined."""
    return objective.name == "gift" and getattr(objective, "reference", None) == "rollout"


def post_update_implicit_metrics(
    objective: Objective,
    model: list[torch.nn.Module],
    micro_batches: Sequence[dict[str, Any]],
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """``{gift/beta_x_mean, gift/beta_x_median, gift/implicit_reward_std}`` of the updated policy on
    ``micro_batches`` (which carry ``old_logp`` from the step's old-policy pass), on every rank.

    Collective over the whole job like a training step: every rank must call it with its own micro-batches.
    Values are NaN where no group qualifies (e.g. every group's rewards are equal).
    """
    from megatron.core import parallel_state as ps

    from gift_megatron.megatron.forward import batch_layout, forward_logprobs, split_for_context_parallel, token_batch

    layout = batch_layout()
    # The micro-batches were validated (labels included) when the step prepared them.
    logps = forward_logprobs(
        model, micro_batches, temperature=temperature, chunk_size=chunk_size, vocab_size=vocab_size, check_labels=False
    )
    payload: list[Any] = [None]
    if logps is not None:  # the last pipeline stage
        parts = [
            objective.members(token_batch(split_for_context_parallel(mb), lp), layout)
            for mb, lp in zip(micro_batches, logps)
        ]
        metrics = objective.statistics(Members.cat(parts), layout).metrics
        payload = [to_host_floats({k: metrics[k] for k in KEYS})]  # one host copy
    broadcast_objects(
        payload, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
    )
    return payload[0]


__all__ = ["KEYS", "post_update_implicit_metrics", "wants_post_update_metrics"]
