"""Metrics of one training step that the objective does not compute: how far the rollout engine is from
the trainer (``rollout/logprob_gap_max``), the rollouts' KL to the reference (``kl/reference``), and the
step's record (rewards, lengths, timings, token counts).

Both comparisons use numbers the step has anyway (the engine's sampling log-probs, the old-policy and
reference passes): no extra forward pass. Under context parallelism each CP rank holds the log-probs of its
own zig-zag positions only (``ObjectiveStep`` stores them at their full-sequence positions), so each rank
compares those positions and the job-wide reduction adds them up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gift_megatron import comm
from gift_megatron.megatron.forward import cp_local_positions, member_rows
from gift_megatron.megatron.mpu import parallel_state
from gift_megatron.trainer.batch import Member, StepBatch


def rollout_logprob_gap(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[max |trainer log-prob - engine log-prob| over counted rollout tokens, 1 if there was any such token
    else 0]: fp32 [2] on ``trainer_logp``'s device, no host sync.

    How far the rollout engine drifted from the trainer's weights: 0 up to kernel round-off when the weight
    sync is exact. trainer_logp, mask [N, S] (device); engine_logp [N, S] from
    :func:`gift_megatron.trainer.batch.engine_logprobs` (NaN where the engine sampled nothing).
    """
    engine = engine_logp.to(trainer_logp.device, non_blocking=True)
    valid = (mask > 0) & torch.isfinite(engine)
    diff = torch.where(valid, (trainer_logp.float() - torch.nan_to_num(engine)).abs(), trainer_logp.new_zeros(()))
    return torch.stack([diff.max() if diff.numel() else diff.sum(), valid.any().float()]).float()


def rollout_kl_to_reference(ref_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[sum over rollout responses of sum_t (engine log-prob - reference log-prob), number of rollout
    responses]: fp32 [2] on ``ref_logp``'s device, no host sync. The k1 estimate of KL(pi || pi_ref) per
    response, from numbers the step has anyway (no extra pass). ref_logp, mask [N, S]; engine_logp as above.
    """
    engine = engine_logp.to(ref_logp.device, non_blocking=True)
    valid = (mask > 0) & torch.isfinite(engine)
    per_token = torch.where(
        valid, torch.nan_to_num(engine) - ref_logp.float(), ref_logp.new_zeros((), dtype=torch.float32)
    )
    return torch.stack([per_token.sum(), valid.any(dim=1).float().sum()])


def _cp_local_mask(mb: dict[str, Any]) -> torch.Tensor:
    """``mb``'s loss mask restricted to the positions whose log-probs this context-parallel rank computed."""
    ps = parallel_state()
    cp = ps.get_context_parallel_world_size()
    mask = mb["loss_mask"]
    if cp == 1:
        return mask
    keep = torch.zeros_like(mask)
    keep[:, cp_local_positions(mb, cp, ps.get_context_parallel_rank(), mask.device)] = 1
    return mask * keep


def _holds_whole_logprobs() -> bool:
    """Whether this rank holds the log-probs of the step (the last pipeline stage's first TP rank; every CP
    rank, each with its own positions)."""
    ps = parallel_state()
    return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0


def rollout_gap(mbs: Sequence[dict[str, Any]], engine: Sequence[torch.Tensor], device: torch.device) -> float | None:
    """Max |trainer old log-prob - engine sampling log-prob| over every rollout token of the step, when the
    objective has the old-policy pass (GRPO family, GIFT reference=rollout); None otherwise. It measures
    that the weight sync left the engine on the trainer's exact weights. Global max over every rank
    (collective); computed on the device, one host copy."""
    have = torch.zeros(2, dtype=torch.float32, device=device)
    if _holds_whole_logprobs() and mbs[0].get("old_logp") is not None:
        parts = [rollout_logprob_gap(mb["old_logp"], e, _cp_local_mask(mb)) for mb, e in zip(mbs, engine)]
        have = torch.stack(parts).amax(dim=0)
    gap, seen = comm.all_reduce_tensor(have, "max").tolist()
    return gap if seen > 0 else None


def kl_to_reference(mbs: Sequence[dict[str, Any]], engine: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(sum, count) of this rank's share of the k1 KL(pi || pi_ref) over its replica's rollouts: the sum
    over the tokens whose reference log-probs it holds, and the responses counted on context-parallel rank 0
    only. (0, 0) without a reference pass or off the ranks that hold the log-probs; sum both over every
    rank for the step's value."""
    if mbs[0].get("ref_logp") is None or not _holds_whole_logprobs():
        return 0.0, 0.0
    ps = parallel_state()
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    parts = []
    for mb, e in zip(mbs, engine):
        e = member_rows(mb, e.to(mb["ref_logp"].device))
        ref = member_rows(mb, mb["ref_logp"])
        local = rollout_kl_to_reference(ref, e, member_rows(mb, _cp_local_mask(mb)))
        if cp > 1:  # responses are counted once, on CP rank 0, over their whole mask
            whole = (
                rollout_kl_to_reference(ref, e, member_rows(mb, mb["loss_mask"]))[1] if cp_rank == 0 else 0 * local[1]
            )
            local = torch.stack([local[0], whole])
        parts.append(local)
    total, n = torch.stack(parts).sum(dim=0).tolist()
    return total, n


def rollout_totals(rollouts: Sequence[Member], batch: StepBatch) -> list[float]:
    """This replica's [reward sum, rollouts, response tokens, finished rollouts, real tokens, computed
    tokens]: summed over replicas by the trainer for the step's record."""
    return [
        sum(m.reward for m in rollouts),
        len(rollouts),
        sum(len(m.response_ids) for m in rollouts),
        sum(m.finished for m in rollouts),
        batch.tokens_real,
        batch.tokens_computed,
    ]


def step_record(
    totals: Sequence[float], kl: Sequence[float], gap: float | None, timings: dict[str, float]
) -> dict[str, float]:
    """The step's own metrics from the job-wide sums of :func:`rollout_totals` and :func:`kl_to_reference`
    and the phase timings (seconds: rollout, train, sync, step). ``kl/reference`` and
    ``rollout/logprob_gap_max`` are left out when the step had no reference / old-policy pass."""
    r_sum, r_n, len_sum, fin, tok, computed = totals
    kl_sum, kl_n = kl
    out = {
        "rollout/reward_mean": r_sum / max(r_n, 1),
        "response/length_mean": len_sum / max(r_n, 1),
        "response/finished_frac": fin / max(r_n, 1),
        "perf/rollout_s": timings["rollout"],
        "perf/train_s": timings["train"],
        "perf/sync_s": timings["sync"],
        "perf/step_s": timings["step"],
        "perf/tokens_per_s": tok / max(timings["step"], 1e-9),  # real tokens, not padding
        "perf/tokens_real": tok,
        "perf/tokens_computed": computed,
    }
    if kl_n:
        out["kl/reference"] = kl_sum / kl_n
    if gap is not None:
        out["rollout/logprob_gap_max"] = gap
    return out
