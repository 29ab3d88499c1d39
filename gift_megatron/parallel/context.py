"""Context parallelism (CP) at the loss level: Megatron's zig-zag sequence layout and per-sequence reductions.

Megatron-Core splits a sequence of length ``S`` (divisible by ``2 * cp``) into ``2 * cp`` equal chunks and
gives CP rank ``r`` chunks ``r`` and ``2 * cp - 1 - r``, concatenated in that order, so that every rank
gets the same amount of causal-attention work. Labels are shifted before the split, so per-token
log-probs, masks and advantages computed on a rank line up with that rank's tokens.

The split here is a plain function of ``(cp_size, cp_rank)``: Megatron's ``get_batch_on_this_cp_rank``
does the same but reads the rank from a process group (and its signature changed between 0.16 and 0.19),
which tools and single-process tests do not have. Tests pin the two to the same layout.
"""

from __future__ import annotations

import torch

from gift_megatron import comm

__all__ = [
    "context_parallel_sequence_sum",
    "context_parallel_token_count",
    "zigzag_gather",
    "zigzag_split",
]


def _chunk_length(seq_len: int, cp_size: int) -> int:
    if seq_len % (2 * cp_size) != 0:
        raise ValueError(
            f"sequence length {seq_len} must be divisible by 2 * cp_size = {2 * cp_size} for the zig-zag "
            "context-parallel layout; pad the sequence"
        )
    return seq_len // (2 * cp_size)


def _normalize_dim(x: torch.Tensor, seq_dim: int) -> int:
    if not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim {seq_dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return seq_dim % x.dim()


def zigzag_split(x: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1) -> torch.Tensor:
    """This CP rank's part of ``x``: chunks ``cp_rank`` and ``2*cp_size-1-cp_rank`` of ``seq_dim``.

    ``x`` has length ``S`` along ``seq_dim`` with ``S % (2 * cp_size) == 0``; the result has length
    ``S / cp_size``. With ``cp_size == 1`` the result is ``x`` itself.
    """
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be a positive int, got {cp_size!r}")
    if isinstance(cp_rank, bool) or not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be an int in [0, {cp_size}), got {cp_rank!r}")
    dim = _normalize_dim(x, seq_dim)
    chunk = _chunk_length(x.shape[dim], cp_size)
    if cp_size == 1:
        return x
    first = x.narrow(dim, cp_rank * chunk, chunk)
    second = x.narrow(dim, (2 * cp_size - 1 - cp_rank) * chunk, chunk)
    return torch.cat([first, second], dim=dim)


def zigzag_gather(parts: list[torch.Tensor] | tuple[torch.Tensor, ...], seq_dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`zigzag_split`: ``parts[r]`` is CP rank ``r``'s part; returns the full sequence."""
    if len(parts) == 0:
        raise ValueError("parts must hold one tensor per CP rank, got none")
    shape = tuple(parts[0].shape)
    if any(tuple(p.shape) != shape for p in parts):
        raise ValueError(f"all parts must have the same shape, got {[tuple(p.shape) for p in parts]}")
    dim = _normalize_dim(parts[0], seq_dim)
    if shape[dim] % 2 != 0:
        raise ValueError(f"each part holds two equal chunks along seq_dim: its length must be even, got {shape[dim]}")
    chunk = shape[dim] // 2
    cp_size = len(parts)
    chunks: list[torch.Tensor] = [None] * (2 * cp_size)  # type: ignore[list-item]
    for rank, part in enumerate(parts):
        chunks[rank] = part.narrow(dim, 0, chunk)
        chunks[2 * cp_size - 1 - rank] = part.narrow(dim, chunk, chunk)
    return torch.cat(chunks, dim=dim)


def _check_values_mask(values: torch.Tensor, mask: torch.Tensor) -> None:
    if not values.is_floating_point():
        raise ValueError(f"values must be a floating-point tensor, got {values.dtype}")
    if values.dim() < 1:
        raise ValueError("values must have a leading batch dimension, got a 0-d tensor")
    if tuple(mask.shape) != tuple(values.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal values shape {tuple(values.shape)}")


def _masked_row_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over all but the batch dim of values*mask, in at least fp32."""
    dtype = torch.promote_types(values.dtype, torch.float32)
    v = values.to(dtype)
    if mask.dtype == torch.bool:
        # where, not multiply: padded positions may hold inf/NaN (e.g. log-probs of pad tokens) and
        # NaN * 0 would poison the whole sequence and its gradient.
        masked = torch.where(mask, v, torch.zeros((), dtype=dtype, device=v.device))
    else:
        masked = v * mask.to(dtype)
    return masked.reshape(masked.shape[0], -1).sum(dim=1)


def context_parallel_sequence_sum(
    values: torch.Tensor, mask: torch.Tensor, cp_group: torch.distributed.ProcessGroup | None = None
) -> torch.Tensor:
    """Per-sequence sum of ``values * mask`` over the whole sequence, from this CP rank's tokens.

    Args:
        values: ``[B, S_local, ...]`` floating (e.g. per-token log-probs of this rank's zig-zag part).
        mask: same shape; bool (selects tokens; masked-out values may be non-finite) or float weights.
        cp_group: the context-parallel group; None means no CP.

    Returns:
        ``[B]`` in at least fp32, identical on every CP rank. Differentiable w.r.t. ``values``.

    Gradient convention (``comm.all_reduce_sum``): each rank's partial sum receives the SUM over CP ranks
    of the upstream gradients, i.e. the gradient of the global loss ``sum_r L_r`` where ``L_r`` is the
    loss rank ``r`` backprops. When every CP rank computes the same replicated loss ``L``, the parameter
    gradients summed over CP are ``cp * dL/dtheta``. Megatron's DDP averages gradients over the
    data-parallel-with-CP group (factor ``1/(dp*cp)``), which removes that factor, so such a loss must not
    be multiplied by ``cp`` again (as Megatron's pretrain_gpt does for its non-differentiable CP reduce);
    with ``calculate_per_token_loss=True`` DDP sums instead, and the replicated loss must be divided by cp.
    """
    _check_values_mask(values, mask)
    return comm.all_reduce_sum(_masked_row_sum(values, mask), cp_group)


@torch.no_grad()
def context_parallel_token_count(
    mask: torch.Tensor, cp_group: torch.distributed.ProcessGroup | None = None
) -> torch.Tensor:
    """Per-sequence ``[B]`` fp32 sum of ``mask`` over the whole sequence (all CP ranks); no gradient."""
    if mask.dim() < 1:
        raise ValueError("mask must have a leading batch dimension, got a 0-d tensor")
    counts = mask.detach().to(torch.float32).reshape(mask.shape[0], -1).sum(dim=1)
    return comm.all_reduce_sum(counts, cp_group)
