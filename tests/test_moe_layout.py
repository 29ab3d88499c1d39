"""Mixture-of-Experts training is layout-invariant, and the router losses have Megatron's intended scale.

A tiny Qwen3-MoE-like model (2 MoE layers, hidden 32, 4 experts, top-2, SequentialMLP experts on CPU) built
by gift_megatron's own builder. One process with the whole batch in one micro-batch is the reference; each
layout (EP=2; TP=2 x EP=2 with ETP=1; TP=2 with ETP=2; PP=2) loads the same weights from a distributed
checkpoint, splits every group across data-parallel ranks and micro-batches, and runs one SGD step of GIFT,
GFT and GRPO (all three in one spawned job per layout: process start-up dominates). The reference policy's
log-probs come with the batch (GIFT's implicit rewards are then not all zero); GRPO's old-policy pass and
GIFT's statistics pass (groups split across ranks) run the MoE model forward-only. The EP=2 job also trains
on packed rows (THD, members end to end) and gives the data-parallel ranks different numbers of
micro-batches: a clear error before any compute. Loss, gradient norm,
metrics (router load metrics included) and the updated weights must match to fp32 round-off. SGD, not
Adam: Adam's first step is lr * sign(grad) and would hide gradient magnitudes. Router losses are off here:
Megatron computes them per micro-batch, so their values depend on the micro-batch split by design.

The router-loss test compares, in the EP=2 job (2 ranks), the gradient that our step adds through the aux and
z losses (a step with the coefficients minus the same step without) with the gradient Megatron gives them
in its own convention, a loss function returning count = tokens and no scale hook.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.multiproc import run_ranks

N_MEMBERS, GROUP, SEQ = 16, 4, 16
LR = 0.5
OBJECTIVES = {"gift": dict(beta=1.0), "gft": dict(tau=0.5), "grpo": dict(kl_coef=0.1)}


def model_config(**overrides):
    from gift_megatron.megatron.model import ModelConfig

    fields = dict(
        family="qwen3_moe",
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=128,
        seq_length=SEQ,
        qk_layernorm=True,
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=16,
        make_vocab_size_divisible_by=64,
    )  # 128 rows at TP=1 and at TP=2: no padded rows
    fields.update(overrides)
    return ModelConfig(**fields)


def global_batch(seed=3):
    """16 members in 4 groups of 4: a shared prompt per group, ragged response masks."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, 128, (N_MEMBERS // GROUP, SEQ + 1), generator=g)
    tokens = prompts.repeat_interleave(GROUP, 0)
    tokens[:, 4:] = torch.randint(0, 128, (N_MEMBERS, SEQ - 3), generator=g)
    lengths = torch.randint(3, SEQ - 3, (N_MEMBERS,), generator=g)
    pos = torch.arange(SEQ)
    mask = ((pos[None] >= 3) & (pos[None] < 3 + lengths[:, None])).float()
    # A reference policy's log-probs given with the batch (GIFT's implicit rewards and GRPO's KL are then not
    # degenerate at the first step, as they are when the reference is the initial policy).
    ref_logp = -3.0 + 0.5 * torch.randn(N_MEMBERS, SEQ, generator=g)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": mask,
        "rewards": torch.randn(N_MEMBERS, generator=g),
        "group_ids": torch.arange(N_MEMBERS) // GROUP + 100,
        "ref_logp": ref_logp,
    }


def my_micro_batches(dp_rank, dp_size, n_micro):
    """Interleaved: every group spread over data-parallel ranks and micro-batches."""
    batch = global_batch()
    mine = torch.arange(N_MEMBERS)[dp_rank::dp_size]
    return [{k: v[mine[i::n_micro]] for k, v in batch.items()} for i in range(n_micro)]


def setup(parallel):
    from gift_megatron.parallel import initialize_model_parallel_cpu

    initialize_model_parallel_cpu(
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )


def build(cfg, parallel):
    from gift_megatron.megatron.model import PrecisionConfig, build_model

    return build_model(cfg, parallel, PrecisionConfig(dtype="fp32"))


def ddp_and_sgd(model):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(
        config=model.config,
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


def save(model, path):
    from tests.tiny_gpt import save_weights

    save_weights(model, path)


def load(model, path):
    from tests.tiny_gpt import load_weights

    load_weights(model, path)


def packed_micro_batches(dp_rank, dp_size):
    """This rank's members packed end to end into [1, T] rows of at most 2 x SEQ tokens (THD)."""
    from gift_megatron.megatron.batching import pack_global_batch

    return pack_global_batch(
        global_batch(), micro_batch_tokens=2 * SEQ, dp_rank=dp_rank, dp_size=dp_size, keep_groups=False
    )


def train_objectives(cfg, parallel, n_micro, init_dir, out_dir, packed=False):
    """One ObjectiveStep per objective from the init weights; updated weights saved under out_dir/<name>.
    ``packed``: packed rows instead of ``n_micro`` padded micro-batches."""
    from megatron.core import parallel_state as ps

    from gift_megatron.megatron.step import ObjectiveStep
    from gift_megatron.objectives import build_objective

    results = {}
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    for name, options in OBJECTIVES.items():
        model = build(cfg, parallel)
        load(model, init_dir)
        ddp, opt = ddp_and_sgd(model)
        step = ObjectiveStep(build_objective(name, **options), [ddp], opt)
        res = step(packed_micro_batches(dp_rank, dp_size) if packed else my_micro_batches(dp_rank, dp_size, n_micro))
        save(ddp.module, os.path.join(out_dir, name))
        results[name] = (res.loss, res.metrics, res.grad_norm)
    return results


def full_weights(cfg, dirs):
    """Every parameter of each checkpoint in dirs, loaded into a TP=PP=EP=1 model (collective)."""
    from gift_megatron.megatron.model import ParallelConfig

    out = []
    for d in dirs:
        model = build(cfg, ParallelConfig())
        load(model, d)
        out.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return out


def reference_worker(rank, world, root):
    """One process, whole batch in one micro-batch: writes the init checkpoint, returns results and weights."""
    from gift_megatron.megatron.model import ParallelConfig
    from gift_megatron.parallel import destroy_model_parallel_cpu

    cfg, parallel = model_config(), ParallelConfig()
    setup(parallel)
    try:
        torch.manual_seed(0)
        save(build(cfg, parallel), os.path.join(root, "init"))
        results = train_objectives(cfg, parallel, 1, os.path.join(root, "init"), os.path.join(root, "ref"))
        weights = full_weights(cfg, [os.path.join(root, "init")] + [os.path.join(root, "ref", n) for n in OBJECTIVES])
    finally:
        destroy_model_parallel_cpu()
    return results, weights


def uneven_micro_batches_error(cfg, parallel, init_dir):
    """Data-parallel rank 0 with 2 micro-batches, rank 1 with 1, at EP=2: (error message, weights unchanged)."""
    from megatron.core import parallel_state as ps

    from gift_megatron.megatron.step import ObjectiveStep
    from gift_megatron.objectives import build_objective

    model = build(cfg, parallel)
    load(model, init_dir)
    ddp, opt = ddp_and_sgd(model)
    before = [p.detach().clone() for p in ddp.module.parameters()]
    mbs = my_micro_batches(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), 2)
    if ps.get_data_parallel_rank() == 1:
        mbs = mbs[:1]
    try:
        ObjectiveStep(build_objective("gft"), [ddp], opt)(mbs)
        message = None
    except RuntimeError as exc:
        message = str(exc)
    return message, all(torch.equal(a, b) for a, b in zip(before, ddp.module.parameters()))


def layout_worker(rank, world, root, parallel_fields, n_micro, tag):
    from gift_megatron.megatron.model import ParallelConfig
    from gift_megatron.parallel import destroy_model_parallel_cpu

    cfg, parallel = model_config(), ParallelConfig(**parallel_fields)
    parallel.validate(world, cfg)
    setup(parallel)
    try:
        results = train_objectives(cfg, parallel, n_micro, os.path.join(root, "init"), os.path.join(root, tag))
        if parallel.expert_model_parallel_size > 1 and parallel.tensor_model_parallel_size == 1:
            # More checks in this job (process start-up is most of a test's time on 2 cores): packed rows,
            # unequal micro-batch counts, the router-loss scale.
            results["packed"] = train_objectives(
                cfg, parallel, None, os.path.join(root, "init"), os.path.join(root, tag + "_packed"), packed=True
            )
            results["uneven"] = uneven_micro_batches_error(cfg, parallel, os.path.join(root, "init"))
            from gift_megatron.megatron.moe import has_moe_grad_scale_func

            if has_moe_grad_scale_func():
                results["router_loss"] = router_loss_grads(os.path.join(root, "init"))
    finally:
        destroy_model_parallel_cpu()
    setup(ParallelConfig())  # every rank a whole model (data parallel) to read the sharded results back
    try:
        weights = full_weights(cfg, [os.path.join(root, tag, n) for n in OBJECTIVES])
        if "packed" in results:
            results["packed_weights"] = full_weights(cfg, [os.path.join(root, tag + "_packed", n) for n in OBJECTIVES])
    finally:
        destroy_model_parallel_cpu()
    return results, (weights if rank == 0 else None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("moe"))
    results, weights = run_ranks(reference_worker, 1, root, timeout=240)[0]
    return root, results, weights


LAYOUTS = [  # (world, parallel fields, micro-batches per data-parallel rank)
    pytest.param(2, dict(expert_model_parallel_size=2), 2, id="ep2"),
    pytest.param(
        4,
        dict(
            tensor_model_parallel_size=2,
            sequence_parallel=True,
            expert_model_parallel_size=2,
            expert_tensor_parallel_size=1,
        ),
        2,
        id="tp2-ep2-etp1",
    ),
    pytest.param(
        2, dict(tensor_model_parallel_size=2, sequence_parallel=True, expert_tensor_parallel_size=2), 2, id="tp2-etp2"
    ),
    pytest.param(2, dict(pipeline_model_parallel_size=2), 4, id="pp2"),
]


_RUNS: dict[str, list] = {}


def run_layout(root, world, fields, n_micro):
    """Per-rank results of ``layout_worker`` for this layout (run once per test session)."""
    tag = "w" + "_".join(f"{k}{v}" for k, v in sorted(fields.items()))
    if tag not in _RUNS:
        _RUNS[tag] = run_ranks(layout_worker, world, root, fields, n_micro, tag, timeout=360)
    return _RUNS[tag]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world,fields,n_micro", LAYOUTS)
def test_one_moe_step_matches_single_process(reference, world, fields, n_micro):
    root, ref, ref_weights = reference
    per_rank = run_layout(root, world, fields, n_micro)
    weights = per_rank[0][1]
    if "uneven" in per_rank[0][0]:  # EP=2 with 2 micro-batches on one rank and 1 on the other: error, no step
        for results, _ in per_rank:
            message, unchanged = results["uneven"]
            assert message is not None and "expert_model_parallel_size=2" in message, message
            assert "rank 0: 2, rank 1: 1" in message and unchanged, message
    assert_same_step(ref, ref_weights, [results for results, _ in per_rank], weights)
    if "packed" in per_rank[0][0]:
        # Packed rows at EP=2: the same step, except the router metrics, which count every token the routers
        # see: padded rows route their padding too, packed rows do not.
        assert_same_step(
            ref,
            ref_weights,
            [results["packed"] for results, _ in per_rank],
            per_rank[0][0]["packed_weights"],
            router_metrics=False,
        )


def assert_same_step(ref, ref_weights, rank_results, weights, router_metrics=True):
    """Every rank's (loss, metrics, grad norm) per objective and the updated weights equal the reference's."""
    w0 = ref_weights[0]
    for i, name in enumerate(OBJECTIVES):
        loss1, metrics1, gnorm1 = ref[name]
        assert metrics1["moe/load_balance_layer0"] >= 1.0 and "moe/load_balance_layer1" in metrics1
        assert "moe/aux_loss" not in metrics1  # coefficient 0: Megatron tracks nothing
        compared = {
            k for k in metrics1 if not k.startswith("stats_source") and (router_metrics or not k.startswith("moe/"))
        }
        for results in rank_results:  # every rank of every stage reports the same global numbers
            loss, metrics, gnorm = results[name]
            assert loss == pytest.approx(loss1, rel=1e-5, abs=1e-6), (name, loss, loss1)
            assert gnorm == pytest.approx(gnorm1, rel=1e-4), (name, gnorm, gnorm1)
            assert {k for k in metrics if k in compared or not k.startswith(("stats_source", "moe/"))} == compared, name
            for k in compared:
                assert metrics[k] == pytest.approx(metrics1[k], rel=1e-4, abs=1e-6, nan_ok=True), (name, k)
        single = ref_weights[1 + i]
        assert set(weights[i]) == set(w0)
        moved = 0.0
        for key, before in w0.items():
            d1, d2 = single[key] - before, weights[i][key] - before
            scale = float(d1.abs().max())
            moved = max(moved, scale if "experts" in key or "router" in key else 0.0)
            torch.testing.assert_close(d2, d1, rtol=1e-3, atol=1e-4 * scale + 1e-7, msg=lambda m: f"{name} {key}: {m}")
        assert moved > 1e-6, name  # the experts and routers did train (GFT moves them least: ~5e-6)


# ------------------------------------------------------------------------------- router-loss scale
AUX, Z = 0.1, 0.01


def _flat_grads(ddp):
    return {n: p.main_grad.detach().clone() for n, p in ddp.module.named_parameters()}


def router_loss_grads(init_dir):
    """Inside the EP=2 job: (grads of our GRPO step with router losses, the same without, Megatron's own
    count=tokens run with only the router losses), each {name: main_grad} of this rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from gift_megatron.megatron.forward import model_logprobs
    from gift_megatron.megatron.model import ParallelConfig
    from gift_megatron.megatron.step import ObjectiveStep
    from gift_megatron.objectives import build_objective

    parallel = ParallelConfig(expert_model_parallel_size=2)
    out = {}
    mbs = my_micro_batches(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), 2)
    for tag, coeffs in (("ours_on", dict(moe_aux_loss_coeff=AUX, moe_z_loss_coeff=Z)), ("ours_off", {})):
        model = build(model_config(**coeffs), parallel)
        load(model, init_dir)
        ddp, opt = ddp_and_sgd(model)
        result = ObjectiveStep(build_objective("grpo"), [ddp], opt)(mbs)
        out[tag] = _flat_grads(ddp)
        out[tag + "_metrics"] = result.metrics
    # Megatron's convention: loss_func returns count = the micro-batch's tokens, no moe_grad_scale_func. The
    # main loss is 0 * log-probs: only the router losses contribute a gradient.
    model = build(model_config(moe_aux_loss_coeff=AUX, moe_z_loss_coeff=Z), parallel)
    load(model, init_dir)
    ddp, _ = ddp_and_sgd(model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    ddp.zero_grad_buffer()

    def forward_step(it, m):
        lp = model_logprobs(m, next(it))
        return lp, lambda x: ((x * 0.0).sum(), torch.tensor(x.numel(), dtype=torch.int), {})

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(mbs),
        model=[ddp],
        num_microbatches=len(mbs),
        seq_length=SEQ,
        micro_batch_size=mbs[0]["tokens"].shape[0],
        forward_only=False,
    )
    out["megatron"] = _flat_grads(ddp)
    return out


@pytest.mark.timeout(300)
def test_router_loss_gradient_has_megatrons_intended_scale(reference):
    from gift_megatron.megatron.moe import has_moe_grad_scale_func

    if not has_moe_grad_scale_func():
        pytest.skip(
            "megatron-core 0.16 has no moe_grad_scale_func: non-zero router-loss coefficients are refused "
            "there (tests/test_moe_config.py::test_router_losses_are_refused_without_the_scale_hook)"
        )
    root, _, _ = reference
    per_rank = [results["router_loss"] for results, _ in run_layout(root, *LAYOUTS[0].values)]
    for r in per_rank:
        router_keys = [k for k in r["megatron"] if "router" in k]
        assert router_keys
        for key, expected in r["megatron"].items():
            got = r["ours_on"][key] - r["ours_off"][key]  # what the router losses added to our gradient
            scale = float(expected.abs().max())
            if "router" in key:
                assert scale > 0, key  # the router losses do reach the router
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * scale + 1e-9, msg=lambda m: f"{key}: {m}")
        metrics = r["ours_on_metrics"]
        # Switch loss >= 1 (equality: perfectly balanced); z-loss = mean logsumexp^2 >= 0.
        assert metrics["moe/aux_loss"] >= 1.0 - 1e-6 and metrics["moe/z_loss"] > 0
        assert "moe/aux_loss" not in r["ours_off_metrics"]
