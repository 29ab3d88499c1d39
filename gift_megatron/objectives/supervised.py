"""SFT and DFT baselines (docs/objectives.md, "SFT and DFT"): token means over the global batch's counted tokens.

SFT: L = sum_{i,t} m[i,t] (-lp[i,t]) / N_tokens
DFT: L = sum_{i,t} m[i,t] (-sg(p[i,t]) lp[i,t]) / N_tokens,  p = exp(lp)
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
    count_totals,
    register,
)


class _TokenMean(Objective):
    """Token-mean likelihood objectives: trained on demonstrations only (one expert member per group by
    default). Their rollouts are still generated and scored, for the reward metrics, but never trained on
    (imitating one's own samples is not SFT)."""

    default_groups: ClassVar[GroupDefaults] = GroupDefaults(n_expert=1)
    trains_on_rollouts: ClassVar[bool] = False

    def statistics(self, members: Members, layout: BatchLayout = SINGLE_PROCESS) -> BatchStats:
        n_members, n_tokens = count_totals(members, layout)
        return BatchStats(n_members, n_tokens)

    def token_weights(self, lp: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, batch: TokenBatch, stats: BatchStats, layout: BatchLayout = SINGLE_PROCESS) -> LossOutput:
        lp = batch.masked("logp")
        token_loss = -self.token_weights(lp.detach()) * lp
        loss = torch.where(batch.counted, token_loss, torch.zeros_like(token_loss)).sum() / stats.n_tokens
        nll = (-lp.detach()).sum() / stats.n_tokens
        return LossOutput(loss=loss, shares={"loss": loss.detach(), "nll": nll}, metrics={})


@register
@dataclass(frozen=True)
class SFT(_TokenMean):
    name: ClassVar[str] = "sft"

    def token_weights(self, lp: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(lp)


@register
@dataclass(frozen=True)
class DFT(_TokenMean):
    name: ClassVar[str] = "dft"

    def token_weights(self, lp: torch.Tensor) -> torch.Tensor:
        return torch.exp(lp)


def sft_loss(
    logp: torch.Tensor, mask: torch.Tensor, *, layout: BatchLayout = SINGLE_PROCESS
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean negative log-likelihood: (loss fp32 scalar, metrics). logp, mask [B, S]."""
    out = SFT()(TokenBatch(logp, mask), layout)
    return out.loss, out.finalize(layout)


def dft_loss(
    logp: torch.Tensor, mask: torch.Tensor, *, layout: BatchLayout = SINGLE_PROCESS
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dynamic Fine-Tuning: token mean of -sg(p) lp: (loss fp32 scalar, metrics). logp, mask [B, S]."""
    out = DFT()(TokenBatch(logp, mask), layout)
    return out.loss, out.finalize(layout)
