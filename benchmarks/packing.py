"""Packed token-budget micro-batches against padded rows: computed tokens, step time and peak memory.

A seeded synthetic RL workload (issue 13): prompts uniform in 100-600 tokens, responses lognormal with a
median of 600 tokens (sigma 0.8 by default), capped at 4096, groups of 16. Two parts, one run:

1. **Plan** (no model; a realistic step of ``--plan-prompts`` prompts over ``--plan-dp`` ranks): computed /
   real tokens for (a) rows padded to ``seq_length``, (b) rows padded to the longest row of each
   micro-batch, (c) rows packed under a token budget; and how often GIFT needs its fallback statistics pass
   (a group split over micro-batches) at a 16k and a 32k budget.
2. **Step** (a small Llama-shaped model; ``--groups`` groups): one GIFT optimizer step per case, each case in
   its own process, so that its peak memory is its own: step time (median of ``--repeats``), peak memory
   above the start of the step (CPU: the process's peak RSS; CUDA: torch.cuda.max_memory_allocated), and
   computed / real tokens.

Goals, one line each: computed/real <= 1.05 for (c), and the step time of (c) <= 0.5x that of (a).

    python benchmarks/packing.py [--device auto|cpu|cuda] [--groups G --budget T --mbs B --repeats R]
                                 [--layers L --hidden H --vocab V] [--json out.json]

On CUDA the model uses Transformer Engine's layer spec (THD attention) when TE is installed, the local spec
with per-sequence attention otherwise; the output says which.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

GROUP = 16
PROMPT = (100, 600)
RESPONSE_MEDIAN, RESPONSE_CAP = 600, 4096
COMPUTED_GOAL, TIME_GOAL = 1.05, 0.5


def workload(groups: int, seed: int, sigma: float, scale: float = 1.0) -> list[tuple[int, int, int]]:
    """(group, prompt tokens, response tokens) of every member: the seeded synthetic RL workload, lengths
    times ``scale`` (1: the real distribution; smaller for quick dry runs)."""
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        p = max(2, int(rng.randint(*PROMPT) * scale))
        for _ in range(GROUP):
            r = min(RESPONSE_CAP, max(1, round(rng.lognormvariate(math.log(RESPONSE_MEDIAN), sigma))))
            out.append((g, p, max(1, int(r * scale))))
    return out


def seq_length(scale: float) -> int:
    """Rows of case (a): the longest prompt plus the longest response."""
    return int(PROMPT[1] * scale) + max(1, int(RESPONSE_CAP * scale))


def _lengths(members):
    return [p + r - 1 for _, p, r in members]


def plan_part(args) -> dict:
    """Computed/real tokens of the three layouts and GIFT's fallback frequency, on the planner alone."""
    from gift_megatron.parallel.packing import plan_bins, plan_row_tokens

    rows = {"a": [], "b": [], "c": [], "c_pp": []}
    fallback = {16384: 0, 32768: 0}
    whole_groups = {16384: 0, 32768: 0}
    total_groups = 0
    for step in range(args.plan_steps):
        members = workload(args.plan_prompts, 1000 + step, args.sigma)
        lengths = _lengths(members)
        gids = [g for g, _, _ in members]
        real = sum(lengths)
        rows["a"].append(len(lengths) * seq_length(1.0) / real)
        # (b): each rank's members in order, micro-batches of --plan-mbs rows padded to their longest row
        per_rank = len(lengths) // args.plan_dp
        computed = 0
        for r in range(args.plan_dp):
            mine = lengths[r * per_rank : (r + 1) * per_rank]
            for i in range(0, len(mine), args.plan_mbs):
                chunk = mine[i : i + args.plan_mbs]
                computed += len(chunk) * max(chunk)
        rows["b"].append(computed / real)
        plan = plan_bins(lengths, gids, budget=args.plan_budget, dp_size=args.plan_dp)
        rows["c"].append(sum(sum(lengths[i] for i in b) for bins in plan for b in bins) / real)
        # pipeline parallelism: every row padded to the step's largest bin
        rows["c_pp"].append(sum(len(bins) for bins in plan) * plan_row_tokens(plan, lengths) / real)
        for budget in fallback:
            plan = plan_bins(lengths, gids, budget=budget, dp_size=args.plan_dp)
            places: dict[int, set] = {}
            for r, bins in enumerate(plan):
                for j, b in enumerate(bins):
                    for i in b:
                        places.setdefault(gids[i], set()).add((r, j))
            whole = sum(len(p) == 1 for p in places.values())
            whole_groups[budget] += whole
            fallback[budget] += whole < len(places)
        total_groups += args.plan_prompts
    return {
        "computed_over_real": {k: (min(v), max(v)) for k, v in rows.items()},
        "fallback_step_frac": {k: v / args.plan_steps for k, v in fallback.items()},
        "whole_group_frac": {k: v / total_groups for k, v in whole_groups.items()},
        "group_tokens_mean": statistics.mean(
            sum(_lengths([m for m in workload(args.plan_prompts, 1000 + s, args.sigma) if m[0] == g]))
            for s in range(min(args.plan_steps, 5))
            for g in range(args.plan_prompts)
        ),
    }


# -------------------------------------------------------------------------------------------- step part
def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _micro_batches(case: str, args, device_rows):
    from gift_megatron.parallel.packing import pack_rows, plan_bins, sequence_lengths, trim_rows

    rows = device_rows
    n = rows["tokens"].shape[0]
    if case == "a":
        return [{k: v[i : i + args.mbs] for k, v in rows.items()} for i in range(0, n, args.mbs)]
    if case == "b":
        out = []
        for i in range(0, n, args.mbs):
            out.append(trim_rows({k: v[i : i + args.mbs] for k, v in rows.items()}))
        return out
    lengths = sequence_lengths(rows["loss_mask"])
    plan = plan_bins(lengths, rows["group_ids"].tolist(), budget=max(args.budget, max(lengths)))
    return pack_rows(rows, plan[0], lengths=lengths)


def step_case(rank, world, case: str, args_dict: dict) -> dict:
    """One case in its own process: build, one warm-up step, --repeats timed steps."""
    args = argparse.Namespace(**args_dict)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from gift_megatron.device import use_cuda
    from gift_megatron.megatron.model import ModelConfig, ParallelConfig, PrecisionConfig, build_model, select_backend
    from gift_megatron.megatron.step import ObjectiveStep
    from gift_megatron.objectives import build_objective

    cuda = use_cuda()
    if cuda:
        from megatron.core import parallel_state, tensor_parallel

        parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    else:
        from gift_megatron.parallel import initialize_model_parallel_cpu

        initialize_model_parallel_cpu(seed=0)
    heads = max(1, args.hidden // 64)
    S = seq_length(args.scale)
    cfg = ModelConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=4 * args.hidden,
        num_attention_heads=heads,
        num_query_groups=max(1, heads // 2),
        vocab_size=args.vocab,
        seq_length=S,
        max_position_embeddings=S,
    )
    precision = PrecisionConfig(dtype="bf16" if cuda else "fp32")
    model = build_model(cfg, ParallelConfig(), precision)
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        module=model,
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-6, clip_grad=1.0, bf16=cuda, params_dtype=precision.torch_dtype), [ddp]
    )
    step = ObjectiveStep(build_objective("gift", beta=1.0, reference="rollout"), [ddp], opt)

    members = workload(args.groups, args.seed, args.sigma, args.scale)
    g = torch.Generator().manual_seed(args.seed)
    n = len(members)
    tokens = torch.randint(0, args.vocab, (n, S + 1), generator=g)
    mask = torch.zeros(n, S)
    for i, (_, p, r) in enumerate(members):
        mask[i, p - 1 : p - 1 + r] = 1.0
    rows = {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": mask,
        "old_logp": -torch.rand(n, S, generator=g) * mask,
        "rewards": torch.randn(n, generator=g),
        "group_ids": torch.tensor([m[0] for m in members]),
    }
    mbs = _micro_batches(case, args, rows)
    prepared = step.prepare(mbs)
    real = sum(_lengths(members))
    computed = sum(int(mb["tokens"].numel()) for mb in mbs)
    device = step.device
    times, peaks, source = [], [], None
    for i in range(args.repeats + 1):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _rss_bytes()
        t = time.perf_counter()
        res = step(prepared, prepared=True)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()) - before
        source = res.stats_source
        if i:  # the first step warms up allocators and caches
            times.append(seconds)
            peaks.append(peak)
    backend = select_backend(ParallelConfig(), precision)
    return {
        "case": case,
        "seconds": statistics.median(times),
        "peak_bytes": max(peaks),
        "real": real,
        "computed": computed,
        "micro_batches": len(mbs),
        "stats_source": source,
        "device": str(device),
        "backend": backend,
    }


def report(plan: dict, steps: dict, args) -> str:
    names = {
        "a": "(a) rows padded to seq_length",
        "b": f"(b) rows padded per micro-batch ({args.plan_mbs} rows)",
        "c": f"(c) packed, {args.plan_budget}-token budget",
        "c_pp": "(c) packed, every row padded to the largest (pipeline parallelism)",
    }
    lines = [
        f"Plan: {args.plan_steps} seeded steps of {args.plan_prompts} prompts x {GROUP} over {args.plan_dp} DP "
        f"ranks (sigma {args.sigma}); mean group {plan['group_tokens_mean']:.0f} tokens",
        "| layout | computed / real tokens (min-max over steps) |",
        "|---|---|",
    ]
    for k, (lo, hi) in plan["computed_over_real"].items():
        lines.append(f"| {names[k]} | {lo:.2f}-{hi:.2f} |")
    for budget in (16384, 32768):
        lines.append(
            f"GIFT at a {budget // 1024}k budget: groups whole in one micro-batch "
            f"{100 * plan['whole_group_frac'][budget]:.1f}%, steps needing the fallback statistics pass "
            f"{100 * plan['fallback_step_frac'][budget]:.0f}%"
        )
    if steps:
        first = next(iter(steps.values()))
        names["b"] = f"(b) rows padded per micro-batch ({args.mbs} rows)"
        names["c"] = f"(c) packed, {args.budget}-token budget"
        lines += [
            "",
            f"Step: GIFT, {args.groups} groups of {GROUP} (lengths x {args.scale}), {args.layers} layers x {args.hidden}, "
            f"{first['device']} ({first['backend']} spec), micro_batch_size {args.mbs} for (a)/(b)",
            "| layout | step s | x (a) | peak MiB | computed / real | micro-batches | stats |",
            "|---|---|---|---|---|---|---|",
        ]
        base = steps["a"]["seconds"] if "a" in steps else None
        for k, r in steps.items():
            ratio = f"{r['seconds'] / base:.2f}" if base else "-"
            lines.append(
                f"| {names[k]} | {r['seconds']:.2f} | {ratio} | {r['peak_bytes'] / 2**20:.0f} | "
                f"{r['computed'] / r['real']:.3f} | {r['micro_batches']} | {r['stats_source']} |"
            )
    c_ratio = max(plan["computed_over_real"]["c"])
    if steps and "c" in steps:
        c_ratio = max(c_ratio, steps["c"]["computed"] / steps["c"]["real"])
    lines.append(
        f"goal computed/real of (c) <= {COMPUTED_GOAL}: {c_ratio:.3f} -> "
        f"{'HOLDS' if c_ratio <= COMPUTED_GOAL else 'FAILS'}"
    )
    if steps and "a" in steps and "c" in steps:
        t = steps["c"]["seconds"] / steps["a"]["seconds"]
        lines.append(f"goal step time (c) <= {TIME_GOAL}x (a): {t:.2f}x -> {'HOLDS' if t <= TIME_GOAL else 'FAILS'}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--groups", type=int, default=2, help="groups of 16 in the timed step")
    p.add_argument("--budget", type=int, default=16384, help="token budget of (c)")
    p.add_argument("--mbs", type=int, default=2, help="rows per micro-batch of (a) and (b)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of response lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="timed step only: lengths x this (dry runs)")
    p.add_argument("--plan-steps", type=int, default=20)
    p.add_argument("--plan-budget", type=int, default=16384, help="token budget of (c) in the plan part")
    p.add_argument("--plan-prompts", type=int, default=64)
    p.add_argument("--plan-dp", type=int, default=8)
    p.add_argument("--plan-mbs", type=int, default=4)
    p.add_argument("--cases", default="abc", help="which step cases to run (plan part always runs)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ["GIFT_MEGATRON_DEVICE"] = args.device
    plan = plan_part(args)
    steps = {}
    if args.cases:
        from tests.multiproc import run_ranks

        backend = "nccl" if args.device == "cuda" else "gloo"
        for case in args.cases:
            steps[case] = run_ranks(
                step_case, 1, case, vars(args), timeout=3000, backend=backend, env={"GIFT_MEGATRON_DEVICE": args.device}
            )[0]
    text = report(plan, steps, args)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"plan": plan, "steps": steps, "args": vars(args)}, fh, indent=1)


if __name__ == "__main__":
    main()
