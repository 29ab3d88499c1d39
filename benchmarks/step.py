"""Time per optimizer step: plain Megatron-Core SFT vs our SFT, GFT and GIFT steps, side by side.

Same model, same batch, same optimizer (Adam), one process on CPU. Plain Megatron-Core SFT is GPTModel
given labels (its own vocab-parallel cross-entropy) with a per-token loss_func; ours are ObjectiveStep with
the registered objective. Every variant does one forward and one backward per micro-batch; GIFT's frozen
reference pass (forward only) is timed on its own line and not included in GIFT's step. Variants run
round-robin so that load from elsewhere hits them alike; the table reports medians and ratios to plain.

    python benchmarks/step.py [--layers 4 --hidden 256 --vocab 8192 --seq 256 --mbs 4 --micro 2 --repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def build(args):
    from gift_megatron.parallel import initialize_model_parallel_cpu
    from tests.tiny_gpt import Layout, TinyGPT, build_model

    spec = TinyGPT(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
                   num_query_groups=max(1, args.hidden // 128), ffn_hidden_size=4 * args.hidden,
                   vocab_size=args.vocab, seq_length=args.seq)
    initialize_model_parallel_cpu()
    return spec, partial(build_model, spec, Layout())


def make_batch(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = args.mbs * args.micro
    tokens = torch.randint(0, args.vocab, (n, args.seq + 1), generator=g)
    mask = torch.ones(n, args.seq)
    mask[:, : args.seq // 4] = 0  # a prompt part that does not count
    batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": mask,
             "rewards": torch.randn(n, generator=g), "group_ids": torch.arange(n) // args.mbs}
    return [{k: v[i * args.mbs:(i + 1) * args.mbs] for k, v in batch.items()} for i in range(args.micro)]


def ddp_and_adam(model):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False), module=model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, clip_grad=1.0,
                                                 params_dtype=torch.float32), [ddp])
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return ddp, opt


def plain_megatron_sft_step(ddp, opt, mbs, seq):
    """What a Megatron-LM pretrain_gpt-style script does: labels into the model, per-token loss_func."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(mask, out):
        s = (out.float() * mask).sum()
        return s, mask.sum().to(torch.int), {"lm loss": s.detach()}

    def forward_step(it, model):
        mb = next(it)
        pos = torch.arange(seq).unsqueeze(0).expand_as(mb["tokens"])
        return model(mb["tokens"], pos, None, labels=mb["labels"]), partial(loss_func, mb["loss_mask"])

    ddp.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(mbs), model=[ddp],
                                num_microbatches=len(mbs), seq_length=seq, micro_batch_size=mbs[0]["tokens"].shape[0],
                                forward_only=False)
    opt.step()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)

    from gift_megatron.megatron.reference import FrozenReference
    from gift_megatron.megatron.step import ObjectiveStep, forward_logprobs
    from gift_megatron.objectives import build_objective

    spec, build_model = build(args)
    init = build_model().state_dict()
    variants = {}
    for name in ("plain", "sft", "gft", "gift"):
        model = build_model()
        model.load_state_dict(init)
        ddp, opt = ddp_and_adam(model)
        if name == "plain":
            variants[name] = partial(plain_megatron_sft_step, ddp, opt, seq=args.seq)
        else:
            step = ObjectiveStep(build_objective(name), [ddp], opt)
            variants[name] = step
    reference = FrozenReference([build_model()], lambda i: build_model())
    ref_pass = lambda mbs: forward_logprobs(reference, mbs)

    mbs = make_batch(args)
    ref_logps = ref_pass(mbs)
    gift_mbs = [dict(mb, ref_logp=lp) for mb, lp in zip(mbs, ref_logps)]
    inputs = {"plain": mbs, "sft": mbs, "gft": mbs, "gift": gift_mbs}
    times = {k: [] for k in list(variants) + ["gift_reference_pass"]}
    for name, fn in variants.items():  # warm-up
        fn(inputs[name])
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn(inputs[name])
            times[name].append(time.perf_counter() - t)
        t = time.perf_counter()
        ref_pass(mbs)
        times["gift_reference_pass"].append(time.perf_counter() - t)

    tokens = args.mbs * args.micro * args.seq
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; batch {args.micro} x "
          f"{args.mbs} x {args.seq} tokens; {args.threads} threads; median of {args.repeats}")
    print(f"{'variant':<22}{'s/step':>10}{'tokens/s':>12}{'vs plain':>10}")
    base = statistics.median(times["plain"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<22}{med:>10.3f}{tokens / med:>12.0f}{med / base:>10.3f}")
    worst = max(statistics.median(times[n]) / base for n in ("sft", "gft", "gift"))
    print(f"goal: our steps within 1.05x of plain Megatron-Core: {'HOLDS' if worst <= 1.05 else 'MISSES'} "
          f"(worst {worst:.3f}x)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
