"""The trainer's own step metrics under context parallelism: each CP rank holds the log-probs of its
zig-zag positions only, and ``kl/reference`` / ``rollout/logprob_gap_max`` must still be the whole
sequences' values. Reference: the same formulas on the whole rows in one process, written out here."""

from __future__ import annotations

import pytest
import torch

from tests.multiproc import run_ranks

CP = 2


def _rows(packed: bool):
    """Two rollouts and an expert (no engine log-probs) of a step; (mb, engine log-probs [1|N, S])."""
    from gift_megatron.parallel.packing import pack_rows
    from gift_megatron.trainer.batch import Member, engine_logprobs, pack

    g = torch.Generator().manual_seed(0)
    members = [
        Member(0, [1, 2, 3], [4, 5, 6, 7], "rollout", rollout_logprobs=(-torch.rand(4, generator=g)).tolist()),
        Member(0, [1, 2, 3], [8, 9], "expert"),
        Member(1, [1, 2], [5, 6, 7, 8, 9], "rollout", rollout_logprobs=(-torch.rand(5, generator=g)).tolist()),
    ]
    rows = pack(members, seq_length=8, pad_id=0)
    rows["ref_logp"] = -torch.rand(rows["labels"].shape, generator=g)
    rows["old_logp"] = -torch.rand(rows["labels"].shape, generator=g)
    rows["engine"] = engine_logprobs(members, 8)
    if packed:
        lengths = [int(m.nonzero().max()) + 1 for m in rows["loss_mask"]]
        (mb,) = pack_rows(rows, [[0, 1, 2]], multiple=2 * CP, lengths=lengths)
    else:
        mb = rows
    return mb, mb.pop("engine")


def _expected(packed: bool):
    from gift_megatron.megatron.forward import member_rows

    mb, engine = _rows(packed)
    m = member_rows(mb, mb["loss_mask"]) > 0
    e = member_rows(mb, engine)
    valid = m & torch.isfinite(e)
    kl_sum = float(torch.where(valid, e - member_rows(mb, mb["ref_logp"]), torch.zeros(())).sum())
    gap = float(torch.where(valid, (member_rows(mb, mb["old_logp"]) - e).abs(), torch.zeros(())).max())
    return kl_sum, float(valid.any(dim=1).sum()), gap


def _cp_worker(rank, world):
    from gift_megatron.megatron.forward import cp_local_positions
    from gift_megatron.parallel import destroy_model_parallel_cpu, initialize_model_parallel_cpu
    from gift_megatron.trainer.step_metrics import kl_to_reference, rollout_gap

    initialize_model_parallel_cpu(1, 1, CP)
    try:
        out = {}
        for packed in (False, True):
            mb, engine = _rows(packed)
            # As ObjectiveStep leaves them: this CP rank's log-probs at their full-row positions, 0 elsewhere.
            keep = torch.zeros_like(mb["loss_mask"])
            keep[:, cp_local_positions(mb, CP, rank, keep.device)] = 1
            mb["ref_logp"], mb["old_logp"] = mb["ref_logp"] * keep, mb["old_logp"] * keep
            with torch.device("meta"):  # a tensor made without a device would land on meta and fail
                kl = kl_to_reference([mb], [engine])
                gap = rollout_gap([mb], [engine], torch.device("cpu"))
            total = torch.tensor(kl)
            torch.distributed.all_reduce(total)
            out[packed] = (total.tolist(), gap)
        return out
    finally:
        destroy_model_parallel_cpu()


@pytest.mark.timeout(180)
def test_kl_and_gap_under_context_parallel_equal_the_whole_rows():
    results = run_ranks(_cp_worker, CP, timeout=150)
    for packed in (False, True):  # padded rows and a packed row
        kl_sum, n, gap = _expected(packed)
        for per_rank in results:
            (got_sum, got_n), got_gap = per_rank[packed]
            assert got_n == n == 2
            assert got_sum == pytest.approx(kl_sum, abs=1e-5)
            assert got_gap == pytest.approx(gap, abs=1e-6)
