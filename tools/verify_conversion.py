"""Check a conversion: run the same tokens through the Hugging Face model (transformers) and the Megatron
checkpoint (at --tp tensor-parallel ranks on CPU, gloo), print the max absolute logit difference, and exit
non-zero above --tolerance.

    python tools/verify_conversion.py --hf /models/Qwen2.5-7B-Instruct --megatron /ckpt/qwen2.5-7b-megatron --tp 2
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def megatron_logits(rank: int, world: int, store: str, ckpt: str, model_cfg, dtype, tokens, out: str) -> None:
    """One TP rank: load the checkpoint at TP=world and write the full-vocabulary logits (rank 0)."""
    import torch.distributed as dist

    from gift_megatron.checkpoint.convert import resolve_checkpoint
    from gift_megatron.megatron.checkpoint import load_checkpoint
    from gift_megatron.megatron.model import ParallelConfig, PrecisionConfig, build_model
    from gift_megatron.parallel import destroy_model_parallel_cpu, initialize_model_parallel_cpu

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    initialize_model_parallel_cpu(world, 1)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    model = build_model(model_cfg, ParallelConfig(tensor_model_parallel_size=world), PrecisionConfig(dtype=name))
    load_checkpoint(resolve_checkpoint(ckpt), [model], restore_rng=False)
    model.eval()
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
        local = model(tokens, positions, None).float()  # [b, s, V_padded / tp]
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
    if rank == 0:
        torch.save(torch.cat(parts, -1)[..., :model_cfg.vocab_size], out)
    destroy_model_parallel_cpu()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True)
    p.add_argument("--megatron", required=True, help="converted checkpoint root or step_* dir")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to load the checkpoint with")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |logit difference| allowed (default: 1e-3 for fp32 weights, 0.5 for bf16/fp16)")
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import transformers

    from gift_megatron.checkpoint.convert import ConversionError, HFCheckpoint

    try:
        hf = HFCheckpoint(a.hf)
        from gift_megatron.megatron.model import ParallelConfig

        ParallelConfig(tensor_model_parallel_size=a.tp).validate(a.tp, hf.model_config)
    except (ConversionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = hf.model_config
    g = torch.Generator().manual_seed(a.seed)
    tokens = torch.randint(0, cfg.vocab_size, (a.batch, a.seq_length), generator=g)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.hf, dtype=hf.dtype).eval()
    with torch.no_grad():
        ref = model(tokens).logits.float()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.pt")
        args = (os.path.join(tmp, "store"), a.megatron, cfg, hf.dtype, tokens, out)
        torch.multiprocessing.start_processes(megatron_logits, args=(a.tp, *args), nprocs=a.tp, start_method="spawn")
        got = torch.load(out)
    diff = (got - ref).abs().max().item()
    tol = a.tolerance if a.tolerance is not None else (1e-3 if hf.dtype == torch.float32 else 0.5)
    print(f"max |logit difference| = {diff:.3e} over {a.batch}x{a.seq_length} tokens, TP={a.tp} "
          f"(tolerance {tol:g}, logits span {ref.abs().max().item():.3g})")
    return 0 if diff <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
