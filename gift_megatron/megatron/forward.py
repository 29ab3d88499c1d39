"""The forward pass of one micro-batch inside Megatron-Core's schedules, and its loss function.

- :func:`make_forward_step` returns a ``forward_step_func`` for ``get_forward_backward_func()``: it runs the
  model on one micro-batch, turns its vocab-parallel ``[b, s, V/tp]`` logits into fp32 token log-probs and
  hands them to the objective; its ``loss_func`` returns Megatron's ``(loss, count, report)`` (the
  normalization is explained in :mod:`gift_megatron.megatron.step`).
- :func:`forward_logprobs` is the forward-only pass (reference model, old policy, or the statistics pass).
- The micro-batch format (padded ``[b, s]`` rows or packed ``[1, T]`` rows) and its context-parallel split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, overload

import torch

from gift_megatron.device import move_to
from gift_megatron.megatron.mpu import parallel_state
from gift_megatron.objectives import BatchLayout, BatchStats, LossOutput, Members, Objective, TokenBatch
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


@overload
def member_rows(mb: dict[str, Any], value: torch.Tensor) -> torch.Tensor: ...
@overload
def member_rows(mb: dict[str, Any], value: None) -> None: ...
@overload
def member_rows(mb: dict[str, Any], value: torch.Tensor | None) -> torch.Tensor | None: ...
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


def model_device(model: torch.nn.Module | Sequence[torch.nn.Module]) -> torch.device:
    """The device of the parameters of ``model`` (a chunk or a list of chunks, DDP-wrapped or not)."""
    from megatron.core.utils import unwrap_model

    first = model[0] if isinstance(model, (list, tuple)) else model
    return next(unwrap_model(first).parameters()).device


def batch_layout() -> BatchLayout:
    """The objective's view of Megatron's parallel state: members spread over DP, tokens over CP."""
    ps = parallel_state()
    cp = ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None
    return BatchLayout(dp_group=ps.get_data_parallel_group(), cp_group=cp)


def split_for_context_parallel(mb: dict[str, Any]) -> dict[str, Any]:
    """This CP rank's zig-zag part of every per-token tensor of ``mb`` (identity when cp == 1)."""
    ps = parallel_state()
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
    tp_group = parallel_state().get_tensor_model_parallel_group()

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

    def forward_step(data_iterator: Iterator[dict[str, Any]], model: torch.nn.Module):
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

    ps = parallel_state()
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


def has_logprobs(mb: dict[str, Any], key: str) -> bool:
    """Whether ``mb`` carries ``key`` (ref_logp / old_logp) or its pass already ran (other PP stages)."""
    return mb.get(key) is not None or key in mb.get(DONE_PASSES, ())
