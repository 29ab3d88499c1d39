"""Group statistics shared by every group-relative objective (docs/objectives.md, "Group statistics").

A group is the set of responses ("members") to one prompt, identified by an integer id. Its members may
sit on different data-parallel ranks and in different micro-batches, so statistics are always computed on
the whole global batch: each rank contributes its members' scalars (a few floats per sequence) through an
all-gather over the data-parallel group, and every rank then runs the same arithmetic on the same global
vectors. That makes the statistics identical on every rank and equal (to fp32 round-off) to a
single-process computation, whatever the layout.

Conventions (docs/objectives.md, "Group statistics"):
- std is unbiased (N-1) by default, biased on request; ``eps`` is added to the std, not under the root.
- A group of one member has std 1 and its own value as mean, so its z-score is exactly 0: it carries no
  signal. (verl-style GRPO code uses mean 0 there, which makes a singleton's advantage its raw reward.)
- A group whose values are all equal has z exactly 0 (see :func:`segment_mean_std`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gift_megatron.comm import ProcessGroup, all_gather_rows
from gift_megatron.objectives.base import BatchLayout, BatchStats, Members, check_group_ids, count_totals


class _SafeSqrt(torch.autograd.Function):
    """sqrt whose gradient at 0 is 0 instead of inf.

    A group whose values are all equal has variance 0; with torch.sqrt its backward is inf * 0 = NaN,
    which would poison every parameter gradient. The subgradient 0 is the honest value there.
    """

    @staticmethod
    def forward(ctx, x):
        y = torch.sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, *grads):
        (grad,) = grads
        (y,) = ctx.saved_tensors
        safe = torch.where(y > 0, y, torch.ones_like(y))
        return torch.where(y > 0, grad / (2 * safe), torch.zeros_like(grad))


def segment_mean_std(
    values: torch.Tensor, inverse: torch.Tensor, num_groups: int, *, unbiased: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group (count, mean, std) of ``values`` [B] for members mapped to groups by ``inverse`` [B].

    Differentiable w.r.t. ``values``. Returns three fp32 tensors of shape [num_groups]. Two passes (mean,
    then squared deviations) rather than sum of squares, to avoid cancellation when |mean| >> std.

    Both passes run on values shifted by one member of their group (the first one): mean = x_ref +
    sum(x - x_ref) / n. A group whose values are all equal then has shifts of exactly 0, so its mean is
    exactly its value, every deviation is exactly 0 and so are its std and every z-score. Summing the raw
    values instead rounds: 7 x 0.37 in fp32 gives a mean one ulp off and a std of 3e-8, i.e. z-scores of
    0.03 (0.9 for 7 x 1000.1) in a group that carries no signal. The shift is detached: it cancels in the
    value, so the gradient is that of the plain mean.
    """
    values = values.float()
    count = torch.zeros(num_groups, dtype=torch.float32, device=values.device)
    count = count.index_add(0, inverse, torch.ones_like(values))
    # One member of each group (the first in order) as its reference value; scatter order does not matter
    # for correctness, only that every member of a group sees the same reference.
    first = torch.full((num_groups,), values.shape[0], dtype=torch.int64, device=values.device)
    first = first.scatter_reduce(0, inverse, torch.arange(values.shape[0], device=values.device), reduce="amin")
    ref = values.detach()[first.clamp(max=max(values.shape[0] - 1, 0))]
    shifted = values - ref[inverse]
    total = torch.zeros_like(count).index_add(0, inverse, shifted)
    mean = ref + total / count
    dev = shifted - (total / count)[inverse]
    sq = torch.zeros_like(count).index_add(0, inverse, dev * dev)
    single = count < 2
    denom = (count - 1) if unbiased else count
    var = sq / torch.where(single, torch.ones_like(denom), denom)
    std = torch.where(single, torch.ones_like(var), _SafeSqrt.apply(torch.where(single, torch.ones_like(var), var)))
    return count, mean, std


@dataclass(frozen=True)
class GroupStats:
    """Per-group statistics of one per-member quantity over the whole global batch.

    All tensors are fp32 of shape [G] except ``ids`` (int64 [G], sorted). Identical on every rank.
    """

    ids: torch.Tensor
    count: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def index(self, group_ids: torch.Tensor) -> torch.Tensor:
        """Positions in ``ids`` of each entry of ``group_ids`` [B] -> int64 [B]."""
        group_ids = group_ids.to(self.ids.device, torch.int64)
        pos = torch.searchsorted(self.ids, group_ids).clamp_(max=self.ids.numel() - 1)
        if not bool((self.ids[pos] == group_ids).all()):
            missing = group_ids[self.ids[pos] != group_ids].unique()[:5].tolist()
            raise ValueError(f"group_ids {missing} are not in the batch these statistics were computed on")
        return pos

    def zscore(
        self, values: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6, pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(values - mean_g) / (std_g + eps) for each member; gradient flows through ``values`` only.
        ``pos``: ``self.index(group_ids)`` when the caller has it (its check costs a host sync)."""
        pos = self.index(group_ids) if pos is None else pos
        return (values.float() - self.mean[pos]) / (self.std[pos] + eps)


@torch.no_grad()
def group_statistics(
    values: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    unbiased: bool = True,
    dp_group: ProcessGroup | None = None,
) -> GroupStats:
    """Exact per-group statistics of ``values`` over the global batch (no gradient).

    Args:
        values: [B] float, one scalar per member held by this rank.
        group_ids: [B] integer group id per member.
        unbiased: N-1 (True) or N (False) in the variance.
        dp_group: the ranks that hold the other members (each member on exactly one rank). Ranks that hold
            copies of the same members (tensor-, context-parallel peers) must not be in it.
    """
    check_group_ids(group_ids, values.shape[0])
    gathered = all_gather_rows(torch.stack([values.detach().double(), group_ids.double()], dim=1), dp_group)
    all_values, all_ids = gathered[:, 0].float(), gathered[:, 1].to(torch.int64)
    ids, inverse = torch.unique(all_ids, sorted=True, return_inverse=True)
    count, mean, std = segment_mean_std(all_values, inverse, ids.numel(), unbiased=unbiased)
    return GroupStats(ids=ids, count=count, mean=mean, std=std)


def group_zscore(
    values: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    unbiased: bool = True,
    dp_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """Z_g(x)_i = (x_i - mean_g x) / (std_g x + eps) for every member i; fp32 [B].

    Without ``dp_group`` the statistics are computed from ``values`` itself and the result is fully
    differentiable (gradient through mean and std too). With ``dp_group`` the statistics come from the
    global batch and carry no gradient (the objectives add the exact statistics gradient themselves where
    an option asks for it, see gift.py).
    """
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError(f"values must be a 1-D tensor [B], got {getattr(values, 'shape', type(values))}")
    check_group_ids(group_ids, values.shape[0])
    if dp_group is not None:
        return group_statistics(values, group_ids, unbiased=unbiased, dp_group=dp_group).zscore(values, group_ids, eps)
    ids, inverse = torch.unique(group_ids.to(torch.int64), sorted=True, return_inverse=True)
    _, mean, std = segment_mean_std(values, inverse, ids.numel(), unbiased=unbiased)
    return (values.float() - mean[inverse]) / (std[inverse] + eps)


# ---- the batch-level statistics every group objective shares (global vectors, identical on every rank)
def gather_member_scalars(
    members: Members, layout: BatchLayout, extra: tuple[str, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The global batch's per-member (group ids int64 [N], rewards fp32 [N], [members.extra[k] fp32 [N] for
    k in extra]), gathered over the DP group in rank order (one all-gather of a [B, 2 + len(extra)] table)."""
    if members.group_ids is None or members.rewards is None:
        raise ValueError("group statistics need every member's reward and group id")
    cols = [members.group_ids.double(), members.rewards.double()] + [members.extra[k].double() for k in extra]
    g = all_gather_rows(torch.stack(cols, dim=1), layout.dp_group)
    return g[:, 0].to(torch.int64), g[:, 1].float(), [g[:, 2 + i].float() for i in range(len(extra))]


def reward_group_stats(ids: torch.Tensor, rewards: torch.Tensor, unbiased: bool) -> tuple[GroupStats, torch.Tensor]:
    """(GroupStats of ``rewards``, inverse index int64 [N] of each member's group) for the global vectors
    ``ids`` int64 [N] and ``rewards`` fp32 [N]."""
    uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    count, mean, std = segment_mean_std(rewards, inverse, uniq.numel(), unbiased=unbiased)
    return GroupStats(uniq, count, mean, std), inverse


def reward_metrics(rewards: torch.Tensor, stats: GroupStats, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics of the explicit rewards shared by every group objective (global vectors in, fp32 scalars out)."""
    degenerate = (stats.count < 2) | (stats.std == 0)
    return {
        "reward/mean": rewards.mean(),
        "reward/std": rewards.std() if rewards.numel() > 1 else rewards.new_zeros(()),
        "advantage/abs_mean": advantages.abs().mean(),
        "groups/degenerate_frac": degenerate.float().mean(),
        "groups/count": torch.tensor(float(stats.ids.numel()), device=rewards.device),
    }


@torch.no_grad()
def group_reward_statistics(members: Members, layout: BatchLayout, *, eps: float, unbiased: bool) -> BatchStats:
    """BatchStats with the global counts and the rewards' group statistics (and their metrics): everything
    GFT and the GRPO family need, from the data alone."""
    n_members, n_tokens = count_totals(members, layout)
    ids, rewards, _ = gather_member_scalars(members, layout)
    r_stats, inverse = reward_group_stats(ids, rewards, unbiased)
    A = (rewards - r_stats.mean[inverse]) / (r_stats.std[inverse] + eps)
    return BatchStats(n_members, n_tokens, rewards=r_stats, metrics=reward_metrics(rewards, r_stats, A))
