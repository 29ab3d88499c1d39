"""Every torch.distributed call of the package, with its tensors on the process group's device.

NCCL takes CUDA tensors only (a CPU tensor raises "No backend type associated with device type cpu"); gloo
takes CPU tensors. Each helper here moves what it is given to :func:`group_device` of its group, runs the
collective, and hands results back on the caller's device, so no call site ever creates a collective tensor
by hand. Host values (Python floats for metrics) go through :func:`all_reduce_host`, which builds their
tensor on the group's device and returns floats in one device-to-host copy.

Only torch.distributed is used here (no Megatron import), so the objective layer can take process groups
while staying independent of Megatron-Core. Every function is the identity (or a local copy) when ``group``
has a single rank or torch.distributed is not initialized, which keeps the single-process path free of any
collective. ``group=None`` means the default (world) group for the functions whose docstring says so, and
"nobody else" for the objective-layer reductions (``all_reduce_sum`` / ``all_reduce_max`` /
``all_gather_rows``), which take an explicit group or none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


class _World:
    """The type of :data:`WORLD`."""


WORLD = _World()  # marker: the default process group, for helpers where None means "nobody else"
# A group argument: a process group, WORLD, or None ("nobody else": the call is local).
Group = ProcessGroup | _World | None


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group: Group) -> int:
    """Number of ranks in ``group``; 1 when ``group`` is None or torch.distributed is not initialized."""
    if group is None or not _initialized():
        return 1
    return dist.get_world_size(_pg(group))


def group_rank(group: Group) -> int:
    """This process's rank inside ``group``; 0 when ``group`` is None."""
    if group_size(group) == 1:
        return 0
    return dist.get_rank(_pg(group))


def backend_device_type(backend_config: str) -> str:
    """ "cpu" when a backend configuration string accepts CPU tensors, else "cuda".

    ``backend_config`` is what ``torch.distributed.get_backend_config`` returns: "cpu:gloo,cuda:gloo" for
    gloo, "cuda:nccl" for NCCL, "cuda:gloo" for a gloo group restricted to CUDA tensors (which reproduces
    NCCL's rule on a CPU machine), or a bare backend name.
    """
    text = backend_config.strip().lower()
    if ":" not in text:
        return "cuda" if text == "nccl" else "cpu"
    types = {part.split(":", 1)[0].strip() for part in text.split(",") if ":" in part}
    return "cpu" if "cpu" in types else "cuda"


def group_device(group: Group = None) -> torch.device:
    """The device a tensor must be on to enter a collective over ``group`` (None / WORLD: the default
    group): the current CUDA device for NCCL, the CPU for gloo and when not initialized."""
    if not _initialized():
        return torch.device("cpu")
    if backend_device_type(str(dist.get_backend_config(_pg(group)))) == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _pg(group: Group) -> ProcessGroup | None:
    return None if isinstance(group, _World) else group


# ---------------------------------------------------------------------------------- differentiable sum
class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x, replicated; dL/dx = sum over ranks of dL/dy.

    Written here because torch.distributed.nn.functional.all_reduce changed its backward across torch
    releases; this one is the textbook rule for a loss that is the sum of per-rank losses.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _reduce(x, dist.ReduceOp.SUM, group)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        (grad,) = grads
        return _reduce(grad.contiguous(), dist.ReduceOp.SUM, ctx.group), None


def _reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    """Out-of-place all-reduce on the group's device, result on ``x``'s device."""
    dev = group_device(group)
    y = x.detach().to(dev, copy=True) if x.device != dev else x.detach().clone()
    dist.all_reduce(y, op=op, group=_pg(group))
    return y.to(x.device)


def all_reduce_sum(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Differentiable SUM all-reduce (out of place). Identity for a single-rank or absent group."""
    if group_size(group) == 1:
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _AllReduceSum.apply(x, group)
    return _reduce(x, dist.ReduceOp.SUM, group)


def all_reduce_max(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """MAX all-reduce, out of place, no gradient."""
    if group_size(group) == 1:
        return x
    return _reduce(x, dist.ReduceOp.MAX, group)


def _op(op: str, caller: str):
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"{caller}: op must be one of {sorted(ops)}, got {op!r}")
    return ops[op]


def all_reduce_host(values: Sequence[float], op: str = "sum", group: Group = WORLD) -> list[float]:
    """Reduce Python numbers over ``group`` (default: every rank) in fp64; one host copy of the result.

    ``op``: "sum" or "max". For metrics the trainer keeps on the host (counts, rewards).
    """
    reduce_op = _op(op, "all_reduce_host")
    if group_size(group) == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=group_device(group))
    dist.all_reduce(t, op=reduce_op, group=_pg(group))
    return t.tolist()


def all_reduce_tensor(x: torch.Tensor, op: str = "sum", group: Group = WORLD) -> torch.Tensor:
    """Out-of-place reduce of a device tensor over ``group`` (default: every rank), no gradient; the
    result is on ``x``'s device. ``op``: "sum" or "max"."""
    reduce_op = _op(op, "all_reduce_tensor")
    if group_size(group) == 1:
        return x
    return _reduce(x, reduce_op, group)


@torch.no_grad()
def all_gather_rows(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate along dim 0 the ``x`` of every rank in ``group``, in rank order; ranks may differ in rows.

    No gradient. Used for per-member scalars (a few floats per sequence), so padding to the longest rank
    costs nothing that matters. Result on ``x``'s device.
    """
    world = group_size(group)
    if world == 1:
        return x.detach()
    dev = group_device(group)
    x_dev = x.detach().to(dev).contiguous()
    n = torch.tensor([x_dev.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=_pg(group))
    sizes_i = torch.cat(sizes).tolist()  # one host copy for all ranks' sizes
    longest = max(sizes_i)
    padded = x_dev.new_zeros((longest, *x_dev.shape[1:]))
    padded[: x_dev.shape[0]] = x_dev
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=_pg(group))
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i)], dim=0).to(x.device)


# ------------------------------------------------------------------------------ tensors, whole or sent
def all_gather_tensors(x: torch.Tensor, group: Any) -> list[torch.Tensor]:
    """Every rank's ``x`` (same shape on every rank), in rank order, on ``x``'s device."""
    if group_size(group) == 1:
        return [x]
    dev = group_device(group)
    src = x.to(dev).contiguous()
    parts = [torch.empty_like(src) for _ in range(group_size(group))]
    dist.all_gather(parts, src, group=_pg(group))
    return [p.to(x.device) for p in parts]


def gather_tensors(x: torch.Tensor, dst: int, group: Any) -> list[torch.Tensor] | None:
    """Every rank's ``x`` (same shape) onto global rank ``dst``, in group-rank order; None elsewhere."""
    if group_size(group) == 1:
        return [x]
    dev = group_device(group)
    src = x.to(dev).contiguous()
    parts = [torch.empty_like(src) for _ in range(group_size(group))] if dist.get_rank() == dst else None
    dist.gather(src, parts, dst=dst, group=_pg(group))
    return None if parts is None else [p.to(x.device) for p in parts]


def broadcast_tensor(x: torch.Tensor, src: int, group: Any) -> torch.Tensor:
    """``x`` of global rank ``src`` on every rank of ``group`` (receivers pass a buffer of the right shape
    and dtype); returned on ``x``'s device."""
    if group_size(group) == 1:
        return x
    dev = group_device(group)
    buf = x.to(dev).contiguous()
    dist.broadcast(buf, src=src, group=_pg(group))
    return buf.to(x.device)


def send_tensor(x: torch.Tensor, dst: int, group: Group = WORLD) -> None:
    """Point-to-point send of ``x`` to global rank ``dst``."""
    dist.send(x.to(group_device(group)).contiguous(), dst=dst, group=_pg(group))


def recv_tensor(
    shape: Sequence[int], dtype: torch.dtype, src: int, group: Group = WORLD, *, device: torch.device | None = None
) -> torch.Tensor:
    """Receive a tensor of ``shape`` / ``dtype`` from global rank ``src``; returned on ``device`` (default:
    the group's device)."""
    dev = group_device(group)
    buf = torch.empty(tuple(shape), dtype=dtype, device=dev)
    dist.recv(buf, src=src, group=_pg(group))
    return buf if device is None else buf.to(device)


# -------------------------------------------------------------------------------------- Python objects
# torch's object collectives pick their own device (the current CUDA device for NCCL): nothing to move.
def broadcast_objects(objects: list[Any], src: int, group: Group = WORLD) -> list[Any]:
    """Broadcast the picklable ``objects`` list of global rank ``src`` in place; returns it."""
    if group_size(group) > 1:
        dist.broadcast_object_list(objects, src=src, group=_pg(group))
    return objects


def all_gather_objects(obj: Any, group: Group = WORLD) -> list[Any]:
    """Every rank's picklable ``obj``, in group-rank order."""
    if group_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * group_size(group)
    dist.all_gather_object(out, obj, group=_pg(group))
    return out


def send_objects(objects: list[Any], dst: int, group: Group = WORLD) -> None:
    dist.send_object_list(objects, dst=dst, group=_pg(group))


def recv_objects(n: int, src: int, group: Group = WORLD) -> list[Any]:
    box: list[Any] = [None] * n
    dist.recv_object_list(box, src=src, group=_pg(group))
    return box


def barrier(group: Group = WORLD) -> None:
    """Wait for every rank of ``group`` (no-op for one rank)."""
    if group_size(group) > 1:
        if group_device(group).type == "cuda":
            dist.barrier(group=_pg(group), device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier(group=_pg(group))


def new_group(ranks: Sequence[int]) -> ProcessGroup | None:
    """A process group over global ``ranks`` with the default group's backend. Collective: every rank of
    the world must call it with the same ranks, in the same order of calls."""
    group = dist.new_group(list(ranks))
    # Ranks outside the group get torch's GroupMember.NON_GROUP_MEMBER marker (an int): None here.
    return group if isinstance(group, ProcessGroup) else None
