"""A step's members: each drawn prompt's demonstrations and scored rollouts, grouped.

A group is one prompt with ``n_expert`` expert demonstrations, ``n_teacher`` teacher responses (GFT's
hybrid groups, docs/objectives.md, GFT) and its on-policy rollouts, in that order (the loss ignores the
order). Every member is scored by the same reward function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from gift_megatron.trainer.batch import Member

if TYPE_CHECKING:
    from gift_megatron.data.prompts import PromptExample
    from gift_megatron.data.tokenizer import Tokenizer
    from gift_megatron.rollout.base import Rollout


def assemble_members(
    drawn: Sequence[tuple[int, PromptExample]],
    prompts: Sequence[list[int]],
    rollouts: Sequence[Rollout],
    tokenizer: Tokenizer,
    *,
    n_expert: int,
    n_teacher: int,
    n_rollout: int,
) -> list[Member]:
    """The members of every drawn prompt, unscored.

    drawn: (global prompt index within the step, example) pairs; the index is the group id. prompts: each
    example's prompt ids. rollouts: ``n_rollout`` per prompt, prompt-major (the engine's order).
    """
    members = []
    eos = tokenizer.eos_id
    for j, (k, ex) in enumerate(drawn):
        p = prompts[j]
        if n_expert and ex.expert is None:  # the trainer checks every row at start-up
            raise ValueError(f"{ex.source}:{ex.line}: the row has no 'expert' field")
        demos = [("expert", ex.expert or "")] * n_expert + [("teacher", t) for t in ex.teachers[:n_teacher]]
        for kind, text in demos:
            members.append(Member(k, p, tokenizer.encode(text) + [eos], kind, response_text=text))
        for ro in rollouts[j * n_rollout : (j + 1) * n_rollout]:
            ids = ro.response_ids.tolist()
            members.append(
                Member(
                    k,
                    p,
                    ids,
                    "rollout",
                    response_text=tokenizer.decode([t for t in ids if t != eos]),
                    rollout_logprobs=ro.logprobs.tolist(),
                    finished=ro.finished,
                )
            )
    return members


def score_members(
    reward_fn: Callable[[list[Any]], Any], members: list[Member], examples: dict[int, PromptExample]
) -> None:
    """Set every member's reward, in place, from one call of ``reward_fn`` (checked: one finite float per
    member). ``examples``: each group id's example (prompt, reference answer)."""
    from gift_megatron.rewards import RewardInput, check_rewards

    inputs = [
        RewardInput(
            prompt=examples[m.group_id].prompt_text,
            response=m.response_text,
            answer=examples[m.group_id].answer,
            example=examples[m.group_id],
        )
        for m in members
    ]
    values = check_rewards(reward_fn(inputs), inputs)
    for m, v in zip(members, values):
        m.reward = float(v)
