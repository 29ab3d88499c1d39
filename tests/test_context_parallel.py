"""Zig-zag context-parallel layout and per-sequence reductions across CP ranks.

Expected layouts come from an index formula written here (token t of chunk k = t // c lives on rank k or
2cp-1-k) and, on two real ranks, from Megatron-Core's own get_batch_on_this_cp_rank. Expected sums and
gradients come from single-process autograd on the unsplit tensors.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gift_megatron.parallel.context import (
    context_parallel_sequence_sum,
    context_parallel_token_count,
    zigzag_gather,
    zigzag_split,
)
from tests.multiproc import run_ranks


def owner_and_position(t: int, seq_len: int, cp: int) -> tuple[int, int]:
    """Independent index model of Megatron's layout: (CP rank holding token t, its local position)."""
    c = seq_len // (2 * cp)
    k, offset = divmod(t, c)
    if k < cp:
        return k, offset
    return 2 * cp - 1 - k, c + offset


@settings(max_examples=60, deadline=None)
@given(
    cp=st.integers(1, 4),
    chunk=st.integers(1, 3),
    batch=st.integers(1, 3),
    seq_dim=st.sampled_from([0, 1, 2, -2]),
)
def test_split_matches_index_model_and_gather_inverts_it(cp, chunk, batch, seq_dim):
    seq_len = 2 * cp * chunk
    shape = [batch, 3, 2]
    dim = seq_dim % 3
    shape[dim] = seq_len
    x = torch.arange(shape[0] * shape[1] * shape[2]).reshape(shape)  # every entry distinct
    parts = [zigzag_split(x, cp, r, seq_dim=seq_dim) for r in range(cp)]
    for t in range(seq_len):
        rank, pos = owner_and_position(t, seq_len, cp)
        assert torch.equal(parts[rank].select(dim, pos), x.select(dim, t))
    assert all(p.shape[dim] == seq_len // cp for p in parts)
    assert torch.equal(zigzag_gather(parts, seq_dim=seq_dim), x)


def test_split_literal_layout_for_cp2():
    x = torch.arange(8)[None]
    assert zigzag_split(x, 2, 0).tolist() == [[0, 1, 6, 7]]
    assert zigzag_split(x, 2, 1).tolist() == [[2, 3, 4, 5]]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: zigzag_split(torch.zeros(1, 6), 2, 0), "divisible by 2 \\* cp_size = 4"),
        (lambda: zigzag_split(torch.zeros(1, 8), 0, 0), "cp_size"),
        (lambda: zigzag_split(torch.zeros(1, 8), 2, 2), "cp_rank"),
        (lambda: zigzag_split(torch.zeros(1, 8), 2, -1), "cp_rank"),
        (lambda: zigzag_split(torch.zeros(1, 8), 2, 0, seq_dim=2), "seq_dim"),
        (lambda: zigzag_gather([]), "one tensor per CP rank"),
        (lambda: zigzag_gather([torch.zeros(1, 4), torch.zeros(1, 2)]), "same shape"),
        (lambda: zigzag_gather([torch.zeros(1, 3)]), "even"),
        (lambda: context_parallel_sequence_sum(torch.zeros(2, 4), torch.ones(2, 3)), "mask shape"),
        (lambda: context_parallel_sequence_sum(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4)), "values"),
        (lambda: context_parallel_token_count(torch.tensor(1.0)), "mask"),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_single_process_sums_ignore_non_finite_masked_values():
    values = torch.tensor([[1.0, float("nan"), 2.0], [float("-inf"), 3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    sums = context_parallel_sequence_sum(values, mask)
    assert sums.tolist() == [3.0, 7.0]
    sums.sum().backward()
    assert values.grad.tolist() == mask.float().tolist()
    assert context_parallel_token_count(mask).tolist() == [2.0, 2.0]
    weights = torch.tensor([[0.5, 0.0, 1.0], [0.0, 2.0, 1.0]])
    assert context_parallel_sequence_sum(torch.ones(2, 3), weights).tolist() == [1.5, 3.0]


# ----------------------------------------------------------------------------------------------- CP = 2

B, S, CP = 3, 12, 2


def make_batch():
    gen = torch.Generator().manual_seed(11)
    values = torch.randn(B, S, generator=gen, dtype=torch.float64).float()
    mask = torch.rand(B, S, generator=gen) > 0.3
    # Per-rank loss coefficients: the global loss is sum_r sum_b coef[r, b] * total_b^2.
    coef = torch.randn(CP, B, generator=gen)
    return values, mask, coef


def megatron_split(batch: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    """Megatron-Core's own CP split; its signature gained is_hybrid_cp after 0.16."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    kwargs = {"cp_group": group}
    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        kwargs["is_hybrid_cp"] = False
    return get_batch_on_this_cp_rank(dict(batch), **kwargs)


def _cp_worker(rank: int, world: int):
    import torch.distributed as dist

    values, mask, coef = make_batch()
    group = dist.group.WORLD
    meg = megatron_split({"values": values, "mask": mask, "tokens": torch.arange(S).expand(B, S)}, group)
    local_values = zigzag_split(values, world, rank).clone().requires_grad_()
    local_mask = zigzag_split(mask, world, rank)
    assert torch.equal(local_values.detach(), meg["values"])
    assert torch.equal(local_mask, meg["mask"])
    assert torch.equal(zigzag_split(torch.arange(S).expand(B, S), world, rank), meg["tokens"])

    totals = context_parallel_sequence_sum(local_values, local_mask, group)
    counts = context_parallel_token_count(local_mask, group)
    (coef[rank] * totals**2).sum().backward()
    return totals.detach(), counts, local_values.grad


@pytest.mark.timeout(150)
def test_cp2_sums_and_gradients_equal_single_process():
    per_rank = run_ranks(_cp_worker, CP, timeout=120)
    values, mask, coef = make_batch()
    leaf = values.clone().requires_grad_()
    totals = (leaf * mask).sum(dim=1)
    (coef.sum(dim=0) * totals**2).sum().backward()  # the sum of both ranks' losses
    for rank, (got_totals, got_counts, got_grad) in enumerate(per_rank):
        torch.testing.assert_close(got_totals, totals.detach())
        assert got_counts.dtype == torch.float32 and got_counts.tolist() == mask.sum(dim=1).float().tolist()
        torch.testing.assert_close(got_grad, zigzag_split(leaf.grad, CP, rank))
