"""GRPO, DAPO and GSPO baselines (docs/objectives.md, "GRPO, DAPO and GSPO"), on the same group statistics as GIFT/GFT.

GRPO (token-level PPO clip), with r = exp(lp - olp) and A_i = Z_g(R)_i:
    l[i,t] = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i) + kl_coef * k3[i,t]
    k3     = exp(rlp - lp) - (rlp - lp) - 1                       (unbiased KL estimator, >= 0)
    aggregation "seq_mean_token_mean" (GRPO): mean over members of each member's token mean;
    aggregation "token_mean" (DAPO): sum over all counted tokens / counted tokens of the global batch.
Dual-clip (option ``clip_ratio_c`` = c > 1, off by default; verl's name and formula): where A_i < 0 the
clipped token loss is further capped, l[i,t] = min(-min(r A_i, clip(r) A_i), -c A_i). With A < 0 the PPO
clip leaves the loss unbounded in r (r A grows without limit as r grows), so one token whose probability
rose far since the rollout could dominate the step; the cap makes that token's loss the constant -c A, with
no gradient. Metric ``clip_frac_dual``: the fraction of counted tokens where the cap binds.
DAPO = GRPO with eps_high 0.28 and token_mean; its dynamic sampling and overlong shaping are data-side and
not part of the loss. GSPO: sequence ratio s_i = exp(mean_t(lp - olp)), loss_i = -min(s_i A_i,
clip(s_i, 1 - eps_low, 1 + eps_high) A_i), mean over members; default eps from the GSPO paper (3e-4, 4e-4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from gift_megatron.comm import all_reduce_sum
from gift_megatron.objectives.base import (
    SINGLE_PROCESS,
    BatchLayout,
    BatchStats,
    LossOutput,
    Members,
    Objective,
    TokenBatch,
    register,
    require_positive,
)
from gift_megatron.objectives.groups import group_reward_statistics

AGGREGATIONS = ("seq_mean_token_mean", "token_mean")


def _clipped_surrogate(
    ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(-min(r A, clip(r) A), clipped-indicator) elementwise."""
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


@register
@dataclass(frozen=True)
class GRPO(Objective):
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.0
    aggregation: str = "seq_mean_token_mean"
    eps: float = 1e-6
    unbiased: bool = True
    clip_ratio_c: float | None = None

    name: ClassVar[str] = "grpo"
    inputs: ClassVar[frozenset[str]] = frozenset({"rewards", "group_ids", "old_logp"})
    group_relative: ClassVar[bool] = True

    def option_inputs(self) -> frozenset[str]:
        return frozenset({"ref_logp"}) if self.kl_coef > 0 else frozenset()

    def validate_options(self) -> None:
        require_positive(self.name, "eps", self.eps)
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"{self.name}: aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not (0 <= self.eps_low < 1) or not self.eps_high >= 0:
            raise ValueError(
                f"{self.name}: need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}"
            )
        if not self.kl_coef >= 0:
            raise ValueError(f"{self.name}: kl_coef must be >= 0, got {self.kl_coef}")
        # c <= 1 would cap the loss below its value at r = 1 (where it is -A): every negative-advantage
        # token would be capped at the rollout policy itself and carry no gradient at all.
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            raise ValueError(
                f"{self.name}: clip_ratio_c (dual-clip) must be > 1 or null (off), got {self.clip_ratio_c}"
            )

    def statistics(self, members: Members, layout: BatchLayout = SINGLE_PROCESS) -> BatchStats:
        return group_reward_statistics(members, layout, eps=self.eps, unbiased=self.unbiased)

    def loss(self, batch: TokenBatch, stats: BatchStats, layout: BatchLayout = SINGLE_PROCESS) -> LossOutput:
        counted = batch.counted
        lp, olp = batch.masked("logp"), batch.masked("old_logp")
        A = stats.advantages(batch, self.eps)
        ratio = torch.exp(lp - olp)
        token_loss, clipped = _clipped_surrogate(ratio, A[:, None], self.eps_low, self.eps_high)
        shares = {}
        if self.clip_ratio_c is not None:
            cap = -self.clip_ratio_c * A[:, None]
            dual = (A[:, None] < 0) & (token_loss > cap)
            token_loss = torch.where(dual, cap, token_loss)
            shares["clip_frac_dual"] = (dual & counted).float().sum() / stats.n_tokens
        if batch.ref_logp is not None:
            delta = batch.masked("ref_logp") - lp
            k3 = torch.exp(delta) - delta - 1.0
            if self.kl_coef > 0:
                token_loss = token_loss + self.kl_coef * k3
            shares["kl_k3"] = (k3.detach() * counted).sum() / stats.n_tokens
        token_loss = torch.where(counted, token_loss, torch.zeros_like(token_loss))
        if self.aggregation == "token_mean":
            loss = token_loss.sum() / stats.n_tokens
        else:
            n_i = all_reduce_sum(counted.float().sum(dim=1), layout.cp_group)
            loss = (token_loss.sum(dim=1) / n_i).sum() / stats.n_members
        shares["loss"] = loss.detach()
        shares["clip_frac"] = (clipped & counted).float().sum() / stats.n_tokens
        return LossOutput(loss=loss, shares=shares, metrics=dict(stats.metrics))


@register
@dataclass(frozen=True)
class DAPO(GRPO):
    eps_high: float = 0.28
    aggregation: str = "token_mean"

    name: ClassVar[str] = "dapo"


@register
@dataclass(frozen=True)
class GSPO(Objective):
    eps_low: float = 3e-4
    eps_high: float = 4e-4
    eps: float = 1e-6
    unbiased: bool = True

    name: ClassVar[str] = "gspo"
    inputs: ClassVar[frozenset[str]] = frozenset({"rewards", "group_ids", "old_logp"})
    group_relative: ClassVar[bool] = True

    def validate_options(self) -> None:
        require_positive(self.name, "eps", self.eps)
        if not (0 <= self.eps_low < 1) or not self.eps_high >= 0:
            raise ValueError(f"gspo: need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")

    def statistics(self, members: Members, layout: BatchLayout = SINGLE_PROCESS) -> BatchStats:
        return group_reward_statistics(members, layout, eps=self.eps, unbiased=self.unbiased)

    def loss(self, batch: TokenBatch, stats: BatchStats, layout: BatchLayout = SINGLE_PROCESS) -> LossOutput:
        counted = batch.counted
        diff = batch.masked("logp") - batch.masked("old_logp")
        n_i = all_reduce_sum(counted.float().sum(dim=1), layout.cp_group)
        seq_ratio = torch.exp(all_reduce_sum(diff.sum(dim=1), layout.cp_group) / n_i)
        A = stats.advantages(batch, self.eps)
        per_member, clipped = _clipped_surrogate(seq_ratio, A, self.eps_low, self.eps_high)
        # The sequence term is replicated on every CP rank; each carries 1/cp of it.
        scale = stats.n_members * layout.cp_size
        loss = per_member.sum() / scale
        shares = {"loss": loss.detach(), "clip_frac": clipped.float().sum() / scale}
        return LossOutput(loss=loss, shares=shares, metrics=dict(stats.metrics))


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_coef: float = 0.0,
    aggregation: str = "seq_mean_token_mean",
    eps: float = 1e-6,
    unbiased: bool = True,
    clip_ratio_c: float | None = None,
    layout: BatchLayout = SINGLE_PROCESS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss: (loss fp32 scalar, metrics). logp/old_logp/ref_logp/mask [B, S]; rewards [B]; group_ids [B] int."""
    obj = GRPO(
        eps_low=eps_low,
        eps_high=eps_high,
        kl_coef=kl_coef,
        aggregation=aggregation,
        eps=eps,
        unbiased=unbiased,
        clip_ratio_c=clip_ratio_c,
    )
    out = obj(TokenBatch(logp, mask, rewards, group_ids, ref_logp=ref_logp, old_logp=old_logp), layout)
    return out.loss, out.finalize(layout)


def dapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    kl_coef: float = 0.0,
    eps: float = 1e-6,
    unbiased: bool = True,
    clip_ratio_c: float | None = None,
    layout: BatchLayout = SINGLE_PROCESS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO loss (GRPO clip with eps_high 0.28 and global token mean): (loss, metrics)."""
    obj = DAPO(
        eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef, eps=eps, unbiased=unbiased, clip_ratio_c=clip_ratio_c
    )
    out = obj(TokenBatch(logp, mask, rewards, group_ids, ref_logp=ref_logp, old_logp=old_logp), layout)
    return out.loss, out.finalize(layout)


def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    eps: float = 1e-6,
    unbiased: bool = True,
    layout: BatchLayout = SINGLE_PROCESS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO loss (sequence-level clipped ratio, mean over members): (loss, metrics)."""
    obj = GSPO(eps_low=eps_low, eps_high=eps_high, eps=eps, unbiased=unbiased)
    out = obj(TokenBatch(logp, mask, rewards, group_ids, old_logp=old_logp), layout)
    return out.loss, out.finalize(layout)
