"""Packed sequences (Megatron-Core's THD format) and token-budget micro-batches.

A packed micro-batch is one row ``[1, T]``: the sequences of its members laid end to end. Each sequence
sits in a *slot* of its own, padded to a multiple of what the layout needs (:func:`pad_multiple`: 2 x cp for
context parallelism's per-sequence zig-zag split, x tp for sequence parallelism). Attention and RoPE see the
slots through ``cu_seqlens`` (real lengths) and ``cu_seqlens_padded`` (slot boundaries), so every sequence
attends only to itself and its rotary positions restart at 0: the model computes exactly what it computes
on the sequence alone.

A sequence's *length* is the number of input positions up to its last counted label (the last token with
``loss_mask > 0``): with causal attention nothing after it can change a counted log-prob, so it is not
computed at all.

The planning here is plain host arithmetic on lengths, the same on every rank (every rank computes the same
plan from the same global list, so no collective is needed):

1. items: a whole group when it fits the budget (GIFT then computes its statistics in place), else members;
2. :func:`karmarkar_karp` spreads items over the data-parallel ranks with near-equal token loads;
3. :func:`first_fit_decreasing` packs each rank's items into bins of at most ``budget`` tokens;
4. every rank then gets the same number of bins (pipeline schedules and expert parallelism need it): ranks
   with fewer split their fullest bins.

Why by hand: Megatron-Core's packing utilities pack a dataset offline (SFT); they neither balance a batch
across data-parallel ranks nor keep groups together. verl's balancing is Karmarkar-Karp too, but it is not
an installable utility of the stack we pin.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "PackedLayout",
    "first_fit_decreasing",
    "karmarkar_karp",
    "pack_rows",
    "pad_multiple",
    "plan_bins",
    "plan_row_tokens",
    "sequence_lengths",
    "trim_rows",
    "unpack",
    "zigzag_positions",
]


def pad_multiple(tp: int = 1, cp: int = 1, sequence_parallel: bool = False) -> int:
    """The multiple every packed slot (and every trimmed row) is padded to: 2 x cp when cp > 1 (the
    zig-zag split cuts each sequence into 2 x cp equal chunks), times tp with sequence parallelism (the
    sequence dimension is sharded over TP ranks)."""
    m = 2 * cp if cp > 1 else 1
    return m * tp if sequence_parallel and tp > 1 else m


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class PackedLayout:
    """Where each member of a packed micro-batch lives in its row (host metadata, no tensors).

    lengths: real input positions of each sequence. padded: its slot in the full row (>= length, a multiple
    of the pad multiple; the last slot also absorbs the row's tail padding); sum(padded) = T.
    cp_size: 1 for the full row; c > 1 for one context-parallel rank's part, whose slots are padded / c
    (each sequence zig-zag split on its own, see :func:`zigzag_positions`).
    """

    lengths: tuple[int, ...]
    padded: tuple[int, ...]
    cp_size: int = 1

    def __post_init__(self) -> None:
        if len(self.lengths) != len(self.padded) or not self.lengths:
            raise ValueError(f"packed layout: {len(self.lengths)} lengths and {len(self.padded)} slots")
        for n, p in zip(self.lengths, self.padded):
            if not 0 < n <= p or p % self.cp_size:
                raise ValueError(f"packed layout: a sequence of {n} tokens in a slot of {p} (cp {self.cp_size})")

    @property
    def n(self) -> int:
        """Members (sequences) in the row."""
        return len(self.lengths)

    @property
    def slots(self) -> tuple[int, ...]:
        """Slot sizes of this view: padded / cp_size."""
        return tuple(p // self.cp_size for p in self.padded)

    @property
    def total(self) -> int:
        """Row length of this view (T / cp_size)."""
        return sum(self.padded) // self.cp_size

    def for_cp_rank(self, cp_size: int) -> PackedLayout:
        """The view of one of ``cp_size`` context-parallel ranks (each holds padded / cp of every slot)."""
        return PackedLayout(self.lengths, self.padded, cp_size)

    def cu_seqlens(self, device: torch.device, padded: bool = False) -> torch.Tensor:
        """[n + 1] int32 cumulative lengths over the FULL row (Megatron's convention, also under CP):
        real lengths, or slot boundaries with ``padded``."""
        sizes = self.padded if padded else self.lengths
        out = [0]
        for s in sizes:
            out.append(out[-1] + s)
        return torch.tensor(out, dtype=torch.int32, device=device)


def sequence_lengths(loss_mask: torch.Tensor) -> list[int]:
    """Input positions each row needs: up to and including its last counted label (at least 1).

    loss_mask [N, S]. With causal attention nothing after the last counted label reaches a counted
    log-prob, so trimming or packing at these lengths changes no loss, gradient or metric.
    """
    s = loss_mask.shape[1]
    counted = loss_mask > 0
    pos = torch.arange(1, s + 1, device=loss_mask.device).expand_as(counted)
    last = torch.where(counted, pos, torch.zeros_like(pos)).amax(dim=1)
    return [max(int(v), 1) for v in last.tolist()]


# ------------------------------------------------------------------------------------------ planning
def karmarkar_karp(weights: Sequence[int], k: int) -> list[list[int]]:
    """Indices of ``weights`` in ``k`` parts with near-equal sums (the largest differencing method).

    Every index starts as its own k-way partition; the two partitions with the largest spread are merged,
    heaviest part of one with the lightest of the other, until one remains. Deterministic for equal input.
    Parts are returned heaviest first; a part may be empty when there are fewer weights than parts.
    """
    if k < 1:
        raise ValueError(f"karmarkar_karp: k must be >= 1, got {k}")
    heap: list[tuple[int, int, list[tuple[int, list[int]]]]] = []
    for tie, (i, w) in enumerate(sorted(enumerate(weights), key=lambda x: (-x[1], x[0]))):
        parts = [(int(w), [i])] + [(0, []) for _ in range(k - 1)]
        heapq.heappush(heap, (-int(w), tie, parts))
    if not heap:
        return [[] for _ in range(k)]
    tie = len(heap)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))]
        merged.sort(key=lambda p: (-p[0], p[1][:1]))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    return [sorted(idx) for _, idx in heap[0][2]]


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``sizes`` packed into bins of at most ``capacity``: largest first, each into the first
    bin with room. Every size must be <= capacity."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        for b, load in enumerate(loads):
            if load + sizes[i] <= capacity:
                bins[b].append(i)
                loads[b] += sizes[i]
                break
        else:
            bins.append([i])
            loads.append(sizes[i])
    return bins


def _split_to(bins: list[list[list[int]]], sizes: Sequence[int], k: int, rank: int) -> list[list[list[int]]]:
    """Split bins (lists of items, each a list of member indices) until there are ``k``.

    A bin with several items is split first (its groups stay whole); only when none has, a group item is
    broken into its members. The fullest candidate is split, its items dealt largest first to the lighter
    half.
    """
    bins = [list(b) for b in bins]

    def load(b):
        return sum(sizes[m] for item in b for m in item)

    while len(bins) < k:
        multi = [j for j, b in enumerate(bins) if len(b) > 1]
        if not multi:
            multi = [j for j, b in enumerate(bins) if sum(len(item) for item in b) > 1]
            if not multi:
                n = sum(len(item) for b in bins for item in b)
                raise ValueError(
                    f"data-parallel rank {rank} holds {n} members but every rank must run {k} "
                    "micro-batches; raise train.micro_batch_tokens or send more prompts per step"
                )
            j = max(multi, key=lambda j: (load(bins[j]), -j))
            bins[j] = [[m] for item in bins[j] for m in item]  # break the group
        else:
            j = max(multi, key=lambda j: (load(bins[j]), -j))
        items = sorted(bins[j], key=lambda it: -sum(sizes[m] for m in it))
        halves: list[list[list[int]]] = [[], []]
        for item in items:
            lighter = min((0, 1), key=lambda h: sum(sizes[m] for it in halves[h] for m in it))
            halves[lighter].append(item)
        bins[j : j + 1] = halves
    return bins


def plan_bins(
    lengths: Sequence[int],
    group_ids: Sequence[int],
    *,
    budget: int,
    dp_size: int = 1,
    multiple: int = 1,
    bins_multiple: int = 1,
    keep_groups: bool = True,
) -> list[list[list[int]]]:
    """Member indices of every micro-batch of every data-parallel rank: ``plan[rank][bin]``.

    lengths: each member's sequence length (:func:`sequence_lengths`); group_ids: its group. Each member
    takes ``round_up(length, multiple)`` tokens of a bin of at most ``budget``. Every rank gets the same
    number of bins, a multiple of ``bins_multiple`` (optimizer updates per step). With ``keep_groups``, a
    group whose members fit one bin together is placed whole. Raises ValueError, before any compute, for a
    member longer than the budget or a budget that is not a multiple of ``multiple``.
    """
    if budget < 1 or budget % multiple:
        raise ValueError(
            f"train.micro_batch_tokens ({budget}) must be a positive multiple of {multiple}, the "
            "padding every sequence needs for context parallelism (2 x cp) and sequence "
            "parallelism (x tp)"
        )
    if len(lengths) != len(group_ids):
        raise ValueError(f"plan_bins: {len(lengths)} lengths but {len(group_ids)} group ids")
    sizes = [_round_up(int(n), multiple) for n in lengths]
    for i, s in enumerate(sizes):
        if s > budget:
            raise ValueError(
                f"member {i} (group {group_ids[i]}) needs {s} tokens (length {lengths[i]}, padded to a "
                f"multiple of {multiple}), more than train.micro_batch_tokens ({budget}); raise the "
                "budget or lower rollout.max_tokens / data.max_prompt_tokens"
            )
    order: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        order.setdefault(int(g), []).append(i)
    items: list[list[int]] = []
    for members in order.values():
        if keep_groups and sum(sizes[m] for m in members) <= budget:
            items.append(members)
        else:
            items.extend([m] for m in members)
    item_sizes = [sum(sizes[m] for m in it) for it in items]
    parts = karmarkar_karp(item_sizes, dp_size)
    per_rank = []
    for part in parts:
        packed = first_fit_decreasing([item_sizes[i] for i in part], budget)
        per_rank.append([[items[part[j]] for j in b] for b in packed])
    k = max(1, max(len(b) for b in per_rank))
    k = _round_up(k, bins_multiple)
    plan = []
    for rank, (part, bins) in enumerate(zip(parts, per_rank)):
        # Bins of near-equal load when the items allow it: pipeline stages then pad every row only to the
        # step's largest bin (plan_row_tokens), and micro-batches take similar time.
        even = _balanced_bins([items[i] for i in part], sizes, k, budget)
        bins = even if even is not None else _split_to(bins, sizes, k, rank)
        plan.append([sorted(m for item in b for m in item) for b in bins])
    return plan


def _balanced_bins(items: list[list[int]], sizes: Sequence[int], k: int, budget: int) -> list[list[list[int]]] | None:
    """``items`` dealt into exactly ``k`` bins, largest first, each to the lightest bin with room; None
    when an item fits no bin or a bin stays empty (the caller then splits first-fit-decreasing bins)."""
    loads = [0] * k
    bins: list[list[list[int]]] = [[] for _ in range(k)]
    for item in sorted(items, key=lambda it: (-sum(sizes[m] for m in it), it[0])):
        size = sum(sizes[m] for m in item)
        fits = [b for b in range(k) if loads[b] + size <= budget]
        if not fits:
            return None
        b = min(fits, key=lambda j: (loads[j], j))
        bins[b].append(item)
        loads[b] += size
    return bins if all(bins) else None


def plan_row_tokens(plan: Sequence[Sequence[Sequence[int]]], lengths: Sequence[int], multiple: int = 1) -> int:
    """The largest bin of a plan (every rank's), in tokens with every slot padded to ``multiple``: the row
    length pipeline parallelism pads every packed row to (all ranks compute the same number)."""
    return max(sum(_round_up(int(lengths[i]), multiple) for i in b) for bins in plan for b in bins)


# ---------------------------------------------------------------------------------------- tensors
def _per_token(value: torch.Tensor, shape: torch.Size) -> bool:
    return value.dim() >= 2 and value.shape[:2] == shape


def pack_rows(
    rows: Mapping[str, torch.Tensor],
    bins: Sequence[Sequence[int]],
    *,
    multiple: int = 1,
    lengths: Sequence[int] | None = None,
    row_tokens: int | None = None,
) -> list[dict]:
    """The packed micro-batches of ``bins`` (lists of row indices) built from padded rows.

    rows: a batch of N padded rows: per-token tensors [N, S] (tokens, labels, loss_mask, ref_logp, ...;
    any tensor whose first two dims are [N, S]) and per-member tensors [N, ...] (rewards, group_ids).
    Each micro-batch gets per-token tensors [1, T] (slots of ``round_up(length, multiple)``, padding taken
    from the row's own tail when it has one, zeros otherwise), ``position_ids`` [1, T] restarting at 0 in
    every slot, per-member tensors [n, ...], and ``packed``: its :class:`PackedLayout`. ``row_tokens``:
    pad every row to this T (pipeline parallelism needs equal shapes); None: T = sum of its slots.
    ``lengths`` default: :func:`sequence_lengths` of ``rows["loss_mask"]``. Tensors are built on the
    device of ``rows["tokens"]``.
    """
    tokens = rows["tokens"]
    shape, device = tokens.shape[:2], tokens.device
    n_rows, width = shape
    if lengths is None:
        lengths = sequence_lengths(rows["loss_mask"])
    out = []
    for b in bins:
        b = list(b)
        if not b:
            raise ValueError("pack_rows: an empty bin")
        lens = [int(lengths[i]) for i in b]
        slots = [_round_up(n, multiple) for n in lens]
        total = sum(slots)
        if row_tokens is not None:
            if row_tokens < total or row_tokens % multiple:
                raise ValueError(f"pack_rows: {total} tokens do not fit a row of {row_tokens}")
            slots[-1] += row_tokens - total
            total = row_tokens
        idx = torch.as_tensor(b, dtype=torch.long, device=device)
        mb: dict = {}
        for key, value in rows.items():
            if not isinstance(value, torch.Tensor):
                continue
            if _per_token(value, shape):
                sel = value.index_select(0, idx)
                pieces = []
                for j, slot in enumerate(slots):
                    take = min(slot, width)
                    piece = sel[j, :take]
                    if take < slot:
                        pad = piece.new_zeros((slot - take,) + tuple(piece.shape[1:]))
                        piece = torch.cat([piece, pad])
                    pieces.append(piece)
                mb[key] = torch.cat(pieces).unsqueeze(0)
            elif value.dim() >= 1 and value.shape[0] == n_rows:
                mb[key] = value.index_select(0, idx)
        # The slot's padding must never count, even when the row's tail is not padding of its own.
        keep = torch.cat([(torch.arange(slot, device=device) < n) for n, slot in zip(lens, slots)]).unsqueeze(0)
        for key in ("loss_mask",):
            if key in mb:
                mb[key] = torch.where(keep, mb[key], torch.zeros_like(mb[key]))
        mb["position_ids"] = torch.cat([torch.arange(slot, device=device) for slot in slots]).unsqueeze(0)
        mb["packed"] = PackedLayout(tuple(lens), tuple(slots))
        out.append(mb)
    return out


def trim_rows(
    rows: Mapping[str, torch.Tensor], *, multiple: int = 1, lengths: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """``rows`` with per-token tensors cut to the longest sequence (rounded up to ``multiple``) instead of
    the configured sequence length: what padded micro-batches compute without packing."""
    tokens = rows["tokens"]
    shape = tokens.shape[:2]
    if lengths is None:
        lengths = sequence_lengths(rows["loss_mask"])
    s = min(_round_up(max(lengths), multiple), shape[1]) if lengths else shape[1]
    return {k: (v[:, :s] if isinstance(v, torch.Tensor) and _per_token(v, shape) else v) for k, v in rows.items()}


def _gather_index(slots: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(slots)
    starts, start = [], 0
    for s in slots:
        starts.append(start)
        start += s
    j = torch.arange(width, device=device)
    sizes = torch.tensor(list(slots), dtype=torch.long, device=device)
    first = torch.tensor(starts, dtype=torch.long, device=device)
    valid = j[None, :] < sizes[:, None]
    index = first[:, None] + torch.minimum(j[None, :], sizes[:, None] - 1)
    return index, valid


def unpack(x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Per-member rows [n, max slot] of a packed per-token tensor ``x`` [1, T_view] (or [T_view]), T_view
    being ``layout.total``; positions past a member's slot are 0. Differentiable (a gather)."""
    flat = x.reshape(-1) if x.dim() == 1 or x.shape[0] == 1 else None
    if flat is None or flat.numel() != layout.total:
        raise ValueError(
            f"unpack: a packed tensor of shape {list(x.shape)} does not match a layout of {layout.total} tokens"
        )
    index, valid = _gather_index(layout.slots, x.device)
    return torch.where(valid, flat[index], flat.new_zeros(()))


def zigzag_positions(layout: PackedLayout, cp_size: int, cp_rank: int, device: torch.device) -> torch.Tensor:
    """Positions in the full row [T] held by context-parallel rank ``cp_rank``: every slot is cut into
    2 x cp chunks and the rank takes chunks ``cp_rank`` and ``2 cp - 1 - cp_rank`` of each, in slot order
    (Megatron-Core's and Transformer Engine's THD layout). Returns int64 [T / cp]."""
    if layout.cp_size != 1:
        raise ValueError("zigzag_positions: give the full row's layout")
    if cp_size == 1:
        return torch.arange(layout.total, device=device)
    pieces, start = [], 0
    for p in layout.padded:
        if p % (2 * cp_size):
            raise ValueError(
                f"a packed slot of {p} tokens is not divisible by 2 x context_parallel_size ({2 * cp_size})"
            )
        c = p // (2 * cp_size)
        pieces.append(torch.arange(start + cp_rank * c, start + (cp_rank + 1) * c, device=device))
        pieces.append(
            torch.arange(start + (2 * cp_size - 1 - cp_rank) * c, start + (2 * cp_size - cp_rank) * c, device=device)
        )
        start += p
    return torch.cat(pieces)
