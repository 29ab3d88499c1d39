"""Check a conversion: the same tokens through transformers (the HF folder) and through Megatron-Core (the
converted checkpoint loaded at TP ranks on the CPU), and the largest absolute logit difference.

    from gift_megatron.checkpoint.verify import compare_logits
    result = compare_logits("/models/Qwen2.5-0.5B", "/ckpt/qwen2.5-0.5b", tp=2)   # spawns 2 gloo ranks
    result.max_abs_diff, result.logit_scale

TP > 1 runs ``tp`` processes started here (torch.multiprocessing, spawn, file-store rendezvous, killed
after ``timeout`` seconds); TP=1 runs in this process. Memory: the HF model plus the Megatron model
(each rank holds 1/TP of it), both in the checkpoint's dtype.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any, Sequence

import torch

from gift_megatron.checkpoint.hf_io import ConversionError, HFCheckpoint


@dataclasses.dataclass
class LogitComparison:
    """max_abs_diff: max |Megatron - transformers| over all tokens and vocabulary entries (fp32);
    logit_scale: max |transformers logit| (for judging the difference); tokens: the [b, s] ids used."""

    max_abs_diff: float
    logit_scale: float
    tokens: torch.Tensor
    tp: int
    dtype: torch.dtype

    @property
    def relative_diff(self) -> float:
        """max_abs_diff / logit_scale: what tools/verify_conversion.py's --tolerance bounds (bf16 round-off
        scales with the logits, so an absolute bound cannot fit every model)."""
        return self.max_abs_diff / self.logit_scale if self.logit_scale > 0 else float("inf")


def compare_logits(hf_dir: str, ckpt: str, *, tp: int = 1, tokens: torch.Tensor | None = None, batch: int = 2,
                   seq_length: int = 32, seed: int = 0, timeout: float = 1800.0) -> LogitComparison:
    """Logits of ``tokens`` ([b, s] int64; default: random ids from ``seed``) in both models.

    Raises ConversionError before loading anything when the layout is impossible (TP not dividing heads,
    query groups or the FFN width), the token ids exceed the vocabulary, or the checkpoint's recorded
    architecture differs from the HF folder's.
    """
    from gift_megatron.checkpoint.convert import (
        _conversion_root,
        model_config_from_info,
        read_conversion_info,
        resolve_checkpoint,
    )
    from gift_megatron.megatron.model import ParallelConfig

    hf = HFCheckpoint(hf_dir)
    cfg = hf.model_config
    try:
        ParallelConfig(tensor_model_parallel_size=tp).validate(tp, cfg)
    except ValueError as exc:
        raise ConversionError(f"--tp {tp}: {exc}") from exc
    path = resolve_checkpoint(ckpt)
    root = _conversion_root(ckpt, path)
    if root:
        recorded = model_config_from_info(read_conversion_info(root))
        if recorded != cfg:
            diff = {f.name: (getattr(recorded, f.name), getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                    if getattr(recorded, f.name) != getattr(cfg, f.name)}
            raise ConversionError(f"{ckpt} was converted from another architecture than {hf_dir}: "
                                  f"(checkpoint, HF) differ in {diff}")
    if tokens is None:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq_length), generator=g)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ConversionError(f"token ids must be a non-empty [batch, seq] array, got shape {list(tokens.shape)}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size:
        raise ConversionError(f"token ids must lie in [0, {cfg.vocab_size}) (the model's vocab_size), got "
                              f"[{int(tokens.min())}, {int(tokens.max())}]")
    ref = hf_logits(hf_dir, tokens, hf.dtype)
    got = megatron_logits(path, cfg, tokens, tp=tp, timeout=timeout)
    return LogitComparison((got - ref).abs().max().item(), ref.abs().max().item(), tokens, tp, hf.dtype)


def hf_logits(hf_dir: str, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' logits [b, s, vocab_size] (fp32) of ``tokens`` with the model in ``dtype``."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def megatron_logits(path: str, model_cfg: Any, tokens: torch.Tensor, *, tp: int = 1, timeout: float = 1800.0
                    ) -> torch.Tensor:
    """The Megatron checkpoint's logits [b, s, vocab_size] (fp32, vocabulary padding removed) at TP=``tp``."""
    import torch.distributed as dist

    if tp == 1 and not dist.is_initialized():
        from gift_megatron.checkpoint.convert import single_process_megatron

        with single_process_megatron():
            return _forward(path, model_cfg, tokens)
    with tempfile.TemporaryDirectory(prefix="gift_verify_") as tmp:
        out = os.path.join(tmp, "logits.pt")
        spawn_ranks(_logits_rank, tp, (os.path.join(tmp, "store"), path, model_cfg, tokens, out), timeout=timeout)
        return torch.load(out)


def _forward(path: str, model_cfg: Any, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    from gift_megatron.comm import all_gather_tensors

    from gift_megatron.checkpoint.convert import build_cpu_model, checkpoint_dtype
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
    return local[..., :model_cfg.vocab_size]


def _logits_rank(rank: int, world: int, store: str, path: str, model_cfg: Any, tokens: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from gift_megatron.parallel import destroy_model_parallel_cpu, initialize_model_parallel_cpu

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        initialize_model_parallel_cpu(world, 1)
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
