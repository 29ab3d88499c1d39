"""Per-token log-probabilities from vocab-parallel logits, with a memory-light backward.

Megatron-Core's output layer shards the vocabulary across tensor-parallel (TP) ranks: TP rank ``r`` of ``tp``
holds the logits of the contiguous global ids ``[r * Vl, (r + 1) * Vl)``, where ``Vl`` is the size of the
last logits dimension. :func:`vocab_parallel_logprobs` returns ``log p(label)`` for every token without
gathering the vocabulary: each rank reduces its shard to a few per-token numbers and three ``[N]``-sized
quantities cross the TP group in two all-reduces.

Why not ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``: it keeps a full fp32 softmax
(4 bytes per logit) for backward, returns an fp32 gradient that autograd then casts to bf16 (2 more bytes
per logit at the peak), and overwrites fp32 input logits in place. Here backward state is one buffer in
the logits' own dtype that becomes the returned gradient, and the fp32 work is done in small blocks.
"""

from __future__ import annotations

import math

import torch

from gift_megatron import comm

__all__ = ["vocab_parallel_logprobs"]

# On CPU, an elementwise pass over a block that stays in cache costs a fraction of a pass over DRAM, and
# reusing one small block avoids page-faulting fresh memory on every call: blocks of 2-8 MiB of fp32
# measured 3-5x faster than one block of all tokens on the 2-core CI machine (32 MiB L3). The larger end
# is used because every op is one OpenMP parallel region, and on a loaded machine each region's barrier
# can wait for a descheduled thread: fewer, larger blocks degrade far less.
CPU_BLOCK_BYTES = 8 << 20
# On accelerators a block only has to be big enough to fill the device (16M elements does); one block of
# all tokens would add two fp32 copies of the logits (8 bytes per element), more than Megatron's 6.
DEVICE_BLOCK_BYTES = 64 << 20


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: torch.distributed.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    check_labels: bool = True,
) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)`` over the full vocabulary.

    Args:
        logits: ``[..., Vl]`` (typically ``[b, s, Vl]`` as Megatron-Core's GPTModel returns), bf16, fp16 or
            fp32; this TP rank's contiguous vocab shard: rank ``r`` owns global ids ``[r*Vl, (r+1)*Vl)``.
            Never modified. Non-contiguous logits are read in place when some permutation of their leading
            dimensions is contiguous (e.g. ``[s, b, V]`` transposed to ``[b, s, V]``), otherwise copied once.
        labels: ``logits.shape[:-1]``, any integer dtype, global vocab ids in ``[0, Vl * tp)``. Labels are
            already shifted (the label of position ``t`` is the token at ``t + 1``).
        tp_group: the tensor-parallel group holding the other vocab shards; None means one shard (TP=1).
        temperature: logits are divided by it (in fp32) before the softmax; must be > 0.
        chunk_size: at most this many tokens per fp32 work block (None: no limit of its own). Blocks are
            also capped to about 8 MiB of fp32 on CPU (cache-resident blocks are 3-5x faster) and 64 MiB
            on accelerators, so the fp32 temporaries never approach the size of the logits.
        vocab_size: the tokenizer's vocabulary when the model's is padded (Megatron pads it to a multiple
            of ``make_vocab_size_divisible_by x tp``): global ids ``>= vocab_size`` are left out of the
            softmax, as if their logits were ``-inf``, and get no gradient. The padded rows exist only in
            the trainer; without this the trainer's distribution gives them mass that the rollout engine
            (and the Hugging Face model, whose vocabulary is unpadded) never does. None: every id counts.

        check_labels: raise ValueError for a label outside ``[0, vocab)``. It reads a flag back from the
            device (one host sync per call); ObjectiveStep checks its labels once on the host instead and
            passes False.

    Returns:
        fp32 tensor of ``labels.shape``, replicated on every TP rank. Differentiable w.r.t. ``logits``
        (the gradient has the logits' dtype); every TP rank must run backward, as in any TP layer.

    Memory beyond the logits:
        forward only (``torch.no_grad()`` or logits not requiring grad): two fp32 blocks of at most
        ``chunk_size x Vl`` (and at most the caps above) plus ``O(N)`` per-token vectors; nothing is kept.
        With grad: additionally one buffer of the logits' shape and dtype holding this rank's shard of
        the local softmax; backward rewrites it in place into the gradient it returns, so the peak is one
        logits-sized tensor (2 bytes per element for bf16) plus the blocks. Backward may run only once.

    Precision: sums, maxima and the returned log-probs are fp32. The saved softmax is rounded to the
    logits' dtype, so each gradient entry carries at most two roundings of that dtype instead of one,
    except the label entry, which is computed in fp32 from the log-prob (``-expm1(logp)``) and stays
    accurate when ``p(label) ~ 1``. With fp16 logits, shard probabilities below about 6e-8 flush to zero.
    Individual ``-inf`` logits are fine; a token whose logits are all ``-inf`` on a shard gives NaN.
    """
    _validate(logits, labels, temperature, chunk_size)
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        raise ValueError(f"vocab_size must be None or a positive int, got {vocab_size!r}")
    if check_labels:  # the one check that waits for the device; callers that validated on the host skip it
        _check_label_range(labels, logits.shape[-1] * comm.group_size(tp_group) if vocab_size is None else vocab_size)
    if logits.requires_grad and torch.is_grad_enabled():
        return _VocabParallelLogprobs.apply(logits, labels, tp_group, float(temperature), chunk_size, vocab_size)
    with torch.no_grad():
        logp, _ = _forward(
            logits, labels, tp_group, float(temperature), chunk_size, keep_softmax=False, vocab_size=vocab_size
        )
    return logp


def _validate(logits: torch.Tensor, labels: torch.Tensor, temperature: float, chunk_size: int | None) -> None:
    """Raise ValueError naming the offending argument (host-side checks only, no device sync)."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty last (vocab) dimension, got shape {tuple(logits.shape)}")
    integer = isinstance(labels, torch.Tensor) and not (
        labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool
    )
    if not integer:
        raise ValueError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits.shape[:-1] = {tuple(logits.shape[:-1])}"
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def _check_label_range(labels: torch.Tensor, vocab_size: int) -> None:
    if labels.numel() and bool(((labels < 0) | (labels >= vocab_size)).any()):
        lo, hi = int(labels.min()), int(labels.max())
        raise ValueError(f"labels must lie in [0, {vocab_size}) (vocab shard size x TP size), got range [{lo}, {hi}]")


def _token_major_perm(logits: torch.Tensor) -> list[int] | None:
    """A permutation of the leading dims after which ``logits`` is contiguous (vocab last), or None."""
    lead = sorted(range(logits.dim() - 1), key=lambda d: -logits.stride(d))
    perm = [*lead, logits.dim() - 1]
    return perm if logits.permute(perm).is_contiguous() else None


def _block_rows(num_tokens: int, vocab_shard: int, chunk_size: int | None, device: torch.device) -> int:
    rows = num_tokens if chunk_size is None else min(chunk_size, num_tokens)
    if device.type == "cpu":
        # At least two rows per thread so the row-parallel softmax kernel keeps every core busy.
        cap = max(2 * torch.get_num_threads(), CPU_BLOCK_BYTES // (4 * vocab_shard))
    else:
        cap = max(1, DEVICE_BLOCK_BYTES // (4 * vocab_shard))
    return max(min(rows, cap), 1)


class _Forward:
    """What the forward pass leaves for backward (all tensors flat over tokens in token-major order)."""

    def __init__(
        self,
        softmax: torch.Tensor | None,
        label_index: torch.Tensor,
        in_shard: torch.Tensor,
        log_scale: torch.Tensor,
        logp: torch.Tensor,
    ) -> None:
        self.softmax = softmax  # [N, Vl] logits dtype: softmax over this shard only, or None
        self.label_index = label_index  # [N] int64: label's index inside this shard (0 when not here)
        self.in_shard = in_shard  # [N] bool: label lies in this shard
        self.log_scale = log_scale  # [N] fp32: log(shard mass) = lse_shard - lse_global, <= 0
        self.logp = logp  # [N] fp32


def _forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group: torch.distributed.ProcessGroup | None,
    temperature: float,
    chunk_size: int | None,
    keep_softmax: bool,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, tuple[_Forward, list[int]]]:
    """Return (logp shaped like labels, (saved state, permutation used for the token-major layout))."""
    tp, rank = comm.group_size(group), comm.group_rank(group)
    vocab_shard = logits.shape[-1]
    if vocab_size is not None and vocab_size > vocab_shard * tp:
        raise ValueError(f"vocab_size {vocab_size} exceeds the logits' vocabulary (shard {vocab_shard} x TP {tp})")
    # Columns of this shard that are real ids; the rest are padding, masked to -inf before the softmax.
    valid = vocab_shard if vocab_size is None else max(0, min(vocab_shard, vocab_size - rank * vocab_shard))

    perm = _token_major_perm(logits)
    if perm is None:  # no free view exists: fall back to one copy in plain row-major order
        perm = list(range(logits.dim()))
        x2d = logits.reshape(-1, vocab_shard)
    else:
        x2d = logits.permute(perm).reshape(-1, vocab_shard)  # a view: permute(perm) is contiguous
    lab = labels.permute(perm[:-1]).reshape(-1).to(device=logits.device, dtype=torch.int64)
    n = x2d.shape[0]

    local = lab - rank * vocab_shard
    in_shard = (local >= 0) & (local < vocab_shard)
    label_index = torch.where(in_shard, local, torch.zeros_like(local))
    # Same fp32 division as the per-block work below, so the label logit matches the softmax's input.
    label_logit = x2d.gather(1, label_index[:, None]).squeeze(1).float().div_(temperature)
    label_logit = torch.where(in_shard, label_logit, torch.zeros_like(label_logit))

    softmax = torch.empty_like(x2d, memory_format=torch.contiguous_format) if keep_softmax else None
    lse_shard = torch.empty(n, dtype=torch.float32, device=logits.device)
    rows = _block_rows(n, vocab_shard, chunk_size, logits.device)
    work = torch.empty(min(rows, n), vocab_shard, dtype=torch.float32, device=logits.device)
    probs = torch.empty_like(work)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        x = work[: stop - start]
        p = probs[: stop - start]
        if valid == 0:  # a shard of padding only: no mass, no gradient
            p.zero_()
            lse_shard[start:stop] = float("-inf")
            if softmax is not None:
                softmax[start:stop].zero_()
            continue
        x.copy_(x2d[start:stop])
        if temperature != 1.0:
            x.div_(temperature)
        if valid < vocab_shard:
            x[:, valid:] = float("-inf")
        torch.softmax(x, dim=-1, out=p)  # one fused, numerically stable kernel
        # softmax's largest entry is exactly exp(0) / sum, so the shard's log-sum-exp costs two cheap
        # reductions instead of separate subtract, exp and sum passes.
        lse_shard[start:stop] = x.amax(dim=-1) - p.amax(dim=-1).log()
        if softmax is not None:
            softmax[start:stop].copy_(p)
    del work, probs

    lse, label_logit = _combine_shards(lse_shard, label_logit, group, tp)
    logp = label_logit - lse
    state = _Forward(softmax, label_index, in_shard, lse_shard - lse, logp)
    out_shape = [labels.shape[d] for d in perm[:-1]]
    return logp.view(out_shape).permute(_inverse(perm[:-1])).contiguous(), (state, perm)


def _combine_shards(
    lse_shard: torch.Tensor, label_logit: torch.Tensor, group: torch.distributed.ProcessGroup | None, tp: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global log-sum-exp and label logit from per-shard ones: one MAX and one SUM all-reduce of [N] data."""
    if tp == 1:
        return lse_shard, label_logit
    peak = comm.all_reduce_max(lse_shard, group)
    # exp(-inf - peak) = 0 for a padding-only shard (peak is finite: some shard holds real ids).
    both = torch.stack([torch.exp(lse_shard - peak), label_logit])
    both = comm.all_reduce_sum(both, group)
    return peak + both[0].log(), both[1]


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _backward(state: _Forward, grad_logp: torch.Tensor, temperature: float, chunk_size: int | None) -> torch.Tensor:
    """Turn the saved shard softmax into d loss / d logits in place (token-major [N, Vl]) and return it.

    d logp / d x_j = (onehot_j - p_j) / T with p_j = softmax_shard_j * exp(log_scale).
    """
    grad = state.softmax
    assert grad is not None
    n, vocab_shard = grad.shape
    g = grad_logp.float() / temperature
    row_scale = -(g * state.log_scale.exp())
    rows = _block_rows(n, vocab_shard, chunk_size, grad.device)
    if grad.dtype == torch.float32:
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            grad[start:stop].mul_(row_scale[start:stop, None])
    else:
        # Multiply in fp32 through a small work block: a mixed-dtype in-place multiply would round the
        # scale or allocate a temporary of the whole slice, and the block stays in cache.
        work = torch.empty(min(rows, n), vocab_shard, dtype=torch.float32, device=grad.device)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            w = work[: stop - start]
            torch.mul(grad[start:stop], row_scale[start:stop, None], out=w)
            grad[start:stop].copy_(w)
    # The label entry g * (1 - p) / T from the fp32 log-prob: 1 - (rounded p) cancels when p ~ 1.
    # Written for every row (rows whose label is elsewhere keep their value) to avoid nonzero()'s sync.
    rows_all = torch.arange(n, device=grad.device)
    label_grad = (g * -torch.expm1(state.logp)).to(grad.dtype)
    current = grad[rows_all, state.label_index]
    grad[rows_all, state.label_index] = torch.where(state.in_shard, label_grad, current)
    return grad


class _VocabParallelLogprobs(torch.autograd.Function):
    """Autograd wrapper; backward consumes the saved softmax buffer in place, so it runs at most once."""

    @staticmethod
    def forward(ctx, logits, labels, group, temperature, chunk_size, vocab_size):  # type: ignore[override]
        logp, (state, perm) = _forward(
            logits, labels, group, temperature, chunk_size, keep_softmax=True, vocab_size=vocab_size
        )
        ctx.save_for_backward(state.softmax, state.label_index, state.in_shard, state.log_scale, state.logp)
        ctx.temperature, ctx.chunk_size, ctx.perm = temperature, chunk_size, perm
        ctx.lead_shape = [logits.shape[d] for d in perm]
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):  # type: ignore[override]
        softmax, label_index, in_shard, log_scale, logp = ctx.saved_tensors
        perm = ctx.perm
        g = grad_logp.permute(perm[:-1]).reshape(-1)
        state = _Forward(softmax, label_index, in_shard, log_scale, logp)
        grad2d = _backward(state, g, ctx.temperature, ctx.chunk_size)
        grad = grad2d.view(ctx.lead_shape).permute(_inverse(perm))
        return grad, None, None, None, None, None
