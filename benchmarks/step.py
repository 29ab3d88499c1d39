"""Time (and, on a GPU, peak memory) per optimizer step: plain Megatron-Core SFT vs our SFT, GFT and GIFT steps.

Same model, same batch, same optimizer (Adam), one process: on CPU (gloo and gift_megatron's CPU runtime)
or on one CUDA GPU (a 1-rank NCCL world). The model is tests/tiny_gpt.py's Llama-like GPTModel (RoPE,
RMSNorm, SwiGLU, GQA) with Megatron's local layer spec, which needs neither Transformer Engine nor Apex, so
the comparison runs on any GPU; on CUDA its weights are created on the GPU. Plain Megatron-Core SFT is
GPTModel given labels (its own vocab-parallel cross-entropy) with a per-token loss_func; ours are
ObjectiveStep with the registered objective. Every variant does one forward and one backward per
micro-batch; GIFT's frozen reference pass (forward only) is timed on its own line and not included in
GIFT's step. Variants run round-robin so that load from elsewhere hits them alike; the table reports
medians and ratios to plain.

On CUDA every step is bracketed by torch.cuda.synchronize(), so a time is the step's GPU work finished;
peak memory is torch.cuda.max_memory_allocated during the step minus what was allocated before it
(activations, logits and their gradients, temporaries; not the weights, gradient buffers or Adam state,
which every variant holds alike). A variant that raises is reported with its error and left out of the
timing; the others still run, and the exit code is then 1.

Goals, one line each: every one of our steps within 1.05x of plain Megatron-Core's time; on CUDA also
every one of our steps' peak memory at most plain's.

    python benchmarks/step.py [--device auto|cpu|cuda] [--layers L --hidden H --vocab V --seq S --mbs B
                              --micro M --repeats R --dtype fp32|bf16] [--json results.json]

Defaults: CPU 4 layers, hidden 256, vocab 8192, seq 256, mbs 4, micro 2, fp32; CUDA 8 layers, hidden 1024,
vocab 152064 (Qwen2.5's), seq 2048, mbs 2, micro 2 (8192 tokens a step), bf16 weights with fp32 main
weights in the optimizer. The GPU shape is shallow for its vocabulary on purpose: the log-prob and loss
part, where ours differs from plain, weighs more than in a 7B model, so a regression there shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

DEFAULTS = {
    "cpu": dict(layers=4, hidden=256, vocab=8192, seq=256, mbs=4, micro=2, dtype="fp32"),
    "cuda": dict(layers=8, hidden=1024, vocab=152064, seq=2048, mbs=2, micro=2, dtype="bf16"),
}
OURS = ("sft", "gft", "gift")
TIME_GOAL = 1.05


def build(args, device: torch.device):
    """(spec, zero-argument model builder) with Megatron's parallel state set up for TP=PP=1 on ``device``."""
    from tests.tiny_gpt import Layout, TinyGPT, build_model, transformer_config

    spec = TinyGPT(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.hidden // 64,
        num_query_groups=max(1, args.hidden // 128),
        ffn_hidden_size=4 * args.hidden,
        vocab_size=args.vocab,
        seq_length=args.seq,
        bf16=args.dtype == "bf16",
    )
    if device.type != "cuda":
        from gift_megatron.parallel import initialize_model_parallel_cpu

        initialize_model_parallel_cpu()
        return spec, partial(build_model, spec, Layout())

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    # tests/tiny_gpt.py's config initializes on the CPU (use_cpu_initialization); on a GPU the weights are
    # created there (several seconds less per model at this size), then every variant loads the same ones.
    config = dataclasses.replace(transformer_config(spec, Layout()), use_cpu_initialization=False)

    def make():
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=spec.vocab_size,
            max_sequence_length=spec.seq_length,
            pre_process=True,
            post_process=True,
            position_embedding_type="rope",
        )
        return model.to(device)

    return spec, make


def make_batch(args, device: torch.device, seed=0):
    """The step's micro-batches, drawn on the CPU (the same numbers on every device) and moved once."""
    g = torch.Generator().manual_seed(seed)
    n = args.mbs * args.micro
    tokens = torch.randint(0, args.vocab, (n, args.seq + 1), generator=g)
    mask = torch.ones(n, args.seq)
    mask[:, : args.seq // 4] = 0  # a prompt part that does not count
    batch = {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": mask,
        "rewards": torch.randn(n, generator=g),
        "group_ids": torch.arange(n) // args.mbs,
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    return [{k: v[i * args.mbs : (i + 1) * args.mbs] for k, v in batch.items()} for i in range(args.micro)]


def ddp_and_adam(model, spec):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        module=model,
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-5, clip_grad=1.0, bf16=spec.bf16, params_dtype=spec.params_dtype), [ddp]
    )
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
        pos = torch.arange(seq, device=mb["tokens"].device).unsqueeze(0).expand_as(mb["tokens"])
        return model(mb["tokens"], pos, None, labels=mb["labels"]), partial(loss_func, mb["loss_mask"])

    ddp.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(mbs),
        model=[ddp],
        num_microbatches=len(mbs),
        seq_length=seq,
        micro_batch_size=mbs[0]["tokens"].shape[0],
        forward_only=False,
    )
    opt.step()


class Meter:
    """Runs a step and returns (seconds, peak bytes above the start or None); syncs the GPU around it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn, *args):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t = time.perf_counter()
        fn(*args)
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        return seconds, (torch.cuda.max_memory_allocated() - before) if self.cuda else None


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    for name in ("layers", "hidden", "vocab", "seq", "mbs", "micro"):
        p.add_argument(f"--{name}", type=int, help="see the defaults above")
    p.add_argument("--dtype", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)), help="CPU threads")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    for k, v in DEFAULTS[args.device].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    # gift_megatron decides CPU or CUDA in one place (GIFT_MEGATRON_DEVICE, where the package has it): it must
    # agree with this run's device, also for a CPU run on a GPU host. Set before any gift_megatron import.
    os.environ["GIFT_MEGATRON_DEVICE"] = device.type
    torch.set_num_threads(args.threads)
    with socket.socket() as s:  # a free port: another process on this machine may hold a fixed one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=device)
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        summary = run(args, device)
    finally:
        dist.destroy_process_group()
    print(report(summary))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    if summary["errors"]:
        sys.exit(1)


def run(args, device: torch.device) -> dict:
    from gift_megatron.megatron.forward import forward_logprobs
    from gift_megatron.megatron.reference import FrozenReference
    from gift_megatron.megatron.step import ObjectiveStep
    from gift_megatron.objectives import build_objective

    spec, build_model = build(args, device)
    init = build_model().state_dict()
    variants, errors = {}, {}
    for name in ("plain", *OURS):
        try:
            model = build_model()
            model.load_state_dict(init)
            ddp, opt = ddp_and_adam(model, spec)
            if name == "plain":
                variants[name] = partial(plain_megatron_sft_step, ddp, opt, seq=args.seq)
            else:
                variants[name] = ObjectiveStep(build_objective(name), [ddp], opt)
        except Exception as exc:
            errors[name] = _error(exc)
    del init
    meter = Meter(device)
    mbs = make_batch(args, device)
    inputs = {"plain": mbs, "sft": mbs, "gft": mbs, "gift": mbs}
    ref_pass = None
    try:
        reference = FrozenReference([build_model()], lambda i: build_model())
        ref_pass = lambda batch: forward_logprobs(reference, batch)
        inputs["gift"] = [dict(mb, ref_logp=lp) for mb, lp in zip(mbs, ref_pass(mbs))]
    except Exception as exc:
        errors["gift_reference_pass"] = _error(exc)
        if "gift" in variants:
            errors["gift"] = "no reference log-probs (the reference pass failed)"
            del variants["gift"]
    if ref_pass is not None:
        variants["gift_reference_pass"] = ref_pass
        inputs["gift_reference_pass"] = mbs
    for name in list(variants):  # warm-up; a variant that fails here is reported and dropped
        try:
            meter(variants[name], inputs[name])
        except Exception as exc:
            errors[name] = _error(exc)
            del variants[name]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    times = {k: [] for k in variants}
    peaks = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            seconds, peak = meter(fn, inputs[name])
            times[name].append(seconds)
            peaks[name].append(peak)

    tokens = args.mbs * args.micro * args.seq
    rows = []
    base = statistics.median(times["plain"]) if "plain" in times else None
    base_peak = max(peaks["plain"]) if "plain" in peaks and device.type == "cuda" else None
    for name in ("plain", *OURS, "gift_reference_pass"):
        if name in times:
            med = statistics.median(times[name])
            peak = max(peaks[name]) if device.type == "cuda" else None
            rows.append(
                {
                    "variant": name,
                    "s_per_step": med,
                    "tokens_per_s": tokens / med,
                    "time_vs_plain": med / base if base else None,
                    "peak_bytes": peak,
                    "peak_vs_plain": peak / base_peak if base_peak else None,
                    "times": times[name],
                }
            )
        elif name in errors:
            rows.append({"variant": name, "error": errors[name]})
    goals = []
    for name in OURS:
        row = next(r for r in rows if r["variant"] == name) if any(r["variant"] == name for r in rows) else None
        ok_row = row is not None and "error" not in row and base is not None
        goals.append(
            {
                "goal": f"{name} step time <= {TIME_GOAL}x plain Megatron-Core",
                "holds": ok_row and row["time_vs_plain"] <= TIME_GOAL,
                "value": row["time_vs_plain"] if ok_row else None,
                "why_not": None if ok_row else (errors.get(name) or errors.get("plain") or "not run"),
            }
        )
        if device.type == "cuda":
            goals.append(
                {
                    "goal": f"{name} step peak memory <= plain Megatron-Core's",
                    "holds": ok_row and base_peak is not None and row["peak_bytes"] <= base_peak,
                    "value": row["peak_vs_plain"] if ok_row else None,
                    "why_not": None if ok_row else (errors.get(name) or errors.get("plain") or "not run"),
                }
            )
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "shape": {
            k: getattr(args, k) for k in ("layers", "hidden", "vocab", "seq", "mbs", "micro", "dtype", "repeats")
        },
        "threads": args.threads,
        "tokens_per_step": tokens,
        "rows": rows,
        "goals": goals,
        "errors": errors,
    }


def report(summary: dict) -> str:
    sh = summary["shape"]
    cuda = summary["device"].startswith("cuda")
    threads = "" if cuda else f", {summary['threads']} threads"
    lines = [
        f"model: {sh['layers']} layers, hidden {sh['hidden']}, vocab {sh['vocab']}, {sh['dtype']}; batch "
        f"{sh['micro']} x {sh['mbs']} x {sh['seq']} tokens; on {summary['device_name']}{threads}; "
        f"median of {sh['repeats']}",
        f"{'variant':<22}{'s/step':>10}{'tokens/s':>12}{'vs plain':>10}"
        + (f"{'peak MiB':>11}{'mem vs plain':>14}" if cuda else ""),
    ]
    for r in summary["rows"]:
        if "error" in r:
            lines.append(f"{r['variant']:<22}FAILED: {r['error']}")
            continue
        ratio = f"{r['time_vs_plain']:>10.3f}" if r["time_vs_plain"] is not None else f"{'-':>10}"
        line = f"{r['variant']:<22}{r['s_per_step']:>10.3f}{r['tokens_per_s']:>12.0f}{ratio}"
        if cuda:
            mem = f"{r['peak_vs_plain']:>14.3f}" if r["peak_vs_plain"] is not None else f"{'-':>14}"
            line += f"{r['peak_bytes'] / 2**20:>11.0f}{mem}"
        lines.append(line)
    for g in summary["goals"]:
        if g["value"] is None:
            lines.append(f"goal: {g['goal']}: NOT MEASURED ({g['why_not']})")
        else:
            lines.append(f"goal: {g['goal']}: {'HOLDS' if g['holds'] else 'MISSES'} ({g['value']:.3f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
