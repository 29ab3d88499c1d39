"""One training step of any registered objective inside Megatron-Core's own schedules.

The pieces, each usable on its own from an existing Megatron training script:

- :func:`make_forward_step` returns a ``forward_step_func`` for ``get_forward_backward_func()``: it runs the
  model on one micro-batch, turns its vocab-parallel ``[b, s, V/tp]`` logits into fp32 token log-probs and
  hands them to the objective; its ``loss_func`` returns Megatron's ``(loss, count, report)``.
- :func:`forward_logprobs` is the forward-only pass (reference model, old policy, or the statistics pass).
- :class:`ObjectiveStep` strings them together: log-prob passes, exact group statistics, forward/backward,
  optimizer step, metrics.

Normalization. Megatron-Core with ``calculate_per_token_loss=True`` sums gradients over data-parallel and
context-parallel ranks (no 1/dp) and divides them by the sum of the ``count`` every micro-batch returned.
Our objectives already produce each micro-batch's share of the globally normalized loss (token-level
objectives divide by every counted token of the step, GIFT by every member), so the loss function returns
``share * D`` with ``count`` = the micro-batch's members, D being their global sum (members x cp): Megatron's
division then gives back exactly the share, whatever the micro-batch size and the DP/CP layout.

Group statistics (docs/objectives.md, "Group statistics"), chosen per step and reported as ``stats_source``:
- ``data``: the objective's statistics need only rewards and counts (GFT, GRPO, DAPO, GSPO, SFT, DFT), so
  they are computed from the batch before any forward pass;
- ``in_place``: GIFT, and every micro-batch of every DP rank holds whole groups: each micro-batch computes
  its groups' implicit-reward statistics from its own forward pass (no extra pass);
- ``policy_pass``: GIFT with groups split across micro-batches or DP ranks: a no-grad pass at the current
  parameters gives every member's implicit reward first, reduced over DP x CP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from gift_megatron.comm import all_gather_rows, broadcast_objects, group_rank
from gift_megatron.device import move_to, to_host_floats
from gift_megatron.megatron.moe import MoEStepMonitor
from gift_megatron.objectives import BatchLayout, BatchStats, LossOutput, Members, Objective, TokenBatch
from gift_megatron.objectives.base import count_totals
from gift_megatron.parallel.context import zigzag_split
from gift_megatron.parallel.logprobs import vocab_parallel_logprobs
from gift_megatron.parallel.packing import PackedLayout, unpack, zigzag_positions

# Which forward-only passes already ran on a micro-batch (a set under this key). Only the last pipeline
# stage receives ref_logp / old_logp; the other stages must still know the pass ran, or they would run it
# again alone and wait forever for the stages that did not.
DONE_PASSES = "gift_megatron_done_passes"

# Keys of a micro-batch dict. tokens/labels/loss_mask are [b, s] over the whole (unsplit) sequence, labels
# already shifted (labels[:, t] is the token after tokens[:, t]); rewards [b] float; group_ids [b] int;
# ref_logp / old_logp optional [b, s] fp32, aligned with labels.
# A packed micro-batch (gift_megatron.parallel.packing.pack_rows) has the same keys with per-token tensors
# [1, T] holding its n members end to end, rewards / group_ids [n], and PACKED: its PackedLayout.
PER_TOKEN_KEYS = ("tokens", "labels", "loss_mask", "ref_logp", "old_logp", "position_ids")
PACKED = "packed"


def packed_layout(mb: dict[str, Any]) -> PackedLayout | None:
    """The micro-batch's PackedLayout, or None for padded rows."""
    return mb.get(PACKED)


def member_rows(mb: dict[str, Any], value: torch.Tensor | None) -> torch.Tensor | None:
    """A per-token tensor of ``mb`` as per-member rows [members, s]: itself for padded rows, unpacked
    (differentiably) for a packed micro-batch."""
    layout = packed_layout(mb)
    if value is None or layout is None:
        return value
    return unpack(value, layout)


def members_in(mb: dict[str, Any]) -> int:
    """Members (sequences) of a micro-batch."""
    layout = packed_layout(mb)
    return layout.n if layout is not None else int(mb["tokens"].shape[0])


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def model_device(model) -> torch.device:
    """The device of the parameters of ``model`` (a chunk or a list of chunks, DDP-wrapped or not)."""
    from megatron.core.utils import unwrap_model

    first = model[0] if isinstance(model, (list, tuple)) else model
    return next(unwrap_model(first).parameters()).device


def batch_layout() -> BatchLayout:
    """The objective's view of Megatron's parallel state: members spread over DP, tokens over CP."""
    ps = _ps()
    cp = ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None
    return BatchLayout(dp_group=ps.get_data_parallel_group(), cp_group=cp)


def split_for_context_parallel(mb: dict[str, Any]) -> dict[str, Any]:
    """This CP rank's zig-zag part of every per-token tensor of ``mb`` (identity when cp == 1)."""
    ps = _ps()
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return mb
    rank = ps.get_context_parallel_rank()
    layout = packed_layout(mb)
    if layout is not None:  # every sequence zig-zag split on its own (Megatron's / TE's THD layout)
        idx = zigzag_positions(layout, cp, rank, mb["tokens"].device)
        out = {k: (v.index_select(1, idx) if k in PER_TOKEN_KEYS and v is not None else v) for k, v in mb.items()}
        out[PACKED] = layout.for_cp_rank(cp)
        return out
    return {
        k: (zigzag_split(v, cp, rank, seq_dim=1) if k in PER_TOKEN_KEYS and v is not None else v) for k, v in mb.items()
    }


def cp_local_positions(mb: dict[str, Any], cp: int, rank: int, device: torch.device) -> torch.Tensor:
    """Positions in the full (unsplit) row of the tokens CP rank ``rank`` holds, int64 [s / cp]."""
    layout = packed_layout(mb)
    if layout is not None:
        return zigzag_positions(layout, cp, rank, device)
    s = mb["labels"].shape[1]
    return zigzag_split(torch.arange(s, device=device)[None], cp, rank, seq_dim=1)[0]


def packed_seq_params(layout: PackedLayout, device: torch.device):
    """Megatron-Core's PackedSeqParams (THD) of a packed row: real and padded cu_seqlens over the full row
    (also under CP, as Megatron expects), max lengths of the slots."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = layout.cu_seqlens(device)
    cu_padded = layout.cu_seqlens(device, padded=True)
    longest = max(layout.padded)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def model_logprobs(
    model,
    mb: dict[str, Any],
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    check_labels: bool = True,
):
    """Run ``model`` on a (CP-local) micro-batch; on the last pipeline stage return the fp32 token
    log-probs [b, s] of ``mb["labels"]``, on other stages the hidden states Megatron sends on.

    Why a forward hook on the output layer: GPTModel without labels returns its logits as
    ``logits.transpose(0, 1).contiguous()``, a full copy of the largest activation of the step. The hook
    turns the output layer's ``[s, b, V/tp]`` logits into log-probs where they are produced, so the model
    returns ``[b, s, 1]`` and the copy is of the log-probs only. ``vocab_size``: the unpadded vocabulary
    (padded ids are left out of the softmax, see :func:`vocab_parallel_logprobs`).
    """
    tokens = mb["tokens"]
    position_ids = mb.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    from megatron.core.utils import unwrap_model

    layout = packed_layout(mb)
    extra = {} if layout is None else {"packed_seq_params": packed_seq_params(layout, tokens.device)}
    inner = unwrap_model(model)
    output_layer = getattr(inner, "output_layer", None) if getattr(inner, "post_process", False) else None
    if output_layer is None:
        return model(tokens, position_ids, None, **extra)
    labels_sb = mb["labels"].transpose(0, 1)
    tp_group = _ps().get_tensor_model_parallel_group()

    def to_logprobs(module, inputs, output):
        logits, bias = output
        if logits.shape[:2] != labels_sb.shape:
            raise RuntimeError(
                f"output layer returned logits of shape {list(logits.shape)}, expected "
                f"[s, b, V/tp] with [s, b] = {list(labels_sb.shape)}"
            )
        lp = vocab_parallel_logprobs(
            logits,
            labels_sb,
            tp_group=tp_group,
            temperature=temperature,
            chunk_size=chunk_size,
            vocab_size=vocab_size,
            check_labels=check_labels,
        )
        return lp.unsqueeze(-1), bias

    handle = output_layer.register_forward_hook(to_logprobs)
    try:
        # attention_mask None: causal attention is built by the attention backend (local and TE specs).
        out = model(tokens, position_ids, None, **extra)
    finally:
        handle.remove()
    return out.squeeze(-1)


def token_batch(mb: dict[str, Any], logp: torch.Tensor) -> TokenBatch:
    """The objective's view of a (CP-local) micro-batch with its policy log-probs ``logp`` [b, s] fp32
    (packed: [1, T], unpacked here to per-member rows, so objectives only ever see [members, s])."""
    return TokenBatch(
        logp=member_rows(mb, logp),
        mask=member_rows(mb, mb["loss_mask"]),
        rewards=mb.get("rewards"),
        group_ids=mb.get("group_ids"),
        ref_logp=member_rows(mb, mb.get("ref_logp")),
        old_logp=member_rows(mb, mb.get("old_logp")),
    )


# ---------------------------------------------------------------------------------------------- loss
@dataclass
class LossContext:
    """What the loss function of every micro-batch of one step shares."""

    objective: Objective
    layout: BatchLayout
    stats: BatchStats | None  # None: statistics in place, per micro-batch (GIFT with whole groups)
    scale: float  # D: the global sum of the per-micro-batch counts returned to Megatron
    totals: tuple[torch.Tensor, torch.Tensor] | None = None  # global (n_members, n_tokens) for in-place
    members: list[Members] = field(default_factory=list)  # in-place: member scalars, for global metrics


def loss_func(ctx: LossContext, mb: dict[str, Any], logp: torch.Tensor):
    """Megatron ``loss_func`` on the model's token log-probs ``logp`` [b, s] fp32:
    (share * D, members in this micro-batch (int), {"output": LossOutput})."""
    batch = token_batch(mb, logp)
    stats = ctx.stats
    if stats is None:
        # Whole groups here, so their statistics are local; the counts that normalize the loss (and GIFT's
        # gradient through its statistics) are the step's global ones.
        local = BatchLayout(dp_group=None, cp_group=ctx.layout.cp_group, totals=ctx.totals)
        members = ctx.objective.members(batch, local)
        ctx.members.append(members)
        stats = dataclasses.replace(ctx.objective.statistics(members, local), metrics={})
    out = ctx.objective.loss(batch, stats, ctx.layout)
    count = torch.tensor(batch.logp.shape[0], dtype=torch.int, device=logp.device)
    report = LossOutput(out.loss.detach(), {k: v.detach() for k, v in out.shares.items()}, {})
    return out.loss * ctx.scale, count, {"output": report}


def make_forward_step(
    ctx: LossContext,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    check_labels: bool = True,
):
    """``forward_step_func(data_iterator, model)`` for ``get_forward_backward_func()``.

    The iterator yields micro-batch dicts (see PER_TOKEN_KEYS); each is moved to the model's device (a
    no-op when it is there) and split for context parallelism here. ``check_labels=False`` skips the label
    range check on the device (one host sync per micro-batch) when the caller checked them on the host.
    """

    def forward_step(data_iterator: Iterator[dict[str, Any]], model):
        # A no-op for micro-batches ObjectiveStep.prepare already moved; a user's own loop may pass host ones.
        mb = split_for_context_parallel(move_to(next(data_iterator), model_device(model)))
        logp = model_logprobs(
            model, mb, temperature=temperature, chunk_size=chunk_size, vocab_size=vocab_size, check_labels=check_labels
        )
        return logp, partial(loss_func, ctx, mb)

    return forward_step


# ------------------------------------------------------------------------------------ forward-only
def forward_logprobs(
    model,
    micro_batches: Sequence[dict[str, Any]],
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    check_labels: bool = True,
) -> list[torch.Tensor] | None:
    """No-grad per-token log-probs of every micro-batch: a list of [b, s_local] fp32 tensors (this CP
    rank's zig-zag part) on the last pipeline stage, None on the other stages."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ps = _ps()
    models = model if isinstance(model, list) else [model]
    device = model_device(models)
    micro_batches = [move_to(mb, device) for mb in micro_batches]

    def _collect(lp):
        # The count joins Megatron's token counter, which lives on the model's device.
        return lp.sum() * 0.0, torch.ones((), dtype=torch.int, device=lp.device), {"logp": lp.detach()}

    def forward_step(data_iterator, m):
        mb = split_for_context_parallel(next(data_iterator))
        return model_logprobs(
            m, mb, temperature=temperature, chunk_size=chunk_size, vocab_size=vocab_size, check_labels=check_labels
        ), _collect

    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(list(micro_batches)),
            model=models,
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0]["tokens"].shape[1],  # packed rows: [1, T], T equal under PP
            micro_batch_size=micro_batches[0]["tokens"].shape[0],
            forward_only=True,
        )
    if not ps.is_pipeline_last_stage():
        return None
    return [r["logp"] for r in store]


def _has(mb: dict[str, Any], key: str) -> bool:
    """Whether ``mb`` carries ``key`` (ref_logp / old_logp) or its pass already ran (other PP stages)."""
    return mb.get(key) is not None or key in mb.get(DONE_PASSES, ())


# ------------------------------------------------------------------------------------- statistics
def data_members(objective: Objective, micro_batches: Sequence[dict[str, Any]]) -> Members:
    """Members of this rank's micro-batches from the data alone (rewards, group ids, counted tokens)."""
    parts = []
    for mb in micro_batches:
        mb = split_for_context_parallel(mb)
        parts.append(
            Members(
                token_counts=(member_rows(mb, mb["loss_mask"]) > 0).float().sum(dim=1),
                rewards=None if mb.get("rewards") is None else mb["rewards"].float(),
                group_ids=None if mb.get("group_ids") is None else mb["group_ids"].to(torch.int64),
            )
        )
    return Members.cat(parts)


def groups_whole_per_micro_batch(micro_batches: Sequence[dict[str, Any]], layout: BatchLayout) -> bool:
    """True when every group of the step lies in a single micro-batch of a single DP rank (all ranks agree)."""
    dp_rank = group_rank(layout.dp_group)
    rows = [
        torch.stack(
            [
                mb["group_ids"].to(torch.float64),
                torch.full_like(mb["group_ids"], dp_rank, dtype=torch.float64),
                torch.full_like(mb["group_ids"], i, dtype=torch.float64),
            ],
            dim=1,
        )
        for i, mb in enumerate(micro_batches)
    ]
    table = all_gather_rows(torch.cat(rows), layout.dp_group)
    places = torch.unique(table, dim=0)  # unique (group, rank, micro-batch) triples
    return places.shape[0] == torch.unique(table[:, 0]).numel()


# ------------------------------------------------------------------------------------- batching
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


# ------------------------------------------------------------------------------------------- step
@dataclass
class StepResult:
    """loss: the global loss of the step; metrics: global metrics (fp32 scalars as floats); identical on
    every rank of every pipeline stage. stats_source: data | in_place | policy_pass."""

    loss: float
    metrics: dict[str, float]
    stats_source: str
    grad_norm: float | None = None


class ObjectiveStep:
    """One optimizer step of ``objective`` on Megatron-Core.

    Args:
        objective: a registered objective (``gift_megatron.objectives.build_objective``).
        model: the policy, a list of model chunks wrapped in Megatron's DistributedDataParallel.
        optimizer: Megatron's optimizer for ``model``.
        reference: a forward-only model holding the frozen reference policy (GIFT ``reference: frozen``,
            GRPO with kl_coef > 0), or None when micro-batches already carry ``ref_logp``.
        temperature: the rollout sampling temperature (log-probs are of logits / temperature).
        logprob_chunk_size: bound on fp32 temporaries of the log-prob computation (tokens per block).
        vocab_size: the tokenizer's (unpadded) vocabulary: Megatron's padded rows are left out of every
            softmax, so the trainer's distribution is the rollout engine's. None: the padded vocabulary.
    """

    def __init__(
        self,
        objective: Objective,
        model: list,
        optimizer,
        *,
        reference=None,
        temperature: float = 1.0,
        logprob_chunk_size: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.objective = objective
        self.model = model if isinstance(model, list) else [model]
        self.optimizer = optimizer
        self.reference = reference
        self.temperature = temperature
        self.chunk_size = logprob_chunk_size
        self.vocab_size = vocab_size
        config = self.model[0].config
        if not getattr(config, "calculate_per_token_loss", False):
            raise ValueError(
                "model config: calculate_per_token_loss must be True for ObjectiveStep "
                "(the objectives normalize globally; see gift_megatron/megatron/step.py)"
            )
        if config.finalize_model_grads_func is None:
            from megatron.core.distributed import finalize_model_grads

            config.finalize_model_grads_func = finalize_model_grads
        if config.no_sync_func is None and hasattr(self.model[0], "no_sync"):
            config.no_sync_func = self.model[0].no_sync
        if getattr(config, "grad_scale_func", None) is None and hasattr(optimizer, "scale_loss"):
            config.grad_scale_func = optimizer.scale_loss
        self.moe = MoEStepMonitor.for_model(self.model)  # None for a dense model (gift_megatron/megatron/moe.py)

    @property
    def device(self) -> torch.device:
        """The device of the policy's parameters: where every micro-batch tensor goes."""
        return model_device(self.model)

    def prepare(self, micro_batches: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The step's micro-batches ready to train on, each tensor moved to the model's device once.

        Validates them (clear errors before any compute), then adds the ``ref_logp`` / ``old_logp`` the
        objective needs and the micro-batches lack (forward-only passes of the reference model / the
        current policy). Preparing a rollout batch once and training several updates on slices of it runs
        each pass once; calling the step on prepared micro-batches moves and recomputes nothing.
        """
        ps = _ps()
        # Validated before the move, on host tensors when the caller built them there (the trainer does):
        # the label range is then checked without a device sync, and the forward passes skip it.
        validate_micro_batches(
            self.objective,
            micro_batches,
            ps.get_context_parallel_world_size(),
            vocab_size=self._label_bound(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
        )
        if self.moe is not None:  # expert parallelism: equal micro-batch counts, checked before any forward pass
            self.moe.check_micro_batches(micro_batches)
        micro_batches = [move_to(mb, self.device) for mb in micro_batches]
        self._fill_reference_logprobs(micro_batches)
        return micro_batches

    def _label_bound(self) -> int:
        """Labels must be real rows of the output layer: the padded vocabulary of the model (TP x shard)."""
        from megatron.core.utils import unwrap_model

        padded = getattr(unwrap_model(self.model[0]), "vocab_size", None)
        return padded if padded is not None else (self.vocab_size or 2**62)

    def _fill_reference_logprobs(self, micro_batches: list[dict[str, Any]]) -> None:
        """Add ref_logp / old_logp the objective needs and the micro-batches lack (forward-only passes)."""
        uses = self.objective.uses
        if "ref_logp" in uses and not _has(micro_batches[0], "ref_logp"):
            if self.reference is None:
                raise ValueError(
                    f"objective {self.objective.name} needs ref_logp: give micro-batches a "
                    "'ref_logp' or ObjectiveStep a reference model"
                )
            if hasattr(self.reference, "onload"):
                self.reference.onload()
            self._attach(
                micro_batches,
                "ref_logp",
                forward_logprobs(
                    self.reference,
                    micro_batches,
                    temperature=self.temperature,
                    chunk_size=self.chunk_size,
                    vocab_size=self.vocab_size,
                    check_labels=False,
                ),
            )
            if hasattr(self.reference, "offload"):
                self.reference.offload()
        if "old_logp" in uses and not _has(micro_batches[0], "old_logp"):
            # The policy before this step is the rollout policy when each rollout feeds one step.
            self._attach(
                micro_batches,
                "old_logp",
                forward_logprobs(
                    self.model,
                    micro_batches,
                    temperature=self.temperature,
                    chunk_size=self.chunk_size,
                    vocab_size=self.vocab_size,
                    check_labels=False,
                ),
            )

    @staticmethod
    def _attach(micro_batches, key, logps):
        """Store CP-local log-probs back at full-sequence positions (the step splits every tensor again)."""
        ps = _ps()
        for mb in micro_batches:
            mb[DONE_PASSES] = set(mb.get(DONE_PASSES, ())) | {key}
        if logps is None:  # not the last pipeline stage: nothing reads it there
            return
        cp, rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        for mb, lp in zip(micro_batches, logps):
            if cp == 1:
                mb[key] = lp
                continue
            full = torch.zeros(mb["labels"].shape, dtype=lp.dtype, device=lp.device)
            full[:, cp_local_positions(mb, cp, rank, lp.device)] = lp
            mb[key] = full

    def statistics(self, micro_batches: list[dict[str, Any]], layout: BatchLayout):
        """(LossContext for the step, stats_source)."""
        obj = self.objective
        members = data_members(obj, micro_batches)
        n_members, n_tokens = count_totals(members, layout)
        scale = float(n_members) * layout.cp_size
        if not obj.policy_statistics:
            return LossContext(obj, layout, obj.statistics(members, layout), scale), "data"
        if groups_whole_per_micro_batch(micro_batches, layout):
            return LossContext(obj, layout, None, scale, totals=(n_members, n_tokens)), "in_place"
        logps = forward_logprobs(
            self.model,
            micro_batches,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            vocab_size=self.vocab_size,
            check_labels=False,
        )
        stats = None
        if logps is not None:
            parts = [
                obj.members(token_batch(split_for_context_parallel(mb), lp), layout)
                for mb, lp in zip(micro_batches, logps)
            ]
            stats = obj.statistics(Members.cat(parts), layout)
        return LossContext(obj, layout, stats, scale), "policy_pass"

    def __call__(self, micro_batches: list[dict[str, Any]], *, prepared: bool = False) -> StepResult:
        """One optimizer step on this rank's ``micro_batches`` (host or device tensors). ``prepared=True``:
        they come from :meth:`prepare` (or slices of its result), so validation, the move and the
        reference / old-policy passes are not repeated."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not prepared:
            micro_batches = self.prepare(micro_batches)
        elif self.moe is not None:
            self.moe.check_micro_batches(micro_batches)
        layout = batch_layout()
        ctx, source = self.statistics(micro_batches, layout)
        if self.moe is not None:
            self.moe.start(ctx.scale)  # router-loss scale D / T, tracker cleared

        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        store = get_forward_backward_func()(
            forward_step_func=make_forward_step(
                ctx,
                temperature=self.temperature,
                chunk_size=self.chunk_size,
                vocab_size=self.vocab_size,
                check_labels=False,
            ),
            data_iterator=iter(micro_batches),
            model=self.model,
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0]["tokens"].shape[1],
            micro_batch_size=micro_batches[0]["tokens"].shape[0],
            forward_only=False,
        )
        ok, grad_norm, _ = self.optimizer.step()  # Megatron returns grad_norm as a host float
        if not ok:
            raise RuntimeError("Megatron optimizer skipped the update (non-finite gradients)")
        metrics = self._metrics(store, ctx, layout)
        metrics["stats_source/" + source] = 1.0
        if self.moe is not None:
            metrics.update(self.moe.finish())  # moe/aux_loss, moe/z_loss, moe/load_balance_*
        return StepResult(
            loss=metrics["loss"],
            metrics=metrics,
            stats_source=source,
            grad_norm=None if grad_norm is None else float(grad_norm),
        )

    def _metrics(self, store, ctx: LossContext, layout: BatchLayout) -> dict[str, float]:
        """Global metrics on the last stage, broadcast to every pipeline stage."""
        ps = _ps()
        payload: list[Any] = [None]
        if ps.is_pipeline_last_stage():
            total = LossOutput.accumulate([r["output"] for r in store])
            metrics = dict(ctx.stats.metrics) if ctx.stats is not None else {}
            if ctx.stats is None:  # in place: the global statistics' metrics from the members seen
                metrics = dict(self.objective.statistics(Members.cat(ctx.members), layout).metrics)
            total.metrics = metrics
            payload = [to_host_floats(total.finalize(layout))]  # one device-to-host copy for all metrics
        if ps.get_pipeline_model_parallel_world_size() > 1:
            broadcast_objects(
                payload, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
            )
        return payload[0]
