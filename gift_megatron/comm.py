"""The few torch.distributed collectives the objectives and parallel layers share.

Only torch.distributed is used here (no Megatron import), so the objective layer can take process groups
while staying independent of Megatron-Core. Every function is the identity when ``group`` is None or has a
single rank, which is how the single-process path stays free of any collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    """Number of ranks in ``group``; 1 when ``group`` is None or torch.distributed is not initialized."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """This process's rank inside ``group``; 0 when ``group`` is None."""
    if group_size(group) == 1:
        return 0
    return dist.get_rank(group)


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x, replicated; dL/dx = sum over ranks of dL/dy.

    Written here because torch.distributed.nn.functional.all_reduce changed its backward across torch
    releases; this one is the textbook rule for a loss that is the sum of per-rank losses.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def all_reduce_sum(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Differentiable SUM all-reduce (out of place). Identity for a single-rank or absent group."""
    if group_size(group) == 1:
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _AllReduceSum.apply(x, group)
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
    return y


def all_reduce_max(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """MAX all-reduce, out of place, no gradient."""
    if group_size(group) == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX, group=group)
    return y


@torch.no_grad()
def all_gather_rows(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate along dim 0 the ``x`` of every rank in ``group``, in rank order; ranks may differ in rows.

    No gradient. Used for per-member scalars (a few floats per sequence), so padding to the longest rank
    costs nothing that matters.
    """
    world = group_size(group)
    if world == 1:
        return x.detach()
    x = x.detach().contiguous()
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes_i = [int(s.item()) for s in sizes]
    longest = max(sizes_i)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i)], dim=0)
