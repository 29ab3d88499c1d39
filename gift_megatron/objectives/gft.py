"""GFT: Group Fine-Tuning (arXiv 2604.14258); the math in docs/objectives.md, "GFT".

    A_i    = Z_g(R)_i                                    GRPO z-score over the hybrid group, no leave-one-out
    l[i,t] = -A_i * sg(c(p[i,t])) * lp[i,t],  p = exp(lp),  c(p) = p if p <= tau else 1
    L      = sum_{i,t} m[i,t] l[i,t] / (counted tokens of the global batch)

Dynamic Coefficient Rectification: d l / d p = -A c(p)/p, i.e. the ordinary 1/p weight above tau and a
weight of 1 at or below tau, which caps the inverse-probability blow-up on tokens the policy finds unlikely
(expert and teacher members). The token mean is over the whole global batch, so the result does not depend
on how the batch is cut into micro-batches (the authors' code averages per micro-batch; ours does not).
Building the hybrid groups (expert, teacher and rollout members) is the data pipeline's job; here every
member is just a row with a reward and a group id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from gift_megatron.objectives.base import (
    SINGLE_PROCESS,
    BatchLayout,
    BatchStats,
    GroupDefaults,
    LossOutput,
    Members,
    Objective,
    TokenBatch,
    register,
    require_positive,
)
from gift_megatron.objectives.groups import group_reward_statistics


def dcr_coefficient(p: torch.Tensor, tau: float) -> torch.Tensor:
    """c(p) = p where p <= tau, else 1 (same shape and dtype as ``p``)."""
    return torch.where(p <= tau, p, torch.ones_like(p))


@register
@dataclass(frozen=True)
class GFT(Objective):
    tau: float = 0.1
    eps: float = 1e-6
    unbiased: bool = True

    name: ClassVar[str] = "gft"
    inputs: ClassVar[frozenset[str]] = frozenset({"rewards", "group_ids"})
    group_relative: ClassVar[bool] = True
    # docs/objectives.md, GFT: each group mixes 1 expert demonstration and 3 teacher responses with rollouts.
    default_groups: ClassVar[GroupDefaults] = GroupDefaults(n_expert=1, n_teacher=3)

    def validate_options(self) -> None:
        require_positive(self.name, "eps", self.eps)
        if not (0 < self.tau <= 1):
            raise ValueError(f"gft: tau must be in (0, 1], got {self.tau}")

    def statistics(self, members: Members, layout: BatchLayout = SINGLE_PROCESS) -> BatchStats:
        return group_reward_statistics(members, layout, eps=self.eps, unbiased=self.unbiased)

    def loss(self, batch: TokenBatch, stats: BatchStats, layout: BatchLayout = SINGLE_PROCESS) -> LossOutput:
        lp = batch.masked("logp")
        A = stats.advantages(batch, self.eps)
        p = torch.exp(lp.detach())
        counted = batch.counted
        coeff = dcr_coefficient(p, self.tau)
        token_loss = -A[:, None] * coeff * lp
        loss = torch.where(counted, token_loss, torch.zeros_like(token_loss)).sum() / stats.n_tokens
        low = ((p <= self.tau) & counted).float().sum() / stats.n_tokens
        shares = {"loss": loss.detach(), "gft/low_prob_token_frac": low}
        return LossOutput(loss=loss, shares=shares, metrics=dict(stats.metrics))


def gft_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    tau: float = 0.1,
    eps: float = 1e-6,
    unbiased: bool = True,
    layout: BatchLayout = SINGLE_PROCESS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GFT loss (token mean over the mask): (loss fp32 scalar, metrics).

    logp, mask [B, S]; rewards [B] float; group_ids [B] int. With a distributed ``layout`` the loss is this
    rank's share of the global loss and the metrics are global.
    """
    obj = GFT(tau=tau, eps=eps, unbiased=unbiased)
    out = obj(TokenBatch(logp, mask, rewards, group_ids), layout)
    return out.loss, out.finalize(layout)
