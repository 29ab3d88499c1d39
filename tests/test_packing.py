"""Packed sequences and token-budget micro-batches: the plan, the tensors, and the model on packed rows.

The exactness of a whole training step on packed rows (TP, PP, DP) is in test_megatron_step.py; the loss at
context parallelism in test_layout_invariance.py; the trainer in test_train_e2e.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from gift_megatron.parallel.packing import (
    PackedLayout,
    first_fit_decreasing,
    karmarkar_karp,
    pack_rows,
    pad_multiple,
    plan_bins,
    sequence_lengths,
    trim_rows,
    unpack,
    zigzag_positions,
)
from tests.multiproc import run_ranks


def _round_up(n, m):
    return -(-n // m) * m


# ------------------------------------------------------------------------------------------ planning
def test_karmarkar_karp_balances_better_than_round_robin_and_covers_every_index():
    rng = random.Random(0)
    for trial in range(200):
        k = rng.randint(1, 5)
        weights = [rng.randint(1, 1000) for _ in range(rng.randint(0, 30))]
        parts = karmarkar_karp(weights, k)
        assert len(parts) == k
        assert sorted(i for p in parts for i in p) == list(range(len(weights)))
        sums = [sum(weights[i] for i in p) for p in parts]
        if weights:
            # The differencing method's spread never exceeds the largest weight (greedy's bound).
            assert max(sums) - min(sums) <= max(weights), (weights, k, sums)
    # The textbook instance: greedy (largest first to the lightest part) ends 17/13, differencing 16/14.
    weights = [8, 7, 6, 5, 4]
    greedy = [0, 0]
    for w in weights:
        greedy[greedy.index(min(greedy))] += w
    parts = karmarkar_karp(weights, 2)
    assert sorted(greedy) == [13, 17]
    assert sorted(sum(weights[i] for i in p) for p in parts) == [14, 16]


def test_first_fit_decreasing_respects_capacity_and_is_near_the_lower_bound():
    rng = random.Random(1)
    for _ in range(200):
        cap = rng.randint(10, 100)
        sizes = [rng.randint(1, cap) for _ in range(rng.randint(1, 40))]
        bins = first_fit_decreasing(sizes, cap)
        assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
        assert all(sum(sizes[i] for i in b) <= cap for b in bins)
        lower = -(-sum(sizes) // cap)
        assert len(bins) <= 11 / 9 * lower + 1  # FFD's worst-case guarantee against the optimum


def _groups(rng, n_groups, size, lo, hi):
    lengths, gids = [], []
    for g in range(n_groups):
        for _ in range(size):
            lengths.append(rng.randint(lo, hi))
            gids.append(1000 + g)
    return lengths, gids


@pytest.mark.parametrize("dp,multiple,bins_multiple", [(1, 1, 1), (2, 4, 1), (4, 2, 2), (3, 1, 3)])
def test_plan_bins_invariants(dp, multiple, bins_multiple):
    rng = random.Random(dp * 7 + multiple)
    for trial in range(30):
        lengths, gids = _groups(rng, rng.randint(dp * 2, dp * 6), rng.randint(2, 8), 5, 120)
        budget = _round_up(rng.randint(130, 600), multiple)
        plan = plan_bins(lengths, gids, budget=budget, dp_size=dp, multiple=multiple, bins_multiple=bins_multiple)
        assert len(plan) == dp
        counts = {len(bins) for bins in plan}
        assert len(counts) == 1 and counts.pop() % bins_multiple == 0  # every rank runs the same number
        seen = sorted(i for bins in plan for b in bins for i in b)
        assert seen == list(range(len(lengths)))  # every member exactly once
        sizes = [_round_up(n, multiple) for n in lengths]
        for bins in plan:
            for b in bins:
                assert b and sum(sizes[i] for i in b) <= budget
        loads = [sum(sizes[i] for b in bins for i in b) for bins in plan]
        # balanced to within one item (a whole group that fits, or a member)
        assert max(loads) - min(loads) <= max(budget, max(sizes)), (loads, budget)


def test_plan_bins_keeps_groups_whole_when_they_fit():
    # 4 groups of 4 members of 10 tokens: each group (40) fits a 50-token bin.
    lengths, gids = [10] * 16, [g for g in range(4) for _ in range(4)]
    plan = plan_bins(lengths, gids, budget=50, dp_size=2)
    for bins in plan:
        for b in bins:
            assert len({gids[i] for i in b}) == 1 and len(b) == 4
    # A 30-token budget cannot hold a group: members are packed individually.
    plan = plan_bins(lengths, gids, budget=30, dp_size=2)
    assert any(len({gids[i] for i in b}) > 1 or len(b) < 4 for bins in plan for b in bins)


def test_plan_bins_errors_name_the_numbers():
    with pytest.raises(
        ValueError,
        match=r"member 2 \(group 7\) needs 104 tokens \(length 101, padded to a multiple "
        r"of 4\), more than train.micro_batch_tokens \(100\)",
    ):
        plan_bins([10, 20, 101], [7, 7, 7], budget=100, multiple=4)
    with pytest.raises(ValueError, match=r"train.micro_batch_tokens \(102\) must be a positive multiple of 4"):
        plan_bins([10], [1], budget=102, multiple=4)
    with pytest.raises(ValueError, match="data-parallel rank 1 holds 1 members but every rank must run 2"):
        # balanced tokens: rank 0 gets the four members of 26 (two bins), rank 1 the 100-token one (one bin)
        plan_bins([100, 26, 26, 26, 26], [1, 2, 3, 4, 5], budget=100, dp_size=2)


def test_pad_multiple():
    assert pad_multiple() == 1 and pad_multiple(tp=4) == 1
    assert pad_multiple(cp=2) == 4 and pad_multiple(tp=2, cp=2, sequence_parallel=True) == 8
    assert pad_multiple(tp=4, sequence_parallel=True) == 4


# ------------------------------------------------------------------------------------------- tensors
def _rows(seed=0, n=6, s=12):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, s)
    ends = torch.randint(1, s + 1, (n,), generator=g).tolist()
    for i, e in enumerate(ends):
        mask[i, max(0, e - 4) : e] = 1.0
    return {
        "tokens": torch.randint(0, 50, (n, s), generator=g),
        "labels": torch.randint(0, 50, (n, s), generator=g),
        "loss_mask": mask,
        "ref_logp": -torch.rand(n, s, generator=g),
        "rewards": torch.randn(n, generator=g),
        "group_ids": torch.tensor([0, 0, 1, 1, 2, 2]),
    }, ends


def test_sequence_lengths_trim_and_pack_roundtrip():
    rows, ends = _rows()
    assert sequence_lengths(rows["loss_mask"]) == ends
    trimmed = trim_rows(rows, multiple=4)
    assert trimmed["tokens"].shape[1] == min(_round_up(max(ends), 4), 12)
    assert torch.equal(trimmed["rewards"], rows["rewards"])
    bins = [[0, 3, 5], [1, 2, 4]]
    for multiple, row_tokens in ((1, None), (4, None), (4, 48)):
        mbs = pack_rows(rows, bins, multiple=multiple, row_tokens=row_tokens)
        for b, mb in zip(bins, mbs):
            layout = mb["packed"]
            slots = [_round_up(ends[i], multiple) for i in b]
            if row_tokens:
                slots[-1] += row_tokens - sum(slots)
            assert list(layout.padded) == slots and list(layout.lengths) == [ends[i] for i in b]
            assert mb["tokens"].shape == (1, sum(slots))
            assert torch.equal(mb["rewards"], rows["rewards"][b]) and torch.equal(mb["group_ids"], rows["group_ids"][b])
            assert layout.cu_seqlens(torch.device("cpu")).tolist() == [0] + [
                sum(ends[i] for i in b[: j + 1]) for j in range(len(b))
            ]
            pos = mb["position_ids"][0].tolist()
            start = 0
            for slot in slots:  # positions restart at 0 in every slot
                assert pos[start : start + slot] == list(range(slot))
                start += slot
            for key in ("tokens", "labels", "loss_mask", "ref_logp"):
                per_member = unpack(mb[key], layout)
                for j, i in enumerate(b):
                    assert torch.equal(per_member[j, : ends[i]], rows[key][i, : ends[i]]), (key, i)
                    if key == "loss_mask":
                        assert per_member[j, ends[i] :].sum() == 0


def test_unpack_gradient_is_a_scatter():
    layout = PackedLayout((2, 3), (4, 4))
    x = torch.arange(8.0, requires_grad=True)
    rows = unpack(x[None], layout)
    assert rows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    (rows * torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])).sum().backward()
    assert x.grad.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="does not match a layout of 8 tokens"):
        unpack(torch.zeros(1, 9), layout)


def test_zigzag_positions_split_every_slot_like_megatron():
    layout = PackedLayout((3, 8, 1), (4, 8, 4))
    for rank in range(2):
        got = zigzag_positions(layout, 2, rank, torch.device("cpu")).tolist()
        expected, start = [], 0
        for p in layout.padded:  # chunks rank and 3 - rank of 4 per slot, written out by hand
            c = p // 4
            expected += list(range(start + rank * c, start + (rank + 1) * c))
            expected += list(range(start + (3 - rank) * c, start + (4 - rank) * c))
            start += p
        assert got == expected
    with pytest.raises(ValueError, match="not divisible by 2 x context_parallel_size \\(6\\)"):
        zigzag_positions(layout, 3, 0, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- model
def _model_worker(rank, world, bf16):
    from gift_megatron.megatron.forward import model_logprobs
    from gift_megatron.megatron.model import ModelConfig, ParallelConfig, PrecisionConfig, build_model
    from gift_megatron.parallel.cpu_runtime import destroy_model_parallel_cpu, initialize_model_parallel_cpu

    initialize_model_parallel_cpu(seed=3)
    try:
        cfg = ModelConfig(
            num_layers=2,
            hidden_size=64,
            ffn_hidden_size=128,
            num_attention_heads=4,
            num_query_groups=2,
            vocab_size=128,
            seq_length=32,
            max_position_embeddings=64,
        )
        model = build_model(cfg, ParallelConfig(), PrecisionConfig(dtype="bf16" if bf16 else "fp32"))
        g = torch.Generator().manual_seed(5)
        n, s = 5, 32
        ends = [7, 32, 12, 1, 20]
        mask = torch.zeros(n, s)
        for i, e in enumerate(ends):
            mask[i, max(0, e - 5) : e] = 1
        rows = {
            "tokens": torch.randint(0, 128, (n, s), generator=g),
            "labels": torch.randint(0, 128, (n, s), generator=g),
            "loss_mask": mask,
        }
        with torch.no_grad():
            padded = model_logprobs(model, rows)
            mb = pack_rows(rows, [list(range(n))], multiple=4)[0]
            packed = unpack(model_logprobs(model, mb), mb["packed"])
            alone = [model_logprobs(model, {k: v[i : i + 1, : ends[i]] for k, v in rows.items()})[0] for i in range(n)]
        return (
            [float((packed[i, :e] - alone[i]).abs().max()) for i, e in enumerate(ends)],
            [float((packed[i, :e] - padded[i, :e]).abs().max()) for i, e in enumerate(ends)],
        )
    finally:
        destroy_model_parallel_cpu()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_packed_rows_compute_each_sequence_as_if_alone(bf16):
    """The project's model (local spec) on one packed row: every sequence's log-probs equal the sequence run
    alone (bit for bit: per-slot attention, RoPE restarting per sequence), and padded rows to fp32 round-off."""
    vs_alone, vs_padded = run_ranks(_model_worker, 1, bf16, timeout=180)[0]
    assert max(vs_alone) == 0.0, vs_alone
    assert max(vs_padded) <= (0.0 if bf16 else 1e-5), vs_padded


def test_pipeline_rows_pad_to_the_largest_bin_not_the_budget():
    from gift_megatron.parallel.packing import plan_row_tokens

    rng = random.Random(5)
    lengths, gids = _groups(rng, 24, 8, 50, 900)
    plan = plan_bins(lengths, gids, budget=8192, dp_size=4)
    row = plan_row_tokens(plan, lengths)
    loads = [sum(lengths[i] for i in b) for bins in plan for b in bins]
    assert row == max(loads) <= 8192
    # bins are balanced within a rank: every row is padded by little
    assert sum(row - load for load in loads) <= 0.1 * sum(loads), (row, loads)
