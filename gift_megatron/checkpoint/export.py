"""Streaming export: a TP/PP-sharded Megatron GPTModel in memory -> Hugging Face (name, full tensor) buckets.

    from gift_megatron.checkpoint import hf_config_dict, iter_hf_weights

    # once: a transformers model of the same architecture for a CPU rollout engine
    hf_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config_dict(model_cfg, torch.bfloat16)))
    engine = HFRolloutEngine(hf_model)
    # after every optimizer step, on every rank of the model replica (all TP x PP ranks):
    buckets = iter_hf_weights(ddp_model, model_cfg, bucket_bytes=512 << 20, dst_rank=owner)
    if engine is not None:                                   # the owner rank
        engine.update_weights(t for bucket in buckets for t in bucket)
    else:
        for _ in buckets: pass                               # take part in the collectives

What moves (nothing touches the disk):

- ``dst_rank=None``: every rank receives every tensor. Each tensor is all-gathered over the TP group on the
  stage that holds it, then broadcast from that stage over the pipeline group.
- ``dst_rank=r``: only rank r receives. On each stage the TP shards are gathered (``comm.gather_tensors``) onto
  the stage's rank with r's TP rank, which sends the full tensor point-to-point to r (r's own stage needs
  no send). Ranks of other model replicas (another DP or CP rank) do nothing and return at once; the
  other ranks of r's replica take part in the collectives and yield nothing.

Each rank receives at most one full tensor beyond the bucket it is filling. Buckets hold at most
``bucket_bytes`` of tensors, except that a single larger tensor is yielded alone. A list of model chunks
(virtual pipeline stages) is accepted, each layer named by its global number (the tests cover one chunk
per stage); FP8 parameters (``fp8_param``) are not supported.

Every rank of the replica must run the generator to its end (a consumer that stops early leaves the
others waiting in a collective).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist

from gift_megatron import comm
from gift_megatron.checkpoint.layout import LocalParam, as_chunks, local_params
from gift_megatron.checkpoint.mapping import megatron_tensor_to_hf
from gift_megatron.device import compute_device

Bucket = list[tuple[str, torch.Tensor]]


def iter_hf_weights(model: Any, model_cfg: Any, *, bucket_bytes: int = 512 << 20, dst_rank: int | None = None,
                    dtype: torch.dtype | None = None) -> Iterator[Bucket]:
    """Yield buckets of (Hugging Face name, full tensor) of the model replica this rank belongs to.

    Args:
        model: this rank's GPTModel (possibly wrapped in Megatron DDP / Float16Module) or its list of
            virtual-pipeline chunks; any TP/PP layout, local or Transformer Engine spec.
        model_cfg: its :class:`~gift_megatron.megatron.model.ModelConfig` (family, heads, query groups,
            head_dim, unpadded ``vocab_size``, ``tie_embeddings``).
        bucket_bytes: the most bytes of tensors in one bucket (a single larger tensor comes alone).
        dst_rank: the global rank that receives the tensors; None: every rank of the replica.
        dtype: cast every tensor to this dtype (None: the parameters' dtype).

    Yields:
        lists of (name, tensor): tensors in Hugging Face layout and shape (TP-gathered; QKV split into
        q_proj [H*d, h] / k_proj [G*d, h] / v_proj [G*d, h] (and their biases), fc1 into gate_proj /
        up_proj [ffn, h]; embedding and lm_head [vocab_size, h] without Megatron's padding rows), on the
        model's device. A tied ``lm_head.weight`` is not sent (it is the embedding). Tensors may be views
        of the model's parameters or of each other: copy them to keep them past the next optimizer step.
        Ranks that receive nothing yield nothing.
    """
    from megatron.core import parallel_state as ps

    if bucket_bytes < 1:
        raise ValueError(f"iter_hf_weights: bucket_bytes must be >= 1, got {bucket_bytes}")
    chunks = as_chunks(model)
    local = local_params(chunks, tied_output=False)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    stage, tp_rank, me = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), dist.get_rank()
    device = local[0].param.device if local else compute_device()

    plan = _Plan(tp, pp, stage, tp_rank, me, dst_rank, ps)
    if not plan.in_replica:
        return
    bucket: Bucket = []
    size = 0
    for src_stage in range(pp):
        items = plan.stage_items(src_stage, local, tp_group, pp_group)
        for k, (name, layer, shape, tdtype) in enumerate(items):
            full = plan.move(src_stage, local[k] if stage == src_stage else None, shape, tdtype, device,
                             tp_group, pp_group)
            if full is None:
                continue
            for hf_name, tensor in megatron_tensor_to_hf(name, full, model_cfg, tp, layer):
                if dtype is not None:
                    tensor = tensor.to(dtype)
                nbytes = tensor.numel() * tensor.element_size()
                if bucket and size + nbytes > bucket_bytes:
                    yield bucket
                    bucket, size = [], 0
                bucket.append((hf_name, tensor))
                size += nbytes
    if bucket:
        yield bucket


def iter_hf_tensors(model: Any, model_cfg: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`iter_hf_weights` flattened to (name, tensor) pairs (same arguments)."""
    for bucket in iter_hf_weights(model, model_cfg, **kwargs):
        yield from bucket


class _Plan:
    """Who sends what to whom for one export (see the module docstring)."""

    def __init__(self, tp: int, pp: int, stage: int, tp_rank: int, me: int, dst_rank: int | None, ps: Any) -> None:
        self.tp, self.pp, self.stage, self.tp_rank, self.me, self.dst = tp, pp, stage, tp_rank, me, dst_rank
        self.in_replica = True
        if dst_rank is None:
            return
        mp_group = ps.get_model_parallel_group()
        mp_ranks = dist.get_process_group_ranks(mp_group)
        if dst_rank not in mp_ranks:
            self.in_replica = False
            return
        coords = comm.all_gather_objects((me, stage, tp_rank), mp_group)
        where = {r: (s, t) for r, s, t in coords}
        self.dst_stage, self.dst_tp = where[dst_rank]
        # The rank of each stage that collects that stage's full tensors: the one with dst's TP rank.
        self.collector = {s: r for r, (s, t) in where.items() if t == self.dst_tp}

    @property
    def everyone(self) -> bool:
        return self.dst is None

    def stage_items(self, src_stage: int, local: list[LocalParam], tp_group, pp_group
                    ) -> list[tuple[str, int | None, tuple[int, ...], torch.dtype]]:
        """(name, layer, full shape, dtype) of ``src_stage``'s tensors, on the ranks that need them (the
        source stage's own ranks compute it; receivers elsewhere get it from the source stage)."""
        mine = [(lp.name, lp.layer, _full_shape(lp, self.tp), lp.param.dtype) for lp in local]
        if self.pp == 1 or self.stage == src_stage and self.everyone:
            if self.pp > 1:
                comm.broadcast_objects([mine], src=_global(pp_group, src_stage), group=pp_group)
            return mine
        if self.everyone:
            return comm.broadcast_objects([None], src=_global(pp_group, src_stage), group=pp_group)[0]
        if src_stage == self.dst_stage:  # the destination's own stage: nothing to announce
            return mine if self.stage == src_stage else []
        if self.stage == src_stage:
            if self.me == self.collector[src_stage]:
                comm.send_objects([mine], dst=self.dst, group=pp_group)
            return mine
        if self.me == self.dst:
            return comm.recv_objects(1, src=self.collector[src_stage], group=pp_group)[0]
        return []  # neither sends nor receives this stage's tensors

    def move(self, src_stage: int, lp: LocalParam | None, shape, dtype, device, tp_group, pp_group
             ) -> torch.Tensor | None:
        """One tensor of ``src_stage``: the full tensor on a receiving rank, None elsewhere."""
        if self.everyone:
            full = _all_gather_tp(lp, self.tp, tp_group) if lp is not None else torch.empty(shape, dtype=dtype,
                                                                                                device=device)
            if self.pp > 1:
                full = comm.broadcast_tensor(full, src=_global(pp_group, src_stage), group=pp_group)
            return full
        collector = self.collector[src_stage]
        full = None
        if lp is not None:  # on the source stage: gather the shards onto the collector
            full = _gather_tp(lp, self.tp, tp_group, collector, self.me == collector)
            if src_stage != self.dst_stage and self.me == collector:
                comm.send_tensor(full, dst=self.dst, group=pp_group)
                return None
        elif self.me == self.dst:
            full = comm.recv_tensor(shape, dtype, src=collector, group=pp_group, device=device)
        return full if self.me == self.dst else None


def _full_shape(lp: LocalParam, tp: int) -> tuple[int, ...]:
    shape = list(lp.param.shape)
    if lp.tp_split:
        shape[lp.partition_dim] *= tp
    return tuple(shape)


def _all_gather_tp(lp: LocalParam, tp: int, group) -> torch.Tensor:
    p = lp.param.detach()
    if tp == 1 or not lp.tp_split:
        return p
    return torch.cat(comm.all_gather_tensors(p, group), dim=lp.partition_dim)


def _gather_tp(lp: LocalParam, tp: int, group, collector: int, am_collector: bool) -> torch.Tensor | None:
    p = lp.param.detach()
    if tp == 1 or not lp.tp_split:
        return p if am_collector else None
    parts = comm.gather_tensors(p, dst=collector, group=group)
    return torch.cat(parts, dim=lp.partition_dim) if am_collector else None


def _global(group, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank)

