"""The central contract: loss, gradient and metrics do not depend on how the batch is laid out.

The single-process whole-batch computation (itself checked against the naive references in
test_objectives.py) is compared with 2 gloo ranks holding: members of the same groups on different
data-parallel ranks and in different micro-batches; the tokens of every sequence split across
context-parallel ranks in Megatron's zig-zag layout; and packed rows (several members end to end in one
[1, T] row) split per sequence across context-parallel ranks, as Megatron-Core and Transformer Engine lay
out THD batches.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from gift_megatron import objectives as O
from tests.multiproc import run_ranks
from tests.test_objectives import make_batch

CASES = {
    "gift": dict(),
    "gift_full_grad_mean": dict(detach_stats=False, implicit_reward="mean", beta=0.7),
    "gift_floor_biased": dict(std_floor=0.3, unbiased=False, detach_stats=False),
    "gft": dict(tau=0.5),
    "grpo": dict(kl_coef=0.05),
    "dapo": dict(),
    "gspo": dict(eps_low=0.1, eps_high=0.1),
    "sft": dict(),
    "dft": dict(),
}


def _objective(case):
    name = case.split("_")[0]
    return O.build_objective(name, **CASES[case])


def _batch_for(case, seed=21, S=8):
    b = make_batch(seed, sizes=(4, 3, 1, 5, 2, 3), S=S)
    return b


def _token_batch(b, rows=None, cols=None):
    def sel(x):
        if x is None:
            return None
        if rows is not None:
            x = x[rows]
        if cols is not None and x.dim() == 2:
            x = x[:, cols]
        return x

    return O.TokenBatch(
        logp=sel(b["lp"]),
        mask=sel(b["m"]),
        rewards=sel(b["R"]),
        group_ids=sel(b["gid"]),
        ref_logp=sel(b["rlp"]),
        old_logp=sel(b["olp"]),
    )


def _run(obj, batches, layout, leaves=None):
    """Both phases over this rank's micro-batches; returns (loss sum, grads per micro-batch, metrics).
    ``leaves``: the tensors to differentiate (default: each micro-batch's logp, made a leaf here)."""
    if leaves is None:
        leaves = [mb.logp.clone().requires_grad_(True) for mb in batches]
        for mb, leaf in zip(batches, leaves):
            mb.logp = leaf
    stats = obj.statistics(O.Members.cat([obj.members(mb, layout) for mb in batches]), layout)
    outs = []
    for mb in batches:
        out = obj.loss(mb, stats, layout)
        out.loss.backward()
        outs.append(out)
    total = O.LossOutput.accumulate(outs)
    metrics = {k: float(v) for k, v in total.finalize(layout).items()}
    return float(total.loss.detach()), [torch.nan_to_num(l.grad, nan=0.0) for l in leaves], metrics


def single_process(case):
    b = _batch_for(case)
    loss, (grad,), metrics = _run(_objective(case), [_token_batch(b)], O.SINGLE_PROCESS)
    return loss, grad, metrics


def _zigzag_columns(S, cp, rank):
    """Megatron's context-parallel layout, written out independently of gift_megatron.parallel."""
    chunk = S // (2 * cp)
    first = list(range(rank * chunk, (rank + 1) * chunk))
    second = list(range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk))
    return torch.tensor(first + second)


def distributed_worker(rank, world, case, mode):
    b = _batch_for(case)
    B, S = b["lp"].shape
    obj = _objective(case)
    world_group = dist.group.WORLD
    if mode == "dp_microbatches":
        # member i -> rank i % 2, then alternate micro-batches: every multi-member group is split both ways
        mine = torch.arange(rank, B, world)
        micro = [mine[0::2], mine[1::2]]
        layout = O.BatchLayout(dp_group=world_group)
        loss, grads, metrics = _run(obj, [_token_batch(b, rows=r) for r in micro], layout)
        return loss, [(r, g) for r, g in zip(micro, grads)], metrics
    if mode == "dp_single_call":
        mine = torch.arange(rank, B, world)
        layout = O.BatchLayout(dp_group=world_group)
        loss, (grad,), metrics = _run(obj, [_token_batch(b, rows=mine)], layout)
        return loss, [(mine, grad)], metrics
    if mode == "cp":
        cols = _zigzag_columns(S, world, rank)
        layout = O.BatchLayout(cp_group=world_group)
        micro = [torch.arange(0, B, 2), torch.arange(1, B, 2)]
        loss, grads, metrics = _run(obj, [_token_batch(b, rows=r, cols=cols) for r in micro], layout)
        return loss, [(r, g, cols) for r, g in zip(micro, grads)], metrics
    if mode == "cp_packed":
        return _packed_cp_worker(rank, world, b, obj)
    raise ValueError(mode)


def _lengths(mask):
    """Each row's positions up to its last counted token (at least 1), computed here independently."""
    out = []
    for row in mask:
        nz = [t for t in range(row.numel()) if row[t] > 0]
        out.append(nz[-1] + 1 if nz else 1)
    return out


def _packed_cp_worker(rank, world, b, obj):
    """Members packed two rows per rank-shared bin, each sequence zig-zag split over ``world`` CP ranks;
    the loss sees them through the library's unpack. Gradients are taken on the packed CP-local row."""
    from gift_megatron.parallel.packing import pack_rows, unpack, zigzag_positions

    B, S = b["lp"].shape
    rows = {
        "tokens": torch.zeros(B, S, dtype=torch.long),
        "loss_mask": b["m"],
        "lp": b["lp"],
        "R": b["R"],
        "gid": b["gid"],
    }
    for key in ("rlp", "olp"):
        if b[key] is not None:
            rows[key] = b[key]
    bins = [list(range(0, B, 2)), list(range(1, B, 2))]
    layout = O.BatchLayout(cp_group=dist.group.WORLD)
    batches, leaves, places = [], [], []
    for members, mb in zip(bins, pack_rows(rows, bins, multiple=2 * world)):
        idx = zigzag_positions(mb["packed"], world, rank, torch.device("cpu"))
        local = mb["packed"].for_cp_rank(world)
        leaf = mb["lp"][:, idx].clone().requires_grad_(True)
        cut = {k: (unpack(mb[k][:, idx], local) if k in mb else None) for k in ("loss_mask", "rlp", "olp")}
        batches.append(
            O.TokenBatch(
                logp=unpack(leaf, local),
                mask=cut["loss_mask"],
                rewards=mb["R"],
                group_ids=mb["gid"],
                ref_logp=cut["rlp"],
                old_logp=cut["olp"],
            )
        )
        leaves.append(leaf)
        expected = [-(-_lengths(b["m"][r : r + 1])[0] // (2 * world)) * 2 * world for r in members]
        assert list(mb["packed"].padded) == expected, (mb["packed"], expected)
        places.append((members, list(mb["packed"].padded)))
    loss, grads, metrics = _run(obj, batches, layout, leaves)
    return loss, [(m, g[0], p, rank, world) for (m, p), g in zip(places, grads)], metrics


def _assemble(results, B, S, mode):
    grad = torch.zeros(B, S)
    for _, pieces, _ in results:
        for piece in pieces:
            if mode == "cp_packed":  # local packed position -> (member, column), from the layout alone
                members, slots, rank, world = piece[0], piece[2], piece[3], piece[4]
                g, offset = piece[1], 0
                for row, slot in zip(members, slots):
                    cols = _zigzag_columns(slot, world, rank)
                    for j, c in enumerate(cols.tolist()):
                        if c < S:
                            grad[row, c] += g[offset + j]
                    offset += len(cols)
            elif mode == "cp":
                rows, g, cols = piece
                grad[rows[:, None], cols[None, :]] += g
            else:
                rows, g = piece
                grad[rows] += g
    return grad


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["dp_microbatches", "dp_single_call", "cp", "cp_packed"])
def test_layouts_match_single_process(mode):
    """Every objective, one pair of 2-rank jobs per mode (process start-up dominates, so cases share it)."""
    results = run_ranks(_all_cases_worker, 2, mode, timeout=240)
    for case in CASES:
        loss1, grad1, metrics1 = single_process(case)
        per_rank = [r[case] for r in results]
        B, S = grad1.shape
        total = sum(r[0] for r in per_rank)
        assert abs(total - loss1) <= 1e-5 * max(1.0, abs(loss1)), (case, total, loss1)
        grad = _assemble(per_rank, B, S, mode if mode.startswith("cp") else "dp")
        scale = float(grad1.abs().max())
        assert scale > 0, case
        torch.testing.assert_close(
            grad, grad1, rtol=1e-4, atol=1e-6 * max(1.0, scale) + 1e-5 * scale, msg=lambda m: f"{case}/{mode}: {m}"
        )
        for r in per_rank:
            assert set(r[2]) == set(metrics1), case
            for k, v in metrics1.items():
                assert r[2][k] == pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True), (case, mode, k)


def _all_cases_worker(rank, world, mode):
    return {case: distributed_worker(rank, world, case, mode) for case in CASES}


def test_single_process_micro_batches_match_whole_batch():
    """Groups split over 3 micro-batches in one process: same loss, gradient and metrics."""
    for case in CASES:
        loss1, grad1, metrics1 = single_process(case)
        b = _batch_for(case)
        B = b["lp"].shape[0]
        rows = [torch.arange(k, B, 3) for k in range(3)]
        loss, grads, metrics = _run(_objective(case), [_token_batch(b, rows=r) for r in rows], O.SINGLE_PROCESS)
        grad = torch.zeros_like(grad1)
        for r, g in zip(rows, grads):
            grad[r] = g
        assert loss == pytest.approx(loss1, rel=1e-5, abs=1e-7), case
        torch.testing.assert_close(grad, grad1, rtol=1e-4, atol=1e-5 * float(grad1.abs().max()))
        for k, v in metrics1.items():
            assert metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-7, nan_ok=True), (case, k)
