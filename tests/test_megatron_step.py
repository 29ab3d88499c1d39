"""ObjectiveStep inside Megatron-Core's schedules: one optimizer step is the same in every layout.

Identical weights (a TP=1 distributed checkpoint) are loaded into TP=1/PP=1/DP=1 with one micro-batch and
into TP=2, PP=2, DP=2 and TP=2 x DP=2 with the groups split across micro-batches and DP ranks. One SGD step
of GIFT, GFT and GRPO must give the same loss, metrics, gradient norm and updated weights (fp32 round-off).
SGD, not Adam, because Adam's first step is lr * sign(grad) and would hide gradient magnitudes.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.multiproc import run_ranks
from tests.tiny_gpt import Layout, TinyGPT, build_model, load_weights, save_weights, setup_parallel, teardown_parallel

SPEC = TinyGPT(seq_length=16)
N_MEMBERS, GROUP = 16, 4
OBJECTIVES = {
    "gift": dict(beta=1.0),
    "gift_full": dict(beta=0.5, detach_stats=False, implicit_reward="mean"),
    "gft": dict(tau=0.5),
    "grpo": dict(kl_coef=0.1),
}
LR = 0.5


def global_batch(seed=3):
    """16 members in 4 groups of 4: prompt tokens shared within a group, ragged response masks."""
    g = torch.Generator().manual_seed(seed)
    S = SPEC.seq_length
    prompts = torch.randint(0, SPEC.vocab_size, (N_MEMBERS // GROUP, S + 1), generator=g)
    tokens = prompts.repeat_interleave(GROUP, 0)
    prompt_len = 4
    tokens[:, prompt_len:] = torch.randint(0, SPEC.vocab_size, (N_MEMBERS, S + 1 - prompt_len), generator=g)
    lengths = torch.randint(3, S - prompt_len + 1, (N_MEMBERS,), generator=g)
    pos = torch.arange(S)
    mask = ((pos[None] >= prompt_len - 1) & (pos[None] < prompt_len - 1 + lengths[:, None])).float()
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": mask,
        "rewards": torch.randn(N_MEMBERS, generator=g),
        "group_ids": torch.arange(N_MEMBERS) // GROUP + 100,
    }


def split(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def my_micro_batches(dp_rank, dp_size, n_micro, whole_groups):
    batch = global_batch()
    idx = torch.arange(N_MEMBERS)
    if whole_groups:  # contiguous: each micro-batch holds whole groups
        mine = idx.view(dp_size, -1)[dp_rank]
        parts = mine.view(n_micro, -1)
    else:  # interleaved: every group is spread over ranks and micro-batches
        mine = idx[dp_rank::dp_size]
        parts = [mine[i::n_micro] for i in range(n_micro)]
    return [split(batch, p) for p in parts]


def packed_micro_batches(dp_rank, dp_size, budget, pp):
    """This rank's packed micro-batches of the global batch under a token budget (bins padded to the
    budget under pipeline parallelism), and whether every group landed whole in one bin."""
    from gift_megatron.parallel.packing import pack_rows, plan_bins, sequence_lengths

    batch = global_batch()
    gids = batch["group_ids"].tolist()
    plan = plan_bins(sequence_lengths(batch["loss_mask"]), gids, budget=budget, dp_size=dp_size)
    places: dict[int, set] = {}
    for r, bins in enumerate(plan):
        for j, members in enumerate(bins):
            for i in members:
                places.setdefault(gids[i], set()).add((r, j))
    whole = all(len(p) == 1 for p in places.values())
    return pack_rows(batch, plan[dp_rank], row_tokens=budget if pp > 1 else None), whole


def make_optimizer(model, config):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
        ),
        module=model,
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="sgd", lr=LR, sgd_momentum=0.0, weight_decay=0.0, clip_grad=1e9, params_dtype=torch.float32
        ),
        [ddp],
    )
    return ddp, opt


def step_worker(rank, world, tp, pp, n_micro, whole_groups, init_dir, out_dir, cases, budget=None):
    from megatron.core import parallel_state as ps

    from gift_megatron.megatron.reference import FrozenReference
    from gift_megatron.megatron.step import ObjectiveStep
    from gift_megatron.objectives import build_objective

    layout = Layout(tp=tp, pp=pp)
    setup_parallel(layout)
    results = {}
    try:
        for case in cases:
            # The reference holds other weights than the policy: at equal weights GIFT's implicit rewards
            # are exactly 0 and their group normalization would amplify round-off instead of testing it.
            model = build_model(SPEC, layout)
            load_weights(model, init_dir + "_ref")
            ddp, opt = make_optimizer(model, model.config)
            reference = FrozenReference([ddp], lambda i: build_model(SPEC, layout))
            load_weights(model, init_dir)
            obj = build_objective(case.split("_")[0], **OBJECTIVES[case])
            step = ObjectiveStep(obj, [ddp], opt, reference=reference)
            if budget is None:
                mbs = my_micro_batches(
                    ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), n_micro, whole_groups
                )
            else:
                mbs, whole = packed_micro_batches(
                    ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), budget, pp
                )
                assert whole == whole_groups, (budget, whole)
                assert "packed" in mbs[0] and mbs[0]["tokens"].shape[0] == 1
            res = step(mbs)
            save_weights(ddp.module, os.path.join(out_dir, case))
            results[case] = (res.loss, res.metrics, res.grad_norm, res.stats_source)
    finally:
        teardown_parallel()
    return results


def init_worker(rank, world, init_dir):
    """The policy's initial weights in ``init_dir``, the reference's (another seed) in ``init_dir``_ref."""
    for seed, path in ((1234, init_dir), (4321, init_dir + "_ref")):
        setup_parallel(Layout(), seed=seed)
        try:
            torch.manual_seed(seed)
            save_weights(build_model(SPEC, Layout()), path)
        finally:
            teardown_parallel()


def full_weights_worker(rank, world, dirs):
    setup_parallel(Layout())
    out = []
    try:
        for d in dirs:
            model = build_model(SPEC, Layout())
            load_weights(model, d)
            out.append(
                {
                    k: v.detach().clone()
                    for k, v in model.state_dict().items()
                    if v is not None and isinstance(v, torch.Tensor) and v.dtype.is_floating_point
                }
            )
    finally:
        teardown_parallel()
    return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("step")
    init = str(root / "init")
    run_ranks(init_worker, 1, init, timeout=120)
    out = str(root / "tp1")
    res = run_ranks(step_worker, 1, 1, 1, 1, False, init, out, list(OBJECTIVES), timeout=180)[0]
    return root, init, out, res


LAYOUTS = [  # (world, tp, pp, micro-batches per rank, whole groups per micro-batch)
    pytest.param(2, 2, 1, 2, False, id="tp2-mb2-split"),
    pytest.param(2, 1, 2, 4, False, id="pp2-mb4-split"),
    pytest.param(2, 1, 1, 2, False, id="dp2-mb2-split"),
    pytest.param(2, 1, 1, 2, True, id="dp2-mb2-whole"),
    pytest.param(4, 2, 1, 2, False, id="tp2-dp2-mb2-split"),
    pytest.param(4, 1, 2, 2, False, id="pp2-dp2-mb2-split"),
]
# Packed rows under a token budget (members of length <= 16, groups of 4): (world, tp, pp, budget, whole).
PACKED_LAYOUTS = [
    pytest.param(1, 1, 1, 64, True, id="packed-64-whole"),
    pytest.param(2, 2, 1, 24, False, id="tp2-packed-24-split"),
    pytest.param(2, 1, 2, 32, False, id="pp2-packed-32-split"),
    pytest.param(2, 1, 1, 40, False, id="dp2-packed-40-split"),
]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world,tp,pp,n_micro,whole", LAYOUTS)
def test_one_step_matches_single_process(reference_run, world, tp, pp, n_micro, whole):
    root, init, ref_out, ref = reference_run
    out = str(root / f"w{world}tp{tp}pp{pp}m{n_micro}{'w' if whole else 's'}")
    res = run_ranks(step_worker, world, tp, pp, n_micro, whole, init, out, list(OBJECTIVES), timeout=300)
    _check_against_reference(ref, ref_out, init, out, res, whole)


def _check_against_reference(ref, ref_out, init, out, res, whole):
    dirs = [init] + [os.path.join(d, case) for case in OBJECTIVES for d in (ref_out, out)]
    weights = run_ranks(full_weights_worker, 1, dirs, timeout=120)[0]
    w0 = weights[0]
    for i, case in enumerate(OBJECTIVES):
        loss1, metrics1, gnorm1, source1 = ref[case]
        for r in res:  # every rank of every stage reports the same global numbers
            loss, metrics, gnorm, source = r[case]
            assert loss == pytest.approx(loss1, rel=1e-5, abs=1e-6), (case, loss, loss1)
            assert gnorm == pytest.approx(gnorm1, rel=1e-4), (case, gnorm, gnorm1)
            for k, v in metrics1.items():
                if not k.startswith("stats_source"):
                    assert metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True), (case, k)
            if case.startswith("gift"):
                assert source == ("in_place" if whole else "policy_pass"), source
                assert source1 == "in_place"  # one micro-batch holds every group
            else:
                assert source == "data"
        single, layout_w = weights[1 + 2 * i], weights[2 + 2 * i]
        for name, before in w0.items():
            d1, d2 = single[name] - before, layout_w[name] - before
            scale = float(d1.abs().max())
            torch.testing.assert_close(d2, d1, rtol=1e-3, atol=1e-4 * scale + 1e-7, msg=lambda m: f"{case} {name}: {m}")
        assert max(float((single[n] - w0[n]).abs().max()) for n in w0) > 1e-4, case  # the step did move


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world,tp,pp,budget,whole", PACKED_LAYOUTS)
def test_packed_step_matches_padded_single_process(reference_run, world, tp, pp, budget, whole):
    """Packed token-budget micro-batches (THD rows, per-slot attention, RoPE restarting per sequence) give
    the loss, metrics, gradient norm and updated weights of one process with one padded micro-batch."""
    root, init, ref_out, ref = reference_run
    out = str(root / f"packed-w{world}tp{tp}pp{pp}b{budget}")
    res = run_ranks(step_worker, world, tp, pp, None, whole, init, out, list(OBJECTIVES), budget, timeout=300)
    _check_against_reference(ref, ref_out, init, out, res, whole)


def test_policy_statistics_detection():
    """Only GIFT's statistics need the policy's log-probs; the others come from the data."""
    from gift_megatron.objectives import build_objective

    assert build_objective("gift").policy_statistics
    assert not any(build_objective(n).policy_statistics for n in ("gft", "grpo", "dapo", "gspo", "sft", "dft"))


def plain_autograd_worker(rank, world, init_dir, cases):
    """Expected SGD updates from plain torch: full logits, torch.log_softmax, the naive reference losses."""
    from tests import reference as naive

    setup_parallel(Layout())
    out = {}
    try:
        b = global_batch()
        pos = torch.arange(SPEC.seq_length)[None].expand_as(b["tokens"])

        def logprobs(model):
            logits = model(b["tokens"], pos, None)
            return torch.log_softmax(logits.float(), -1).gather(-1, b["labels"][..., None])[..., 0]

        for case in cases:
            ref_model = build_model(SPEC, Layout())
            load_weights(ref_model, init_dir + "_ref")
            with torch.no_grad():
                ref = logprobs(ref_model)  # the frozen reference
            model = build_model(SPEC, Layout())
            load_weights(model, init_dir)
            lp = logprobs(model)
            lp0 = lp.detach()  # the initial policy: the rollout policy
            m, R, gid = b["loss_mask"], b["rewards"], b["group_ids"]
            opts = OBJECTIVES[case]
            if case.startswith("gift"):
                loss = naive.gift(lp * m, ref * m, m, R, gid, **opts)
            elif case == "gft":
                loss = naive.gft(lp * m, m, R, gid, **opts)
            else:
                loss = naive.grpo(lp * m, lp0 * m, m, R, gid, rlp=ref * m, **opts)
            loss.backward()
            out[case] = (float(loss), {n: -LR * p.grad.detach().clone() for n, p in model.named_parameters()})
    finally:
        teardown_parallel()
    return out


@pytest.mark.timeout(300)
def test_single_process_step_equals_plain_autograd(reference_run):
    """The single-process ObjectiveStep (the layouts' reference) against an independent computation."""
    root, init, ref_out, ref = reference_run
    expected = run_ranks(plain_autograd_worker, 1, init, list(OBJECTIVES), timeout=180)[0]
    dirs = [init] + [os.path.join(ref_out, case) for case in OBJECTIVES]
    weights = run_ranks(full_weights_worker, 1, dirs, timeout=120)[0]
    for i, case in enumerate(OBJECTIVES):
        loss, updates = expected[case]
        assert ref[case][0] == pytest.approx(loss, rel=1e-5, abs=1e-6), case
        for name, upd in updates.items():
            got = weights[1 + i][name] - weights[0][name]
            scale = float(upd.abs().max())
            torch.testing.assert_close(
                got, upd, rtol=1e-3, atol=1e-4 * scale + 1e-7, msg=lambda m: f"{case} {name}: {m}"
            )


def test_batching_errors_name_the_problem():
    from gift_megatron.megatron.batching import split_global_batch, validate_micro_batches
    from gift_megatron.objectives import build_objective

    b = global_batch()
    with pytest.raises(ValueError, match="global batch size 16 is not a multiple of micro_batch_size \\(3\\)"):
        split_global_batch(b, micro_batch_size=3, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match="data-parallel size \\(3\\)"):
        split_global_batch(b, micro_batch_size=2, dp_rank=0, dp_size=3)
    mbs = split_global_batch(b, micro_batch_size=4, dp_rank=1, dp_size=2)
    assert len(mbs) == 2 and torch.equal(mbs[0]["tokens"], b["tokens"][8:12])
    gift = build_objective("gift")
    validate_micro_batches(gift, mbs)
    with pytest.raises(ValueError, match="needs 'rewards'"):
        validate_micro_batches(gift, [{k: v for k, v in mbs[0].items() if k != "rewards"}])
    bad = dict(
        mbs[1], tokens=mbs[1]["tokens"][:, :-1], labels=mbs[1]["labels"][:, :-1], loss_mask=mbs[1]["loss_mask"][:, :-1]
    )
    validate_micro_batches(gift, [mbs[0], bad])  # without pipeline parallelism shapes may differ
    with pytest.raises(
        ValueError, match="micro-batch 1: tokens of shape \\[4, 15\\], expected \\[4, 16\\] \\(pipeline"
    ):
        validate_micro_batches(gift, [mbs[0], bad], pp_size=2)
    with pytest.raises(ValueError, match="micro-batch 0: 'labels' has shape"):
        validate_micro_batches(gift, [dict(mbs[0], labels=bad["labels"])])
    with pytest.raises(ValueError, match="not divisible by 2 x context_parallel_size \\(6\\)"):
        validate_micro_batches(gift, mbs, cp_size=3)
    with pytest.raises(ValueError, match="missing 'labels'"):
        validate_micro_batches(gift, [{"tokens": mbs[0]["tokens"]}])


def needs_reference_worker(rank, world):
    from gift_megatron.megatron.step import ObjectiveStep
    from gift_megatron.objectives import build_objective

    setup_parallel(Layout())
    try:
        model = build_model(SPEC, Layout())
        ddp, opt = make_optimizer(model, model.config)
        before = {k: v.clone() for k, v in ddp.module.state_dict().items() if isinstance(v, torch.Tensor)}
        step = ObjectiveStep(build_objective("gift"), [ddp], opt)  # no reference model, no ref_logp
        try:
            step(my_micro_batches(0, 1, 2, False))
        except ValueError as e:
            unchanged = all(torch.equal(before[k], v) for k, v in ddp.module.state_dict().items() if k in before)
            return str(e), unchanged
        return None, None
    finally:
        teardown_parallel()


@pytest.mark.timeout(120)
def test_missing_reference_is_an_error_before_compute():
    msg, unchanged = run_ranks(needs_reference_worker, 1, timeout=100)[0]
    assert msg is not None and "needs ref_logp" in msg
    assert unchanged
