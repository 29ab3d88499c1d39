"""Micro-batches of a global batch for :class:`~gift_megatron.megatron.step.ObjectiveStep`: padded rows
split over data-parallel ranks, packed rows under a token budget, and the checks that run before any compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gift_megatron.megatron.forward import members_in, packed_layout
from gift_megatron.objectives import Objective


def split_global_batch(
    batch: dict[str, torch.Tensor], *, micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of a global batch (every value has the members along dim 0).

    Rank r takes the r-th contiguous slice of N / dp_size members and cuts it into micro-batches of
    ``micro_batch_size``. Raises ValueError when N is not a multiple of micro_batch_size x dp_size.
    """
    if not batch:
        raise ValueError("global batch: empty")
    n = next(iter(batch.values())).shape[0]
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if n % (micro_batch_size * dp_size):
        raise ValueError(
            f"global batch size {n} is not a multiple of micro_batch_size ({micro_batch_size}) x "
            f"data-parallel size ({dp_size})"
        )
    for k, v in batch.items():
        if v.shape[0] != n:
            raise ValueError(f"global batch: {k!r} has {v.shape[0]} rows, expected {n}")
    per_rank = n // dp_size
    start = dp_rank * per_rank
    return [
        {k: v[start + i : start + i + micro_batch_size] for k, v in batch.items()}
        for i in range(0, per_rank, micro_batch_size)
    ]


def pack_global_batch(
    batch: dict[str, torch.Tensor],
    *,
    micro_batch_tokens: int,
    dp_rank: int,
    dp_size: int,
    multiple: int = 1,
    fixed_rows: bool = False,
    keep_groups: bool = True,
) -> list[dict[str, Any]]:
    """This DP rank's packed micro-batches of a global batch of padded rows, under a token budget.

    ``batch``: per-token [N, S] tensors (tokens, labels, loss_mask, optional ref_logp / old_logp) and
    per-member [N] tensors (rewards, group_ids). Each member's length is its last counted label + 1; the
    members are balanced over the ``dp_size`` ranks (every rank computes the same plan, no collective) and
    packed into the same number of rows of at most ``micro_batch_tokens`` per rank, a group kept in one row
    when it fits. ``multiple``: :func:`gift_megatron.parallel.packing.pad_multiple` of the layout (CP, SP).
    ``fixed_rows``: pad every row to the step's largest (pipeline parallelism; the same on every rank). ValueError, before any compute, for
    a member longer than the budget. Returns the micro-batch dicts ObjectiveStep takes ([1, T] rows).
    """
    from gift_megatron.parallel.packing import pack_rows, plan_bins, plan_row_tokens, sequence_lengths

    if "group_ids" not in batch or "loss_mask" not in batch:
        raise ValueError("pack_global_batch: the batch needs 'loss_mask' and 'group_ids'")
    lengths = sequence_lengths(batch["loss_mask"])
    plan = plan_bins(
        lengths,
        batch["group_ids"].tolist(),
        budget=micro_batch_tokens,
        dp_size=dp_size,
        multiple=multiple,
        keep_groups=keep_groups,
    )
    return pack_rows(
        batch,
        plan[dp_rank],
        multiple=multiple,
        lengths=lengths,
        row_tokens=plan_row_tokens(plan, lengths, multiple) if fixed_rows else None,
    )


def validate_micro_batches(
    objective: Objective,
    micro_batches: Sequence[dict[str, Any]],
    cp_size: int = 1,
    vocab_size: int | None = None,
    pp_size: int = 1,
) -> None:
    """Clear errors for micro-batches the step cannot run, before any compute.

    Padded rows: every micro-batch has the same [b, s] (and packed rows the same [1, T]) when pipeline
    parallelism sends activations between stages (``pp_size`` > 1); context parallelism needs s (packed:
    every slot) divisible by 2 x cp; the objective needs its inputs (rewards, group ids), one per member.
    With ``vocab_size``, every label must lie in [0, vocab_size) (checked here, on the host tensors, once
    per step). Packed and padded micro-batches do not mix in one step.
    """
    if not micro_batches:
        raise ValueError("micro_batches: empty list")
    kinds = {packed_layout(mb) is not None for mb in micro_batches}
    if len(kinds) > 1:
        raise ValueError("micro_batches: packed and padded micro-batches in one step")
    first_shape = None
    for i, mb in enumerate(micro_batches):
        for key in ("tokens", "labels", "loss_mask"):
            if key not in mb:
                raise ValueError(f"micro-batch {i}: missing {key!r}")
        shape = tuple(mb["tokens"].shape)
        layout = packed_layout(mb)
        if layout is not None:
            if layout.cp_size != 1 or shape != (1, layout.total):
                raise ValueError(
                    f"micro-batch {i}: packed tokens of shape {list(shape)}, expected [1, {layout.total}] "
                    "(the sum of its slots)"
                )
            if cp_size > 1 and any(p % (2 * cp_size) for p in layout.padded):
                raise ValueError(
                    f"micro-batch {i}: packed slots {list(layout.padded)} are not all divisible by 2 x "
                    f"context_parallel_size ({2 * cp_size}); pack with "
                    "gift_megatron.parallel.packing.pad_multiple(tp, cp, sequence_parallel)"
                )
        first_shape = first_shape or shape
        if pp_size > 1 and shape != first_shape:
            raise ValueError(
                f"micro-batch {i}: tokens of shape {list(shape)}, expected {list(first_shape)} (pipeline "
                "parallelism needs every micro-batch of a step to have the same shape; packed rows: "
                "pack_rows(..., row_tokens=budget))"
            )
        for key in ("labels", "loss_mask", "ref_logp", "old_logp", "position_ids"):
            if mb.get(key) is not None and tuple(mb[key].shape) != shape:
                raise ValueError(
                    f"micro-batch {i}: {key!r} has shape {list(mb[key].shape)}, expected {list(shape)} "
                    "(the shape of its tokens)"
                )
        n = members_in(mb)
        for key in ("rewards", "group_ids"):
            if key in objective.uses:
                if mb.get(key) is None:
                    raise ValueError(f"micro-batch {i}: objective {objective.name} needs {key!r}")
                if tuple(mb[key].shape) != (n,):
                    raise ValueError(
                        f"micro-batch {i}: {key!r} has shape {list(mb[key].shape)}, expected [{n}] (one per member)"
                    )
        if cp_size > 1 and layout is None and shape[1] % (2 * cp_size):
            raise ValueError(
                f"micro-batch {i}: sequence length {shape[1]} is not divisible by 2 x "
                f"context_parallel_size ({2 * cp_size})"
            )
    if vocab_size is not None:
        for i, mb in enumerate(micro_batches):
            labels = mb["labels"]
            bad = (labels < 0) | (labels >= vocab_size)
            if bool(bad.any()):
                raise ValueError(
                    f"micro-batch {i}: labels must lie in [0, {vocab_size}) (the model's vocabulary), "
                    f"got range [{int(labels.min())}, {int(labels.max())}]"
                )
