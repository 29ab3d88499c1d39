"""Groups of responses -> the micro-batches ``ObjectiveStep`` trains on: padded rows trimmed to the step's
longest sequence, or packed rows under a token budget (gift_megatron/parallel/packing.py).

A group is one prompt with its members: ``n_expert`` expert demonstrations, ``n_teacher`` teacher responses
(GFT's hybrid groups, docs/objectives.md, GFT) and the on-policy rollouts. Every member is scored by the same
reward function and becomes one row of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gift_megatron.parallel.packing import pack_rows, plan_bins, plan_row_tokens, trim_rows

KINDS = ("expert", "teacher", "rollout")


@dataclass
class Member:
    """One response of a group.

    group_id: unique within the step over every data-parallel rank (the global prompt index of the step).
    prompt_ids / response_ids: token ids (response ends with EOS when the response finished).
    kind: expert | teacher | rollout. rollout_logprobs: the engine's sampling log-probs [R] (rollouts only).
    """

    group_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    kind: str
    reward: float = 0.0
    response_text: str = ""
    rollout_logprobs: list[float] | None = None
    finished: bool = True


def pack(members: Sequence[Member], seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows [N, seq_length] of ``members``: Megatron's (tokens, labels, loss_mask) plus rewards and group ids.

    tokens[i] = prompt + response, right-padded; labels[i, t] = tokens[i, t + 1] (shifted before any
    context-parallel split, as the step expects); loss_mask[i, t] = 1 where labels[i, t] is a response
    token. rewards [N] fp32, group_ids [N] int64.

    Raises ValueError naming the member when prompt + response does not fit ``seq_length`` + 1 tokens
    (the last label needs no input position).
    """
    n = len(members)
    # Built on the host; ObjectiveStep.prepare moves each micro-batch to the model's device once.
    host = torch.device("cpu")
    tokens = torch.full((n, seq_length + 1), pad_id, dtype=torch.long, device=host)
    mask = torch.zeros(n, seq_length, dtype=torch.float32, device=host)
    for i, m in enumerate(members):
        p, r = len(m.prompt_ids), len(m.response_ids)
        if p + r > seq_length + 1:
            raise ValueError(
                f"group {m.group_id} {m.kind} member: prompt ({p}) + response ({r}) tokens exceed "
                f"model.seq_length + 1 ({seq_length + 1}); raise model.seq_length or lower "
                "rollout.max_tokens / data.max_prompt_tokens"
            )
        if r == 0:
            raise ValueError(f"group {m.group_id} {m.kind} member: empty response")
        tokens[i, : p + r] = torch.tensor(list(m.prompt_ids) + list(m.response_ids), dtype=torch.long, device=host)
        mask[i, p - 1 : p - 1 + r] = 1.0
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": mask,
        "rewards": torch.tensor([float(m.reward) for m in members], dtype=torch.float32, device=host),
        "group_ids": torch.tensor([m.group_id for m in members], dtype=torch.long, device=host),
    }


def micro_batches(batch: dict[str, torch.Tensor], micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive slices of ``micro_batch_size`` rows; ValueError when the rows do not divide evenly."""
    n = batch["tokens"].shape[0]
    if n % micro_batch_size:
        raise ValueError(f"{n} members are not a multiple of train.micro_batch_size ({micro_batch_size})")
    return [{k: v[i : i + micro_batch_size] for k, v in batch.items()} for i in range(0, n, micro_batch_size)]


def member_length(m: Member) -> int:
    """Input positions of a member's row: prompt + response - 1 (the last token is only a label)."""
    return len(m.prompt_ids) + len(m.response_ids) - 1


@dataclass
class StepBatch:
    """This rank's training micro-batches of one step.

    micro_batches: the dicts ObjectiveStep takes (padded [b, s] rows, or packed [1, T] rows); engine: the
    rollout engine's log-probs laid out like each micro-batch's labels (NaN where there are none);
    members: the members this rank trains on, in row order; tokens_real / tokens_computed: input positions
    of those members (prompt + response - 1 each), and positions the micro-batches compute (padding
    included).
    """

    micro_batches: list[dict]
    engine: list[torch.Tensor]
    members: list[Member]
    tokens_real: int
    tokens_computed: int


def step_batch(
    members: Sequence[Member],
    *,
    seq_length: int,
    pad_id: int,
    micro_batch_size: int | None = None,
    micro_batch_tokens: int | None = None,
    dp_size: int = 1,
    dp_rank: int = 0,
    multiple: int = 1,
    fixed_rows: bool = False,
    bins_multiple: int = 1,
) -> StepBatch:
    """This rank's micro-batches of the step.

    Rows (``micro_batch_size``): ``members`` are this replica's; rows are trimmed to the longest sequence
    (rounded up to ``multiple``) instead of ``seq_length``. Packed (``micro_batch_tokens``): ``members``
    are every replica's, in the same order on every rank; they are spread over the ``dp_size`` ranks with
    balanced token loads and packed into an equal number of bins per rank, a multiple of
    ``bins_multiple`` (:func:`gift_megatron.parallel.packing.plan_bins`); ``fixed_rows`` pads every bin to
    the step's largest one, on every rank (pipeline parallelism). Errors (a member longer than the budget) come before any compute.
    """
    if micro_batch_tokens is None:
        if micro_batch_size is None:
            raise ValueError("step_batch: give micro_batch_size (padded rows) or micro_batch_tokens (packed rows)")
        mine = list(members)
        rows = pack(mine, seq_length, pad_id)
        rows["engine_logp"] = engine_logprobs(mine, seq_length)
        rows = trim_rows(rows, multiple=multiple, lengths=[member_length(m) for m in mine])
        mbs = micro_batches(rows, micro_batch_size)
    else:
        lengths = [member_length(m) for m in members]
        plan = plan_bins(
            lengths,
            [m.group_id for m in members],
            budget=micro_batch_tokens,
            dp_size=dp_size,
            multiple=multiple,
            bins_multiple=bins_multiple,
        )
        bins = plan[dp_rank]
        order = [i for b in bins for i in b]
        mine = [members[i] for i in order]
        rows = pack(mine, seq_length, pad_id)
        rows["engine_logp"] = engine_logprobs(mine, seq_length)
        local, start = [], 0
        for b in bins:
            local.append(list(range(start, start + len(b))))
            start += len(b)
        mbs = pack_rows(
            rows,
            local,
            multiple=multiple,
            lengths=[lengths[i] for i in order],
            row_tokens=plan_row_tokens(plan, lengths, multiple) if fixed_rows else None,
        )
    engine = [mb.pop("engine_logp") for mb in mbs]
    return StepBatch(
        mbs,
        engine,
        mine,
        tokens_real=sum(member_length(m) for m in mine),
        tokens_computed=sum(int(mb["tokens"].numel()) for mb in mbs),
    )


def engine_logprobs(members: Sequence[Member], seq_length: int) -> torch.Tensor:
    """The rollout engine's sampling log-probs laid out like :func:`pack`'s labels: [N, seq_length] fp32 on
    the host, NaN wherever there is none (prompt, padding, expert and teacher members).

    Built once per step on the host, so the comparisons below run on the trainer's device without a
    host round trip per member.
    """
    out = torch.full((len(members), seq_length), float("nan"), dtype=torch.float32, device="cpu")
    for i, m in enumerate(members):
        if m.kind == "rollout" and m.rollout_logprobs:
            start = len(m.prompt_ids) - 1
            lp = m.rollout_logprobs[: seq_length - start]
            out[i, start : start + len(lp)] = torch.tensor(lp, dtype=torch.float32, device="cpu")
    return out
