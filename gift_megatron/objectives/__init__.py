"""Layer 1: the math of every objective on plain tensors (no Megatron import). The math: docs/objectives.md.

Functional API (single process, or one call per rank with a ``BatchLayout``)::

    loss, metrics = gift_loss(logp, ref_logp, mask, rewards, group_ids, beta=1.0)
    loss, metrics = gft_loss(logp, mask, rewards, group_ids, tau=0.1)

Objective API (configs select by name; groups may span micro-batches)::

    obj = build_objective("gift", beta=0.5)
    stats = obj.statistics(Members.cat([obj.members(mb) for mb in micro_batches]), layout)
    for mb in micro_batches:
        obj.loss(mb, stats, layout).loss.backward()
"""

from gift_megatron.objectives.base import (
    OBJECTIVES,
    SINGLE_PROCESS,
    BatchLayout,
    BatchStats,
    GroupDefaults,
    LossOutput,
    Members,
    Objective,
    TokenBatch,
    build_objective,
    count_totals,
    register,
)
from gift_megatron.objectives.gft import GFT, dcr_coefficient, gft_loss
from gift_megatron.objectives.gift import GIFT, gift_loss
from gift_megatron.objectives.groups import GroupStats, group_statistics, group_zscore, segment_mean_std
from gift_megatron.objectives.policy_gradient import DAPO, GRPO, GSPO, dapo_loss, grpo_loss, gspo_loss
from gift_megatron.objectives.supervised import DFT, SFT, dft_loss, sft_loss

__all__ = [
    "DAPO",
    "DFT",
    "GFT",
    "GIFT",
    "GRPO",
    "GSPO",
    "OBJECTIVES",
    "SFT",
    "SINGLE_PROCESS",
    "BatchLayout",
    "BatchStats",
    "GroupDefaults",
    "GroupStats",
    "LossOutput",
    "Members",
    "Objective",
    "TokenBatch",
    "build_objective",
    "count_totals",
    "dapo_loss",
    "dcr_coefficient",
    "dft_loss",
    "gft_loss",
    "gift_loss",
    "group_statistics",
    "group_zscore",
    "grpo_loss",
    "gspo_loss",
    "register",
    "segment_mean_std",
    "sft_loss",
]
