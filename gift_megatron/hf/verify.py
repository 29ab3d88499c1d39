"""Check a conversion: the same tokens through transformers (the HF folder) and through Megatron-Core (the
converted checkpoint loaded at TP ranks on the CPU), and the largest absolute logit difference.

    from gift_megatron.hf.verify import compare_logits
    result = compare_logits("/models/Qwen2.5-0.5B", "/ckpt/qwen2.5-0.5b", tp=2)   # spawns 2 gloo ranks
    result.max_abs_diff, result.logit_scale

TP > 1 or EP > 1 runs its ranks in processes started here (torch.multiprocessing, spawn, file-store
rendezvous, killed after ``timeout`` seconds); TP=1 / EP=1 runs in this process. Mixture-of-Experts
checkpoints: ``ep`` splits the routed experts over expert-parallel ranks and ``etp`` each expert over
expert-TP ranks (default: TP, as in Megatron); the world is the least common multiple of TP and ETP x EP
(the other ranks are data-parallel replicas running the same tokens), and TP > 1 runs with sequence
parallelism, which Megatron's MoE layer requires. Memory: the HF model plus the Megatron model (each rank
holds its share), both in the checkpoint's dtype.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from gift_megatron.hf.hf_io import ConversionError, HFCheckpoint


@dataclasses.dataclass
class LogitComparison:
    """max_abs_diff: max |Megatron - transformers| over all tokens and vocabulary entries (fp32);
    logit_scale: max |transformers logit| (for judging the difference); tokens: the [b, s] ids used."""

    max_abs_diff: float
    logit_scale: float
    tokens: torch.Tensor
    tp: int
    dtype: torch.dtype
    ep: int = 1
    etp: int | None = None

    @property
    def relative_diff(self) -> float:
        """max_abs_diff / logit_scale: what tools/verify_conversion.py's --tolerance bounds (bf16 round-off
        scales with the logits, so an absolute bound cannot fit every model)."""
        return self.max_abs_diff / self.logit_scale if self.logit_scale > 0 else float("inf")


def compare_logits(
    hf_dir: str,
    ckpt: str,
    *,
    tp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    tokens: torch.Tensor | None = None,
    batch: int = 2,
    seq_length: int = 32,
    seed: int = 0,
    timeout: float = 1800.0,
) -> LogitComparison:
    """Logits of ``tokens`` ([b, s] int64; default: random ids from ``seed``) in both models, the Megatron
    checkpoint loaded at tensor-parallel ``tp``, expert-parallel ``ep`` and expert-TP ``etp`` (None: tp).

    Raises ConversionError before loading anything when the layout is impossible (TP not dividing heads,
    query groups or the FFN width, EP not dividing the experts, EP on a dense model, a sequence length that
    TP does not divide with experts), the token ids exceed the vocabulary, or the checkpoint's recorded
    architecture differs from the HF folder's.
    """
    from gift_megatron.hf.convert import (
        conversion_root,
        model_config_from_info,
        read_conversion_info,
        resolve_checkpoint,
    )
    from gift_megatron.megatron.model import ParallelConfig

    hf = HFCheckpoint(hf_dir)
    cfg = hf.model_config
    moe = bool(getattr(cfg, "num_experts", 0))
    world = verify_world_size(tp, ep, etp)
    try:
        experts: dict[str, Any] = (
            dict(expert_model_parallel_size=ep, expert_tensor_parallel_size=etp, sequence_parallel=tp > 1)
            if moe
            else dict(expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
        )
        ParallelConfig(tensor_model_parallel_size=tp, **experts).validate(world, cfg)
    except ValueError as exc:
        flags = f"--tp {tp}" + (f" --ep {ep}" if ep != 1 else "") + (f" --etp {etp}" if etp is not None else "")
        raise ConversionError(f"{flags}: {exc}") from exc
    path = resolve_checkpoint(ckpt)
    root = conversion_root(ckpt, path)
    if root:
        recorded = model_config_from_info(read_conversion_info(root))
        if recorded != cfg:
            diff = {
                f.name: (getattr(recorded, f.name), getattr(cfg, f.name))
                for f in dataclasses.fields(cfg)
                if getattr(recorded, f.name) != getattr(cfg, f.name)
            }
            raise ConversionError(
                f"{ckpt} was converted from another architecture than {hf_dir}: (checkpoint, HF) differ in {diff}"
            )
    if tokens is None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq_length), generator=g, device="cpu")
    # The verification ranks run on the CPU (gloo); the tokens go to them pickled.
    tokens = torch.as_tensor(tokens, dtype=torch.long, device="cpu")
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ConversionError(f"token ids must be a non-empty [batch, seq] array, got shape {list(tokens.shape)}")
    if moe and tokens.shape[1] % tp:
        raise ConversionError(
            f"--tp {tp} with experts runs sequence parallelism: the sequence length "
            f"{tokens.shape[1]} must be a multiple of {tp}"
        )
    if int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size:
        raise ConversionError(
            f"token ids must lie in [0, {cfg.vocab_size}) (the model's vocab_size), got "
            f"[{int(tokens.min())}, {int(tokens.max())}]"
        )
    ref = hf_logits(hf_dir, tokens, hf.dtype)
    got = megatron_logits(path, cfg, tokens, tp=tp, ep=ep, etp=etp, timeout=timeout)
    return LogitComparison((got - ref).abs().max().item(), ref.abs().max().item(), tokens, tp, hf.dtype, ep, etp)


def verify_world_size(tp: int, ep: int = 1, etp: int | None = None) -> int:
    """Ranks a check at this layout runs on: lcm(TP, ETP x EP), as Megatron's parallel state needs both
    the dense grid (TP) and the expert grid (ETP x EP) to divide the world."""
    import math

    return math.lcm(tp, (etp or tp) * ep)


def hf_logits(hf_dir: str, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' logits [b, s, vocab_size] (fp32) of ``tokens`` with the model in ``dtype``."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def megatron_logits(
    path: str,
    model_cfg: Any,
    tokens: torch.Tensor,
    *,
    tp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    timeout: float = 1800.0,
) -> torch.Tensor:
    """The Megatron checkpoint's logits [b, s, vocab_size] (fp32, vocabulary padding removed) at TP=``tp``,
    EP=``ep``, ETP=``etp`` (None: tp), from rank 0 of :func:`verify_world_size` ranks."""
    import torch.distributed as dist

    world = verify_world_size(tp, ep, etp)
    if world == 1 and not dist.is_initialized():
        from gift_megatron.hf.convert import single_process_megatron

        with single_process_megatron():
            return _forward(path, model_cfg, tokens)
    with tempfile.TemporaryDirectory(prefix="gift_verify_") as tmp:
        out = os.path.join(tmp, "logits.pt")
        spawn_ranks(
            _logits_rank,
            world,
            (os.path.join(tmp, "store"), path, model_cfg, tokens, out, tp, ep, etp),
            timeout=timeout,
        )
        return torch.load(out)


def _forward(path: str, model_cfg: Any, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    from gift_megatron.comm import all_gather_tensors
    from gift_megatron.hf.convert import build_cpu_model, checkpoint_dtype
    from gift_megatron.megatron.checkpoint import load_checkpoint

    model = build_cpu_model(model_cfg, checkpoint_dtype(path))
    load_checkpoint(path, [model], restore_rng=False)
    model.eval()
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
        local = model(tokens, positions, None).float()  # [b, s, padded_vocab / tp]
        tp = ps.get_tensor_model_parallel_world_size()
        if tp > 1:
            local = torch.cat(all_gather_tensors(local, ps.get_tensor_model_parallel_group()), -1)
    return local[..., : model_cfg.vocab_size]


def _logits_rank(
    rank: int,
    world: int,
    store: str,
    path: str,
    model_cfg: Any,
    tokens: torch.Tensor,
    out: str,
    tp: int,
    ep: int,
    etp: int | None,
) -> None:
    import torch.distributed as dist

    from gift_megatron.parallel import destroy_model_parallel_cpu, initialize_model_parallel_cpu

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        experts: dict[str, Any] = (
            dict(expert_model_parallel_size=ep, expert_tensor_parallel_size=etp or tp)
            if getattr(model_cfg, "num_experts", 0)
            else {}
        )
        initialize_model_parallel_cpu(tp, 1, **experts)
        logits = _forward(path, model_cfg, tokens)
        if rank == 0:
            torch.save(logits, out)
        destroy_model_parallel_cpu()
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Any, world: int, args: Sequence[Any], *, timeout: float) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes; raise the first failure, or
    TimeoutError (after killing every rank) when they have not all finished within ``timeout`` seconds."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(world, *args), nprocs=world, join=False, start_method="spawn")
    if ctx is None:  # torch returns the context whenever join=False
        raise RuntimeError("torch.multiprocessing.start_processes returned no process context")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish within {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
