"""Objective math against the naive references in tests/reference.py, finite differences and theory."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gift_megatron import objectives as O
from tests import reference as ref


def make_batch(seed=0, sizes=(4, 3, 1, 5, 2), S=7, degenerate_group=3):
    """A batch with groups of several sizes (one singleton), one all-equal-reward group and ragged masks."""
    g = torch.Generator().manual_seed(seed)
    gid = torch.cat([torch.full((n,), 10 * k + 3) for k, n in enumerate(sizes)])  # sparse, non-contiguous ids
    B = gid.numel()
    lp = -torch.rand(B, S, generator=g) * 2.0 - 0.01
    rlp = lp + 0.3 * torch.randn(B, S, generator=g)
    olp = lp + 0.2 * torch.randn(B, S, generator=g)
    m = (torch.rand(B, S, generator=g) > 0.3).float()
    m[:, 0] = 1.0
    R = torch.randn(B, generator=g)
    if degenerate_group is not None:
        R[gid == 10 * degenerate_group + 3] = 0.5
    # garbage on non-counted positions must never leak into results
    lp = torch.where(m > 0, lp, torch.full_like(lp, float("nan")))
    return dict(lp=lp, rlp=rlp, olp=olp, m=m, R=R, gid=gid)


def _grad(fn, lp):
    lp = lp.clone().requires_grad_(True)
    loss = fn(lp)
    loss.backward()
    return loss.detach(), torch.nan_to_num(lp.grad, nan=0.0)


def _clean(lp, m):
    return torch.where(m > 0, lp, torch.zeros_like(lp))


GIFT_OPTIONS = [
    dict(),
    dict(beta=0.5),
    dict(detach_stats=False),
    dict(detach_stats=False, implicit_reward="mean", beta=2.0),
    dict(implicit_reward="mean"),
    dict(std_floor=0.5),
    dict(std_floor=0.5, detach_stats=False),
    dict(unbiased=False),
    dict(unbiased=False, detach_stats=False),
]


@pytest.mark.parametrize("opts", GIFT_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_gift_matches_reference(opts):
    b = make_batch()
    ours = _grad(lambda lp: O.gift_loss(lp, b["rlp"], b["m"], b["R"], b["gid"], **opts)[0], b["lp"])
    theirs = _grad(lambda lp: ref.gift(_clean(lp, b["m"]), b["rlp"], b["m"], b["R"], b["gid"], **opts), b["lp"])
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    # atol: in a 2-member group the full-gradient z-score is constant, so its gradient is a cancellation
    # of O(1/N) terms down to ~0; fp32 round-off of that cancellation is a few 1e-6.
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_gft_matches_reference(tau):
    b = make_batch(1)
    ours = _grad(lambda lp: O.gft_loss(lp, b["m"], b["R"], b["gid"], tau=tau)[0], b["lp"])
    theirs = _grad(lambda lp: ref.gft(_clean(lp, b["m"]), b["m"], b["R"], b["gid"], tau=tau), b["lp"])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "name,opts",
    [
        ("grpo", dict()),
        ("grpo", dict(kl_coef=0.1)),
        ("grpo", dict(aggregation="token_mean", eps_high=0.3)),
        ("dapo", dict()),
        ("gspo", dict()),
        ("gspo", dict(eps_low=0.2, eps_high=0.2)),
    ],
)
def test_policy_gradient_baselines_match_reference(name, opts):
    b = make_batch(2)
    if name == "gspo":
        fn = lambda lp: O.gspo_loss(lp, b["olp"], b["m"], b["R"], b["gid"], **opts)[0]
        rf = lambda lp: ref.gspo(_clean(lp, b["m"]), b["olp"], b["m"], b["R"], b["gid"], **opts)
    else:
        kw = dict(opts)
        if name == "dapo":
            kw = dict(eps_high=0.28, aggregation="token_mean")
        loss_fn = O.dapo_loss if name == "dapo" else O.grpo_loss
        fn = lambda lp: loss_fn(lp, b["olp"], b["m"], b["R"], b["gid"], ref_logp=b["rlp"], **opts)[0]
        rf = lambda lp: ref.grpo(_clean(lp, b["m"]), b["olp"], b["m"], b["R"], b["gid"], rlp=b["rlp"], **kw)
    ours, theirs = _grad(fn, b["lp"]), _grad(rf, b["lp"])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["sft", "dft"])
def test_supervised_match_reference(name):
    b = make_batch(3)
    fn = getattr(O, f"{name}_loss")
    ours = _grad(lambda lp: fn(lp, b["m"])[0], b["lp"])
    theirs = _grad(lambda lp: getattr(ref, name)(_clean(lp, b["m"]), b["m"]), b["lp"])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- finite differences
def _finite_difference_check(fn, x, n_entries=12, h=1e-2, seed=0):
    """Central differences in float64 of a float32 function, on random entries; returns (fd, analytic)."""
    x = x.clone()
    xg = x.clone().requires_grad_(True)
    fn(xg).backward()
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(x.numel(), generator=g)[:n_entries]
    fd, an = [], []
    for k in flat.tolist():
        xp, xm = x.clone().view(-1), x.clone().view(-1)
        xp[k] += h
        xm[k] -= h
        fd.append((fn(xp.view_as(x)).double() - fn(xm.view_as(x)).double()) / (2 * h))
        an.append(xg.grad.view(-1)[k].double())
    return torch.stack(fd), torch.stack(an)


@pytest.mark.parametrize(
    "fn",
    [
        lambda b, lp: O.gift_loss(lp, b["rlp"], b["m"], b["R"], b["gid"], detach_stats=False)[0],
        lambda b, lp: O.gift_loss(lp, b["rlp"], b["m"], b["R"], b["gid"], detach_stats=False, implicit_reward="mean")[
            0
        ],
        lambda b, lp: O.grpo_loss(
            lp, b["olp"], b["m"], b["R"], b["gid"], ref_logp=b["rlp"], kl_coef=0.3, eps_low=10.0 - 9.5, eps_high=50.0
        )[0],
        lambda b, lp: O.gspo_loss(lp, b["olp"], b["m"], b["R"], b["gid"], eps_low=0.9, eps_high=50.0)[0],
        lambda b, lp: O.sft_loss(lp, b["m"])[0],
    ],
    ids=["gift_full_grad_sum", "gift_full_grad_mean", "grpo_kl", "gspo", "sft"],
)
def test_gradients_match_finite_differences(fn):
    """Where the loss has no stop-gradient in it, autograd must equal the derivative of the loss value."""
    b = make_batch(4, degenerate_group=None)
    lp = torch.where(b["m"] > 0, b["lp"], torch.zeros_like(b["lp"]))
    # only counted entries: the others are not inputs of the loss
    counted = (b["m"] > 0).view(-1).nonzero().flatten()
    fd, an = _finite_difference_check(lambda x: fn(b, x), lp, n_entries=40, h=3e-3)
    sel = [i for i in range(len(fd))]
    scale = an.abs().max()
    assert scale > 1e-3
    assert torch.allclose(fd[sel], an[sel], atol=3e-3 * float(scale) + 2e-5, rtol=2e-2), (fd, an)
    assert counted.numel() > 0


def test_gift_detached_gradient_differs_from_full_gradient():
    """detach_stats must matter: the two options give different gradients (else one of them is not wired)."""
    b = make_batch(5, degenerate_group=None)
    lp = _clean(b["lp"], b["m"])
    g1 = _grad(lambda x: O.gift_loss(x, b["rlp"], b["m"], b["R"], b["gid"], detach_stats=True)[0], lp)[1]
    g2 = _grad(lambda x: O.gift_loss(x, b["rlp"], b["m"], b["R"], b["gid"], detach_stats=False)[0], lp)[1]
    assert (g1 - g2).abs().max() > 1e-3


# ---------------------------------------------------------------- group z-score
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_zscore_matches_reference_and_conventions(unbiased):
    b = make_batch(6)
    z = O.group_zscore(b["R"], b["gid"], unbiased=unbiased)
    torch.testing.assert_close(z, ref.zscore(b["R"], b["gid"], unbiased=unbiased), rtol=1e-5, atol=1e-6)
    single = b["gid"] == 23  # the singleton group
    degenerate = b["gid"] == 33
    assert torch.all(z[single] == 0) and torch.all(z[degenerate] == 0)


def test_group_zscore_is_differentiable_like_reference():
    b = make_batch(7, degenerate_group=None)
    x = b["R"].clone()
    w = torch.randn_like(x)
    g1 = _grad(lambda v: (O.group_zscore(v, b["gid"]) * w).sum(), x)[1]
    g2 = _grad(lambda v: (ref.zscore(v, b["gid"]) * w).sum(), x)[1]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


# Values on a quarter grid and power-of-two scales keep x * scale + shift exact in fp32, so the affine
# invariance is tested on the math, not on fp32's absorption of small spreads into a large shift.
group_values = st.lists(
    st.tuples(st.integers(-3, 3), st.integers(-400, 400).map(lambda k: k / 4)), min_size=1, max_size=30
)


@settings(max_examples=60, deadline=None)
@given(group_values, st.sampled_from([0.25, 0.5, 2.0, 8.0]), st.integers(-1000, 1000), st.integers(0, 2**31 - 1))
def test_zscore_invariances(pairs, scale, shift, seed):
    gid = torch.tensor([p[0] for p in pairs])
    x = torch.tensor([p[1] for p in pairs], dtype=torch.float64).float()
    z = O.group_zscore(x, gid, eps=1e-6)
    # within each group: zero mean; unit (unbiased) std where the group has spread
    for g in gid.unique():
        zg, xg = z[gid == g], x[gid == g]
        assert abs(float(zg.sum())) <= 1e-3 * max(1, zg.numel())
        if xg.numel() > 1 and float(xg.std()) > 1e-2:
            assert abs(float(zg.std()) - 1.0) < 1e-3
    # permutation equivariance
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(O.group_zscore(x[perm], gid[perm]), z[perm], rtol=1e-5, atol=1e-5)
    # relabelling the groups changes nothing
    torch.testing.assert_close(O.group_zscore(x, gid * 7 + 1000), z, rtol=0, atol=0)
    # positive affine maps change nothing (up to eps relative to the spread)
    z2 = O.group_zscore(x * scale + shift, gid, eps=1e-6 * scale)
    torch.testing.assert_close(z2, z, rtol=1e-3, atol=2e-3)


# ---------------------------------------------------------------- GFT's DCR weights
def test_dcr_weights_are_inverse_p_above_tau_and_one_at_or_below():
    tau = 0.3
    p = torch.tensor([[0.01, 0.1, 0.299, 0.3, 0.301, 0.5, 0.9, 0.99]], dtype=torch.float64).float()
    p = torch.cat([p, p])
    p.requires_grad_(True)
    m = torch.ones_like(p)
    R, gid = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    loss, _ = O.gft_loss(torch.log(p), m, R, gid, tau=tau)
    loss.backward()
    A = O.group_zscore(R, gid)
    weight = p.grad / (-A[:, None] / m.sum())  # d loss / d p = -A c(p)/p / N_tokens
    p_used = torch.exp(torch.log(p.detach()))  # the p the objective sees
    expect = torch.where(p_used <= tau, torch.ones_like(p_used), 1.0 / p_used)
    torch.testing.assert_close(weight, expect, rtol=1e-6, atol=1e-6)
    assert bool((p_used[0] <= tau).any()) and bool((p_used[0] > tau).any())


# ---------------------------------------------------------------- GIFT theorem on a tabular bandit
@pytest.mark.parametrize("beta,detach", [(1.0, True), (1.0, False), (0.5, False)])
def test_gift_drives_bandit_policy_to_tilted_reference(beta, detach):
    """docs/objectives.md, GIFT "What the optimum looks like": at the optimum log pi/pi_ref = c R + d with c > 0.

    One prompt, K responses each a single token; the group is the K responses enumerated once each (the
    exact expectation over a uniform proposal), so no sampling noise enters.
    Zero loss needs beta = 1 (std z = std A = 1). For beta != 1 the minimizer of L is still z = A, which the
    full gradient (detach_stats=False) finds; the detached gradient pushes z towards A / beta, which no
    normalized z reaches, so with detach_stats=True and beta != 1 the implicit rewards grow without bound.
    """
    K = 8
    g = torch.Generator().manual_seed(11)
    ref_logits = torch.randn(K, generator=g)
    R = torch.randn(K, generator=g)
    theta = (ref_logits + 0.01 * torch.randn(K, generator=g)).requires_grad_(True)
    ref_lp = torch.log_softmax(ref_logits, 0)[:, None]
    opt = torch.optim.Adam([theta], lr=0.05)
    gid, mask = torch.zeros(K, dtype=torch.long), torch.ones(K, 1)
    first = None
    for _ in range(1500):
        lp = torch.log_softmax(theta, 0)[:, None]
        loss, metrics = O.gift_loss(lp, ref_lp, mask, R, gid, beta=beta, detach_stats=detach)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    log_ratio = (torch.log_softmax(theta.detach(), 0) - ref_lp[:, 0]).double()
    X = torch.stack([R.double(), torch.ones(K, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(X, log_ratio[:, None]).solution[:, 0]
    resid = log_ratio - X @ coef
    assert coef[0] > 0, coef
    assert float(resid.abs().max()) < 1e-3 * float(log_ratio.abs().max()), resid
    # the implied KL coefficient: c = 1 / beta(x) with beta(x) = std(R) / std(u)  (for beta = 1 the fit
    # is z = A exactly; for other beta the optimum is still z proportional to A)
    u = log_ratio
    assert math.isclose(float(coef[0]), float(u.std() / R.double().std()), rel_tol=1e-3)
    assert float(metrics["gift/corr_advantage_z"]) > 0.9999


# ---------------------------------------------------------------- bad input
def _bad(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_bad_inputs_raise_naming_the_argument():
    b = make_batch(8)
    lp, rlp, m, R, gid = _clean(b["lp"], b["m"]), b["rlp"], b["m"], b["R"], b["gid"]
    _bad(lambda: O.gift_loss(lp[:, :-1], rlp, m, R, gid), "mask")
    _bad(lambda: O.gift_loss(lp, rlp[:, :-1], m, R, gid), "ref_logp")
    _bad(lambda: O.gift_loss(lp, rlp, m, R[:-1], gid), "rewards")
    R_nan = R.clone()
    R_nan[2] = float("nan")
    _bad(lambda: O.gift_loss(lp, rlp, m, R_nan, gid), "rewards are not finite for members \\[2\\]")
    R_inf = R.clone()
    R_inf[0] = float("inf")
    _bad(lambda: O.gft_loss(lp, m, R_inf, gid), "rewards")
    lp_nan = lp.clone()
    lp_nan[1, 0] = float("nan")
    _bad(lambda: O.gft_loss(lp_nan, m, R, gid), "logp")
    rlp_inf = rlp.clone()
    rlp_inf[0, 0] = -float("inf")
    _bad(lambda: O.gift_loss(lp, rlp_inf, m, R, gid), "ref_logp")
    m0 = m.clone()
    m0[4] = 0
    _bad(lambda: O.gift_loss(lp, rlp, m0, R, gid), "mask: members \\[4\\] have no counted tokens")
    _bad(lambda: O.sft_loss(lp, m0), "mask")
    _bad(lambda: O.gift_loss(lp, rlp, m, R, gid.float()), "group_ids must hold integers")
    _bad(lambda: O.group_zscore(R, gid.float()), "group_ids must hold integers")
    _bad(lambda: O.gft_loss(lp, m, R, gid[:-1]), "group_ids")
    _bad(lambda: O.gft_loss(lp, m * 2, R, gid), "mask must hold only 0 and 1")
    for tau in (0.0, -0.1, 1.5, float("nan")):
        _bad(lambda: O.gft_loss(lp, m, R, gid, tau=tau), "tau")
    _bad(lambda: O.build_objective("gfit"), "unknown name 'gfit'.*gft.*gift")
    _bad(lambda: O.build_objective("gift", bta=1.0), "unknown option 'bta'")
    _bad(lambda: O.build_objective("gift", implicit_reward="max"), "implicit_reward")
    _bad(lambda: O.build_objective("grpo", aggregation="sum"), "aggregation")
    _bad(lambda: O.grpo_loss(lp, None, m, R, gid), "old_logp is required")
    _bad(lambda: O.grpo_loss(lp, b["olp"], m, R, gid, kl_coef=0.1), "ref_logp is required")


def test_registry_names_and_required_inputs():
    assert set(O.OBJECTIVES) >= {"gift", "gft", "grpo", "dapo", "gspo", "sft", "dft"}
    assert O.build_objective("gift").uses >= {"ref_logp", "rewards", "group_ids"}
    assert "old_logp" in O.build_objective("gift", reference="rollout").uses
    assert O.build_objective("dapo").eps_high == 0.28 and O.build_objective("dapo").aggregation == "token_mean"
    assert O.build_objective("gft").tau == 0.1


def test_gift_metrics_against_direct_computation():
    b = make_batch(9)
    lp = _clean(b["lp"], b["m"])
    _, metrics = O.gift_loss(lp, b["rlp"], b["m"], b["R"], b["gid"])
    u = ((lp - b["rlp"]) * b["m"]).sum(1)
    A = ref.zscore(b["R"], b["gid"])
    z = ref.zscore(u, b["gid"])
    torch.testing.assert_close(metrics["gift/implicit_reward_mean"], u.mean())
    torch.testing.assert_close(
        metrics["gift/corr_advantage_z"], torch.corrcoef(torch.stack([A, z]))[0, 1], rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(metrics["gift/abs_residual_mean"], (A - z).abs().mean(), rtol=1e-5, atol=1e-6)
    ratios = []
    for g in b["gid"].unique():
        sel = b["gid"] == g
        if sel.sum() > 1 and b["R"][sel].std() > 0 and u[sel].std() > 0:
            ratios.append(b["R"][sel].std() / u[sel].std())
    torch.testing.assert_close(metrics["gift/beta_x_mean"], torch.stack(ratios).mean(), rtol=1e-5, atol=1e-6)
    # 5 groups: one singleton, one with all rewards equal
    torch.testing.assert_close(metrics["groups/degenerate_frac"], torch.tensor(2 / 5))


# ---------------------------------------------------------------- all-equal groups give exactly 0
# Non-dyadic constants: their fp32 sums round, so a plain sum/n mean lands an ulp off and the z-score of a
# group that carries no signal came out 0.03 (7 x 0.37) to 0.9 (7 x 1000.1) before the shifted statistics.
EQUAL_VALUES = (0.37, 0.1, 1000.1, 1e-3, 3.3, 123.456)
EQUAL_SIZES = (7, 5, 8, 3, 16, 6)
GROUP_OBJECTIVES = [
    ("gift", dict()),
    ("gift", dict(reference="rollout", detach_stats=False)),
    ("gift", dict(implicit_reward="mean")),
    ("gft", dict()),
    ("grpo", dict()),
    ("dapo", dict()),
    ("gspo", dict()),
]


def equal_reward_batch(S=6, seed=11):
    """Groups whose rewards are all one non-dyadic constant, and whose rows are identical within a group
    (so GIFT's implicit rewards are all equal too), with per-group non-dyadic log-prob offsets."""
    g = torch.Generator().manual_seed(seed)
    gid = torch.cat([torch.full((n,), 5 * k + 1) for k, n in enumerate(EQUAL_SIZES)])
    R = torch.cat([torch.full((n,), v) for v, n in zip(EQUAL_VALUES, EQUAL_SIZES)])
    row_lp = -torch.rand(len(EQUAL_SIZES), S, generator=g) * 3.0 - 0.1
    lp = row_lp[torch.repeat_interleave(torch.arange(len(EQUAL_SIZES)), torch.tensor(EQUAL_SIZES))]
    offsets = torch.tensor(EQUAL_VALUES)[
        torch.repeat_interleave(torch.arange(len(EQUAL_SIZES)), torch.tensor(EQUAL_SIZES))
    ]
    m = torch.ones_like(lp)
    return dict(lp=lp, rlp=lp - 0.1 * offsets[:, None] / 1000.1, olp=lp + 0.37, m=m, R=R, gid=gid)


def _equal_group_check(obj, batches, layout):
    """(max |A| over members, max |grad| of the loss) for ``batches`` (micro-batches of this rank)."""
    lps = [b.logp.clone().requires_grad_(True) for b in batches]
    parts = [
        O.TokenBatch(lp, b.mask, b.rewards, b.group_ids, ref_logp=b.ref_logp, old_logp=b.old_logp)
        for lp, b in zip(lps, batches)
    ]
    stats = obj.statistics(O.Members.cat([obj.members(p, layout) for p in parts]), layout)
    adv = max(float(stats.rewards.zscore(p.rewards, p.group_ids, obj.eps).abs().max()) for p in parts)
    if stats.extra is not None:
        for p in parts:
            u = obj.implicit_rewards(p, layout)
            adv = max(adv, float(stats.extra.implicit.zscore(u.detach(), p.group_ids, obj.eps).abs().max()))
    sum(obj.loss(p, stats, layout).loss for p in parts).backward()
    return adv, max(float(lp.grad.abs().max()) for lp in lps), float(stats.metrics["advantage/abs_mean"])


def _token_batch(b, rows=None):
    rows = torch.arange(b["lp"].shape[0]) if rows is None else rows
    return O.TokenBatch(
        b["lp"][rows], b["m"][rows], b["R"][rows], b["gid"][rows], ref_logp=b["rlp"][rows], old_logp=b["olp"][rows]
    )


@pytest.mark.parametrize("name,opts", GROUP_OBJECTIVES, ids=lambda x: x if isinstance(x, str) else str(x))
def test_all_equal_group_gives_exactly_zero_advantage(name, opts):
    obj = O.build_objective(name, **opts)
    b = equal_reward_batch()
    adv, grad, abs_mean = _equal_group_check(obj, [_token_batch(b)], O.SINGLE_PROCESS)
    assert adv == 0.0 and grad == 0.0 and abs_mean == 0.0, (adv, grad, abs_mean)
    # and through the functional group_zscore (with and without a gradient path)
    assert float(O.group_zscore(b["R"], b["gid"]).abs().max()) == 0.0


def equal_groups_dp_worker(rank, world):
    import torch.distributed as dist

    b = equal_reward_batch()
    B = b["lp"].shape[0]
    mine = torch.arange(rank, B, world)  # every group split over both ranks and two micro-batches
    layout = O.BatchLayout(dp_group=dist.group.WORLD)
    out = {}
    for name, opts in GROUP_OBJECTIVES:
        obj = O.build_objective(name, **opts)
        out[f"{name}{opts}"] = _equal_group_check(
            obj, [_token_batch(b, mine[0::2]), _token_batch(b, mine[1::2])], layout
        )
    stats = O.group_statistics(b["R"][mine], b["gid"][mine], dp_group=dist.group.WORLD)
    out["group_statistics_std"] = (float(stats.std.abs().max()), 0.0, 0.0)
    return out


@pytest.mark.timeout(120)
def test_all_equal_group_gives_exactly_zero_advantage_across_dp_ranks():
    from tests.multiproc import run_ranks

    for res in run_ranks(equal_groups_dp_worker, 2, timeout=100):
        for key, values in res.items():
            assert values == (0.0, 0.0, 0.0), (key, values)


# ---------------------------------------------------------------- PPO dual-clip (GRPO / DAPO)
def _dual_clip_reference(lp, olp, m, R, gid, eps_low, eps_high, c, token_mean):
    """Closed form, case by case: A >= 0: -A min(r, 1+eps_high); A < 0: |A| min(max(r, 1-eps_low), c)."""
    A = ref.zscore(R, gid).detach()[:, None]
    r = (lp - olp).exp()
    pos = -A * torch.minimum(r, torch.full_like(r, 1 + eps_high))
    neg = A.abs() * torch.minimum(torch.maximum(r, torch.full_like(r, 1 - eps_low)), torch.full_like(r, c))
    l = torch.where(A >= 0, pos, neg)
    frac = (((A < 0) & (r > c)).float() * m).sum() / m.sum()
    loss = (l * m).sum() / m.sum() if token_mean else ((l * m).sum(1) / m.sum(1)).mean()
    return loss, frac


@pytest.mark.parametrize("name", ["grpo", "dapo"])
def test_dual_clip_matches_closed_form(name):
    b = make_batch(12)
    g = torch.Generator().manual_seed(5)
    lp = _clean(b["lp"], b["m"])
    olp = lp - (torch.rand(lp.shape, generator=g) * 3.2 - 1.6)  # ratios from 0.2 to 5: beyond c = 3 often
    c = 3.0
    fn = O.dapo_loss if name == "dapo" else O.grpo_loss
    eps_high = 0.28 if name == "dapo" else 0.2
    ours = _grad(lambda x: fn(x, olp, b["m"], b["R"], b["gid"], clip_ratio_c=c)[0], lp)
    theirs = _grad(
        lambda x: _dual_clip_reference(x, olp, b["m"], b["R"], b["gid"], 0.2, eps_high, c, name == "dapo")[0], lp
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    frac = fn(lp, olp, b["m"], b["R"], b["gid"], clip_ratio_c=c)[1]["clip_frac_dual"]
    expected = _dual_clip_reference(lp, olp, b["m"], b["R"], b["gid"], 0.2, eps_high, c, name == "dapo")[1]
    assert float(expected) > 0.05  # the cap binds on a fair share of tokens: the comparison means something
    torch.testing.assert_close(frac, expected)
    # off by default: the plain clipped objective, and no dual metric
    plain = fn(lp, olp, b["m"], b["R"], b["gid"])
    assert "clip_frac_dual" not in plain[1]
    assert float((plain[0] - ours[0]).abs()) > 1e-3


def test_dual_clip_option_is_validated():
    for bad in (1.0, 0.5, -3.0, float("nan")):
        _bad(lambda: O.build_objective("grpo", clip_ratio_c=bad), "clip_ratio_c")
    assert O.build_objective("dapo", clip_ratio_c=3).clip_ratio_c == 3
