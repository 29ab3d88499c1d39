"""Tokens/s of a tiny Mixture-of-Experts ObjectiveStep on CPU: one rank, 2 ranks data-parallel, 2 ranks with
expert parallelism (EP=2); then the router metrics of a short training run.

The model is a Qwen3-MoE-shaped GPTModel built by gift_megatron's builder (local spec: SequentialMLP
experts, alltoall dispatcher, the CPU runtime). Each layout trains the same global batch (the members split
over data-parallel ranks) with GRPO and Adam; a step is timed from the call to ObjectiveStep to its return
(forward, backward, the token all-to-all, gradient all-reduce, optimizer step, metrics), median over the
timed steps after warm-up. tokens/s counts every token of the step's rows (what the routers see).

The short run trains the EP=2 layout for --run-steps GRPO steps on a fixed batch with the router losses on
(aux 1e-2, z 1e-3) and prints, per step, the loss and the router metrics the step reports (moe/aux_loss,
moe/z_loss, moe/load_balance_max/mean and per layer).

    python benchmarks/moe_step.py [--layers 2 --hidden 128 --experts 8 --topk 2 --seq 128 --members 32
                                   --mbs 4 --steps 6 --run-steps 10 --threads 1]

CPU numbers on a shared machine say how the layouts compare on this machine, not what a GPU does: on CPU
the expert GEMMs are tiny and gloo's all-to-all goes through the host.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def model_config(args, **moe_losses):
    from gift_megatron.megatron.model import ModelConfig

    return ModelConfig(
        family="qwen3_moe",
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=4 * args.hidden,
        num_attention_heads=args.hidden // 32,
        num_query_groups=max(1, args.hidden // 64),
        vocab_size=1024,
        make_vocab_size_divisible_by=64,
        seq_length=args.seq,
        max_position_embeddings=args.seq,
        qk_layernorm=True,
        num_experts=args.experts,
        moe_router_topk=args.topk,
        moe_ffn_hidden_size=args.hidden,
        **moe_losses,
    )


def global_batch(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, s = args.members, args.seq
    tokens = torch.randint(0, 1024, (n, s + 1), generator=g)
    mask = torch.ones(n, s)
    mask[:, : s // 4] = 0
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": mask,
        "rewards": torch.randn(n, generator=g),
        "group_ids": torch.arange(n) // 8,
        "ref_logp": -7.0 + 0.1 * torch.randn(n, s, generator=g),
    }


def rank_main(rank, world, args, ep, steps, moe_losses):
    """This rank's (step seconds list, metrics per step)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from gift_megatron.megatron.model import ParallelConfig, PrecisionConfig, build_model
    from gift_megatron.megatron.step import ObjectiveStep
    from gift_megatron.objectives import build_objective
    from gift_megatron.parallel import destroy_model_parallel_cpu, initialize_model_parallel_cpu

    torch.set_num_threads(args.threads)
    initialize_model_parallel_cpu(expert_model_parallel_size=ep, seed=1234)
    try:
        cfg = model_config(args, **moe_losses)
        model = build_model(cfg, ParallelConfig(expert_model_parallel_size=ep), PrecisionConfig(dtype="fp32"))
        ddp = DistributedDataParallel(
            config=model.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
            module=model,
        )
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=1.0), [ddp])
        step = ObjectiveStep(build_objective("grpo", kl_coef=0.01), [ddp], opt)
        batch = global_batch(args)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per_rank = args.members // dp
        mine = {k: v[dp_rank * per_rank : (dp_rank + 1) * per_rank] for k, v in batch.items()}
        mbs = [{k: v[i : i + args.mbs] for k, v in mine.items()} for i in range(0, per_rank, args.mbs)]
        times, metrics = [], []
        for _ in range(steps):
            t = time.perf_counter()
            result = step(mbs)
            times.append(time.perf_counter() - t)
            metrics.append(dict(result.metrics, loss=result.loss))
        return times, metrics
    finally:
        destroy_model_parallel_cpu()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (
        ("layers", 2),
        ("hidden", 128),
        ("experts", 8),
        ("topk", 2),
        ("seq", 128),
        ("members", 32),
        ("mbs", 4),
        ("steps", 6),
        ("run-steps", 10),
        ("threads", 1),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args(argv)
    os.environ.setdefault("GIFT_MEGATRON_DEVICE", "cpu")
    from tests.multiproc import run_ranks

    tokens = args.members * args.seq
    rows = []
    for label, world, ep in (("1 rank, EP=1", 1, 1), ("2 ranks DP=2, EP=1", 2, 1), ("2 ranks DP=2, EP=2", 2, 2)):
        times = run_ranks(rank_main, world, args, ep, args.steps, {}, timeout=900)[0][0]
        median = statistics.median(times[1:])  # the first step warms up
        rows.append((label, median, tokens / median))
    print(
        f"MoE step on CPU: {args.layers} layers, hidden {args.hidden}, {args.experts} experts top-{args.topk}, "
        f"{args.members} x {args.seq} tokens a step, micro-batches of {args.mbs}, {args.threads} thread(s) a rank"
    )
    print(f"{'layout':<22} {'s/step':>8} {'tokens/s':>10}")
    for label, median, tps in rows:
        print(f"{label:<22} {median:8.3f} {tps:10.0f}")

    metrics = run_ranks(
        rank_main, 2, args, 2, args.run_steps, dict(moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3), timeout=900
    )[0][1]
    print(f"\nshort run: EP=2, GRPO + Adam, {args.run_steps} steps on one batch, router losses on (aux 1e-2, z 1e-3)")
    layers = [k for k in metrics[0] if k.startswith("moe/load_balance_layer")]
    print(
        f"{'step':>4} {'loss':>10} {'aux_loss':>9} {'z_loss':>8} {'lb_max':>7} {'lb_mean':>7} "
        + " ".join(f"{k.split('/')[-1]:>18}" for k in layers)
    )
    for i, m in enumerate(metrics):
        print(
            f"{i:4d} {m['loss']:10.4f} {m['moe/aux_loss']:9.4f} {m['moe/z_loss']:8.3f} "
            f"{m['moe/load_balance_max']:7.3f} {m['moe/load_balance_mean']:7.3f} "
            + " ".join(f"{m[k]:18.3f}" for k in layers)
        )


if __name__ == "__main__":
    main()
