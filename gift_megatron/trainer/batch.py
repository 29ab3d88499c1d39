"""Groups of responses -> the padded micro-batches ``ObjectiveStep`` trains on.

A group is one prompt with its members: ``n_expert`` expert demonstrations, ``n_teacher`` teacher responses
(GFT's hybrid groups, docs/objectives.md, GFT) and the on-policy rollouts. Every member is scored by the same
reward function and becomes one row of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

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
    token. rewards [N] fp32, group_ids [N] int64, is_rollout [N] bool.

    Raises ValueError naming the member when prompt + response does not fit ``seq_length`` + 1 tokens
    (the last label needs no input position).
    """
    n = len(members)
    tokens = torch.full((n, seq_length + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(n, seq_length, dtype=torch.float32)
    for i, m in enumerate(members):
        p, r = len(m.prompt_ids), len(m.response_ids)
        if p + r > seq_length + 1:
            raise ValueError(f"group {m.group_id} {m.kind} member: prompt ({p}) + response ({r}) tokens exceed "
                             f"model.seq_length + 1 ({seq_length + 1}); raise model.seq_length or lower "
                             "rollout.max_tokens / data.max_prompt_tokens")
        if r == 0:
            raise ValueError(f"group {m.group_id} {m.kind} member: empty response")
        tokens[i, :p + r] = torch.tensor(list(m.prompt_ids) + list(m.response_ids), dtype=torch.long)
        mask[i, p - 1:p - 1 + r] = 1.0
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": mask,
        "rewards": torch.tensor([float(m.reward) for m in members], dtype=torch.float32),
        "group_ids": torch.tensor([m.group_id for m in members], dtype=torch.long),
    }


def micro_batches(batch: dict[str, torch.Tensor], micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive slices of ``micro_batch_size`` rows (the caller checked divisibility)."""
    n = batch["tokens"].shape[0]
    if n % micro_batch_size:
        raise ValueError(f"{n} members are not a multiple of train.micro_batch_size ({micro_batch_size})")
    return [{k: v[i:i + micro_batch_size] for k, v in batch.items()} for i in range(0, n, micro_batch_size)]


def rollout_logprob_gap(batch_logp: torch.Tensor, members: Sequence[Member], mask: torch.Tensor) -> float:
    """Max |trainer log-prob - engine log-prob| over rollout tokens: how far the rollout engine drifted from
    the trainer's weights (0 up to kernel round-off when the weight sync is exact). batch_logp [N, S] fp32."""
    gap = 0.0
    for i, m in enumerate(members):
        if m.kind != "rollout" or not m.rollout_logprobs:
            continue
        idx = mask[i].nonzero()[:, 0]
        ours = batch_logp[i, idx].float()
        theirs = torch.tensor(m.rollout_logprobs[:len(idx)], dtype=torch.float32)
        gap = max(gap, float((ours[:len(theirs)] - theirs).abs().max()))
    return gap
