"""GIFT: Group-relative Implicit Fine-Tuning (arXiv 2510.23868); the math in docs/objectives.md, "GIFT".

    u_i = sum_t m[i,t] (lp[i,t] - rlp[i,t])              implicit reward (option: mean over tokens)
    A_i = Z_g(R)_i                                        explicit advantage, no gradient
    z_i = (u_i - sg(mean_g u)) / (sg(std_g u) + eps)      normalized implicit reward
    L   = mean_i (A_i - beta z_i)^2                       mean over every member of the global batch

``detach_stats=False`` asks for the full z-score gradient (through mean_g u and std_g u). The members of a
group may be in other micro-batches whose graphs are gone by the time this one runs backward, so autograd
cannot provide it. It has a closed form in quantities the statistics pass already knows: with
g_i = dL/dz_i = -2 beta (A_i - beta z_i) / N, s = std_g u, d = n-1 (n if biased),

    dL/du_j = g_j/(s+eps) + a_g + b_g (u_j - mean_g u),
    a_g = -sum_{i in g} g_i / (n (s+eps)),   b_g = -sum_{i in g} g_i (u_i - mean_g u) / ((s+eps)^2 d s).

The first term is what the detached form gives; the loss adds sum_j sg(a_g + b_g (u_j - mean)) (u_j - sg u_j),
whose value is 0 and whose gradient is the rest. b_g is 0 where s is 0 (subgradient) or clamped by std_floor.
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
    count_totals,
    register,
    require_positive,
)
from gift_megatron.objectives.groups import (
    GroupStats,
    gather_member_scalars,
    reward_group_stats,
    reward_metrics,
    segment_mean_std,
)

SMALL_IMPLICIT_STD = 1e-4


@dataclass(frozen=True)
class ImplicitStats:
    """GIFT's own statistics (``BatchStats.extra``).

    implicit: per-group statistics of the implicit reward u (std after ``std_floor``).
    correction: with ``detach_stats=False``, the per-group coefficients (a_g, b_g), fp32 [G] each, of the
        exact gradient through the group mean and std (module docstring); None otherwise.
    """

    implicit: GroupStats
    correction: tuple[torch.Tensor, torch.Tensor] | None = None


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xc, yc = x - x.mean(), y - y.mean()
    den = torch.sqrt((xc * xc).sum() * (yc * yc).sum())
    return torch.where(
        den > 0, (xc * yc).sum() / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den)
    )


@register
@dataclass(frozen=True)
class GIFT(Objective):
    """GIFT with the options of docs/objectives.md ("GIFT"). ``reference`` picks where rlp comes from: ``frozen`` (the
    initial policy, TokenBatch.ref_logp) or ``rollout`` (the rollout policy, TokenBatch.old_logp, as the
    authors' released code does)."""

    beta: float = 1.0
    eps: float = 1e-6
    detach_stats: bool = True
    implicit_reward: str = "sum"
    std_floor: float = 0.0
    unbiased: bool = True
    reference: str = "frozen"

    name: ClassVar[str] = "gift"
    inputs: ClassVar[frozenset[str]] = frozenset({"rewards", "group_ids"})
    policy_statistics: ClassVar[bool] = True  # the implicit reward's group statistics
    group_relative: ClassVar[bool] = True

    def option_inputs(self) -> frozenset[str]:
        return frozenset({self._ref_field})

    @property
    def _ref_field(self) -> str:
        return "ref_logp" if self.reference == "frozen" else "old_logp"

    def validate_options(self) -> None:
        require_positive(self.name, "eps", self.eps)
        if self.implicit_reward not in ("sum", "mean"):
            raise ValueError(f"gift: implicit_reward must be 'sum' or 'mean', got {self.implicit_reward!r}")
        if self.reference not in ("frozen", "rollout"):
            raise ValueError(f"gift: reference must be 'frozen' or 'rollout', got {self.reference!r}")
        if not self.std_floor >= 0:
            raise ValueError(f"gift: std_floor must be >= 0, got {self.std_floor}")
        if not self.beta > 0:
            raise ValueError(f"gift: beta must be > 0, got {self.beta}")

    def implicit_rewards(self, batch: TokenBatch, layout: BatchLayout) -> torch.Tensor:
        """u [B] fp32 (differentiable through logp), summed over this sequence's tokens on every CP rank."""
        diff = batch.masked("logp") - batch.masked(self._ref_field)
        u = all_reduce_sum(diff.sum(dim=1), layout.cp_group)
        if self.implicit_reward == "mean":
            u = u / all_reduce_sum(batch.counted.float().sum(dim=1), layout.cp_group)
        return u

    def member_extras(self, batch: TokenBatch, layout: BatchLayout) -> dict[str, torch.Tensor]:
        return {"implicit_reward": self.implicit_rewards(batch, layout).detach()}

    @torch.no_grad()
    def statistics(self, members: Members, layout: BatchLayout = SINGLE_PROCESS) -> BatchStats:
        n_members, n_tokens = count_totals(members, layout)
        ids, rewards, (u,) = gather_member_scalars(members, layout, ("implicit_reward",))
        r_stats, inverse = reward_group_stats(ids, rewards, self.unbiased)
        A = (rewards - r_stats.mean[inverse]) / (r_stats.std[inverse] + self.eps)
        count, u_mean, u_std = segment_mean_std(u, inverse, r_stats.ids.numel(), unbiased=self.unbiased)
        u_std_eff = torch.clamp(u_std, min=self.std_floor)
        implicit = GroupStats(r_stats.ids, count, u_mean, u_std_eff)
        z = (u - u_mean[inverse]) / (u_std_eff[inverse] + self.eps)
        residual = A - self.beta * z

        correction = None
        if not self.detach_stats:
            G = r_stats.ids.numel()
            g = -2.0 * self.beta * residual / n_members
            dev = u - u_mean[inverse]
            S = torch.zeros(G, dtype=g.dtype, device=g.device).index_add(0, inverse, g)
            T = torch.zeros_like(S).index_add(0, inverse, g * dev)
            denom = (count - 1) if self.unbiased else count
            a = -S / (count * (u_std_eff + self.eps))
            # std moves with u only where it is a real (not clamped, not conventional) std above 0.
            live = (count >= 2) & (u_std > 0) & (u_std >= self.std_floor)
            safe = torch.where(live, denom * u_std * (u_std_eff + self.eps) ** 2, torch.ones_like(u_std))
            b = torch.where(live, -T / safe, torch.zeros_like(T))
            # A singleton's "mean" is its own value: z is identically 0, so no gradient at all.
            a = torch.where(count >= 2, a, torch.zeros_like(a))
            correction = (a, b)

        multi = count >= 2
        real_r, real_u = r_stats.std > 0, u_std > 0
        beta_x = (r_stats.std / torch.where(real_u, u_std, torch.ones_like(u_std)))[multi & real_r & real_u]
        metrics = reward_metrics(rewards, r_stats, A)
        metrics.update(
            {
                "gift/implicit_reward_mean": u.mean(),
                "gift/implicit_reward_std": u.std() if u.numel() > 1 else u.new_zeros(()),
                "gift/corr_advantage_z": _pearson(A, z),
                "gift/abs_residual_mean": residual.abs().mean(),
                "gift/beta_x_mean": beta_x.mean() if beta_x.numel() else u.new_full((), float("nan")),
                "gift/beta_x_median": beta_x.median() if beta_x.numel() else u.new_full((), float("nan")),
                "gift/small_implicit_std_frac": (multi & (u_std < SMALL_IMPLICIT_STD)).float().sum()
                / multi.float().sum().clamp(min=1),
            }
        )
        return BatchStats(
            n_members, n_tokens, rewards=r_stats, extra=ImplicitStats(implicit, correction), metrics=metrics
        )

    def loss(self, batch: TokenBatch, stats: BatchStats, layout: BatchLayout = SINGLE_PROCESS) -> LossOutput:
        u = self.implicit_rewards(batch, layout)
        pos = stats.group_positions(batch)
        A = stats.advantages(batch, self.eps, pos=pos)
        own: ImplicitStats = stats.extra
        mean, std = own.implicit.mean[pos], own.implicit.std[pos]
        z = (u - mean) / (std + self.eps)
        # u is replicated on every CP rank after its all-reduce; each rank carries 1/cp of the member's term.
        per_member = (A - self.beta * z) ** 2 / (stats.n_members * layout.cp_size)
        loss = per_member.sum()
        if own.correction is not None:
            a, b = own.correction
            coeff = a[pos] + b[pos] * (u.detach() - mean)
            loss = loss + (coeff * (u - u.detach())).sum() / layout.cp_size
        return LossOutput(loss=loss, shares={"loss": loss.detach()}, metrics=dict(stats.metrics))


def gift_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    beta: float = 1.0,
    eps: float = 1e-6,
    detach_stats: bool = True,
    implicit_reward: str = "sum",
    std_floor: float = 0.0,
    unbiased: bool = True,
    layout: BatchLayout = SINGLE_PROCESS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GIFT loss of a batch: (loss fp32 scalar, metrics dict of fp32 scalars).

    Args: logp, ref_logp, mask [B, S] float; rewards [B] float; group_ids [B] int. With a ``layout`` whose
    groups are set, each rank passes its own members and the returned loss is this rank's share (the sum
    over ranks is the global loss); the metrics are global on every rank.
    """
    obj = GIFT(
        beta=beta,
        eps=eps,
        detach_stats=detach_stats,
        implicit_reward=implicit_reward,
        std_floor=std_floor,
        unbiased=unbiased,
    )
    out = obj(TokenBatch(logp, mask, rewards, group_ids, ref_logp=ref_logp), layout)
    return out.loss, out.finalize(layout)
