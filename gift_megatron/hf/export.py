"""Streaming export: a TP/PP/EP-sharded Megatron GPTModel in memory -> Hugging Face (name, full tensor) buckets.

    from gift_megatron.hf import hf_config_dict, iter_hf_weights

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

Mixture-of-Experts models: the routed experts of a layer are spread over the expert-parallel (EP) ranks of
a stage, which belong to different data-parallel replicas, and each expert is split over the expert-TP
(ETP) ranks. They are exported one expert tensor at a time, by global expert index:

- ``dst_rank=None``: the ETP shards are all-gathered on the EP rank that holds the expert, which broadcasts
  it over the EP group, then over the pipeline group as above.
- ``dst_rank=r``: the ETP shards are gathered (``comm.gather_tensors``) onto the holder whose ETP rank is
  that of r's replica, and the holder sends the full tensor to r point-to-point. This involves ranks of
  other data-parallel replicas, so with experts *every rank of the world* must run the generator (one
  small all-gather of rank coordinates and destinations over the world comes first). Each replica may
  export to its own destination at the same time (the trainer does: every replica's engine owner): each
  rank passes its own replica's ``dst_rank``, and the destinations are served one after the other, every
  rank sending the experts it holds to each.

Each rank receives at most one full tensor beyond the bucket it is filling. Buckets hold at most
``bucket_bytes`` of tensors, except that a single larger tensor is yielded alone. A list of model chunks
(virtual pipeline stages) is accepted, each layer named by its global number (the tests cover one chunk
per stage); FP8 parameters (``fp8_param``) are not supported.

Every rank of the replica (of the world, for a Mixture-of-Experts model) must run the generator to its end
(a consumer that stops early leaves the others waiting in a collective).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gift_megatron import comm
from gift_megatron.device import compute_device
from gift_megatron.hf.layout import LocalParam, as_chunks, expert_parallel, local_params
from gift_megatron.hf.mapping import megatron_tensor_to_hf

Bucket = list[tuple[str, torch.Tensor]]
_EXPERT_INDEX = re.compile(r"^(mlp\.experts\.local_experts\.)(\d+)(\..+)$")


@dataclass(frozen=True)
class _Item:
    """One Megatron tensor to export: ``name`` (layer-local; a routed expert by global index), ``layer``,
    ``shape`` (gathered over the ranks that split it), ``dtype``, ``split`` (how many ranks split it: TP,
    or ETP for an expert; 1 when not split), ``owner`` (the EP rank holding a routed expert; None: a dense
    tensor) and ``local`` (the index of the tensor in the holder's list of local parameters)."""

    name: str
    layer: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    split: int
    owner: int | None
    local: int


def iter_hf_weights(
    model: Any,
    model_cfg: Any,
    *,
    bucket_bytes: int = 512 << 20,
    dst_rank: int | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[Bucket]:
    """Yield buckets of (Hugging Face name, full tensor) of the model replica this rank belongs to.

    Args:
        model: this rank's GPTModel (possibly wrapped in Megatron DDP / Float16Module) or its list of
            virtual-pipeline chunks; any TP/PP/EP/ETP layout, local or Transformer Engine spec.
        model_cfg: its :class:`~gift_megatron.megatron.model.ModelConfig` (family, heads, query groups,
            head_dim, unpadded ``vocab_size``, ``tie_embeddings``, the experts).
        bucket_bytes: the most bytes of tensors in one bucket (a single larger tensor comes alone).
        dst_rank: the global rank that receives the tensors; None: every rank of the replica.
        dtype: cast every tensor to this dtype (None: the parameters' dtype).

    Yields:
        lists of (name, tensor): tensors in Hugging Face layout and shape (TP-gathered; QKV split into
        q_proj [H*d, h] / k_proj [G*d, h] / v_proj [G*d, h] (and their biases), fc1 into gate_proj /
        up_proj [ffn, h]; embedding and lm_head [vocab_size, h] without Megatron's padding rows; routed
        experts one by one under Hugging Face's on-disk names, e.g. ``model.layers.0.mlp.experts.5.gate_proj
        .weight`` [I, h], gathered over ETP and EP), on the model's device. A tied ``lm_head.weight`` is not
        sent (it is the embedding). Tensors may be views of the model's parameters or of each other: copy
        them to keep them past the next optimizer step. Ranks that receive nothing yield nothing.
    """
    from megatron.core import parallel_state as ps

    if bucket_bytes < 1:
        raise ValueError(f"iter_hf_weights: bucket_bytes must be >= 1, got {bucket_bytes}")
    chunks = as_chunks(model)
    local = local_params(chunks, tied_output=False)
    device = local[0].param.device if local else compute_device()
    plan = _Plan(ps, dst_rank, moe=bool(getattr(model_cfg, "num_experts", 0)))
    if not plan.in_replica:
        return
    bucket: Bucket = []
    size = 0
    for dst in plan.destinations:
        if dst is not None:
            plan.use(dst)
        for src_stage in range(plan.pp):
            for item in plan.stage_items(src_stage, local, getattr(model_cfg, "num_experts", 0)):
                full = plan.move(src_stage, item, local, device)
                if full is None:
                    continue
                for hf_name, tensor in megatron_tensor_to_hf(item.name, full, model_cfg, item.split, item.layer):
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


def _items(local: list[LocalParam], tp: int, etp: int, ep: int, ep_rank: int, num_experts: int) -> list[_Item]:
    """This rank's export list: its dense tensors, then every routed expert's (of all EP ranks: the
    structure is the same on each), layer by layer, by global expert index."""
    dense = [
        _Item(lp.name, lp.layer, _full_shape(lp, tp), lp.param.dtype, tp if lp.tp_split else 1, None, k)
        for k, lp in enumerate(local)
        if not lp.expert
    ]
    per_rank = num_experts // ep if num_experts else 0
    experts: list[_Item] = []
    by_layer: dict[int | None, list[tuple[int, LocalParam]]] = {}
    for k, lp in enumerate(local):
        if lp.expert:
            by_layer.setdefault(lp.layer, []).append((k, lp))
    for layer, params in by_layer.items():
        for owner in range(ep):
            for k, lp in params:
                m = _EXPERT_INDEX.match(lp.name)
                if m is None:
                    raise ValueError(f"expert parameter {lp.name}: no expert index in its name")
                j = int(m.group(2)) - ep_rank * per_rank  # this rank's local index
                name = f"{m.group(1)}{owner * per_rank + j}{m.group(3)}"
                experts.append(
                    _Item(name, layer, _full_shape(lp, etp), lp.param.dtype, etp if lp.tp_split else 1, owner, k)
                )
    return dense + experts


class _Plan:
    """Who sends what to whom for one export (see the module docstring)."""

    def __init__(self, ps: Any, dst_rank: int | None, moe: bool) -> None:
        self.tp, self.pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        self.stage, self.tp_rank, self.me = (
            ps.get_pipeline_model_parallel_rank(),
            ps.get_tensor_model_parallel_rank(),
            dist.get_rank(),
        )
        self.tp_group, self.pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
        self.ep, self.ep_rank = expert_parallel()
        self.moe = moe
        if moe:
            self.etp, self.etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
            self.etp_group, self.ep_group = ps.get_expert_tensor_parallel_group(), ps.get_expert_model_parallel_group()
        else:
            self.etp, self.etp_rank, self.etp_group, self.ep_group = 1, 0, None, None
        self.dst = dst_rank
        self.own_dst = dst_rank
        self.destinations: list[int | None] = [dst_rank]
        self.in_replica = True
        if dst_rank is None:
            return
        mp_group = ps.get_model_parallel_group()
        mp_ranks = dist.get_process_group_ranks(mp_group)
        if moe:
            # Experts a destination needs live on other data-parallel replicas, and every replica exports to its
            # own destination (the trainer: each replica's engine owner) at the same time: every rank learns
            # every rank's coordinates and destination, then serves every destination in turn.
            coords = comm.all_gather_objects(
                (
                    self.me,
                    self.stage,
                    self.tp_rank,
                    self.ep_rank,
                    self.etp_rank,
                    tuple(mp_ranks),
                    tuple(dist.get_process_group_ranks(ps.get_expert_tensor_and_model_parallel_group())),
                    dst_rank,
                )
            )
            self.coords = {c[0]: c for c in coords}
            self.destinations = sorted({c[7] for c in coords if c[7] is not None})
            for d in self.destinations:
                replica = self.coords[d][5] if d in self.coords else ()
                wrong = sorted(r for r in replica if self.coords[r][7] != d)
                if d not in self.coords or wrong or len({c[7] is None for c in coords}) > 1:
                    raise ValueError(
                        f"iter_hf_weights: with experts every rank must pass the dst_rank of its own "
                        f"model replica (rank {d}'s replica {list(replica)}: ranks {wrong} passed "
                        f"{[self.coords[r][7] for r in wrong]}), or every rank None"
                    )
            self.use(dst_rank)
            return
        if dst_rank not in mp_ranks:
            self.in_replica = False
            return
        coords = comm.all_gather_objects((self.me, self.stage, self.tp_rank), mp_group)
        self._set_replica(dst_rank, {r: (s, t) for r, s, t in coords})

    def use(self, dst_rank: int) -> None:
        """Export to ``dst_rank`` next (with experts: this rank's own destination, or another replica's, for
        which it only serves the experts it holds)."""
        self.dst = dst_rank
        if not self.moe:
            return
        replica = self.coords[dst_rank][5]
        self._set_replica(dst_rank, {r: (self.coords[r][1], self.coords[r][2]) for r in replica})
        # Per stage and EP rank: the rank the expert shards are gathered onto (ETP rank of the collector).
        self.holder: dict[int, dict[int, int]] = {}
        for s, c in self.collector.items():
            group, etp_rank = self.coords[c][6], self.coords[c][4]
            self.holder[s] = {self.coords[r][3]: r for r in group if self.coords[r][4] == etp_rank}

    def _set_replica(self, dst_rank: int, where: dict[int, tuple[int, int]]) -> None:
        """``where``: (stage, TP rank) of every rank of ``dst_rank``'s replica."""
        self.dst_stage, self.dst_tp = where[dst_rank]
        # The rank of each stage that collects that stage's full dense tensors: the one with dst's TP rank.
        self.collector = {s: r for r, (s, t) in where.items() if t == self.dst_tp}
        self.in_dense = self.me in where

    @property
    def everyone(self) -> bool:
        return self.dst is None

    @property
    def target(self) -> int:
        """The destination rank (only when not exporting to everyone)."""
        if self.dst is None:
            raise RuntimeError("iter_hf_weights: exporting to every rank, there is no single destination")
        return self.dst

    def stage_items(self, src_stage: int, local: list[LocalParam], num_experts: int) -> list[_Item]:
        """The export list of ``src_stage``, on the ranks that need it (the source stage's own ranks compute
        it; receivers elsewhere get it from the source stage)."""
        pp_group = self.pp_group
        mine = _items(local, self.tp, self.etp, self.ep, self.ep_rank, num_experts)
        if self.pp == 1 or (self.stage == src_stage and self.everyone):
            if self.pp > 1:
                comm.broadcast_objects([mine], src=_global(pp_group, src_stage), group=pp_group)
            return mine
        if self.everyone:
            return comm.broadcast_objects([None], src=_global(pp_group, src_stage), group=pp_group)[0]
        if src_stage == self.dst_stage:  # the destination's own stage: nothing to announce
            return mine if self.stage == src_stage else []
        if self.stage == src_stage:
            if self.me == self.collector[src_stage]:
                comm.send_objects([mine], dst=self.target, group=pp_group)
            return mine
        if self.me == self.dst:
            return comm.recv_objects(1, src=self.collector[src_stage], group=pp_group)[0]
        return []  # neither sends nor receives this stage's tensors

    def move(self, src_stage: int, item: _Item, local: list[LocalParam], device: torch.device) -> torch.Tensor | None:
        """One tensor of ``src_stage``: the full tensor on a receiving rank, None elsewhere."""
        on_stage = self.stage == src_stage
        if item.owner is not None:
            return self._move_expert(src_stage, item, local, device)
        lp = local[item.local] if on_stage else None
        if self.everyone:
            full = (
                _all_gather_tp(lp, self.tp, self.tp_group)
                if lp is not None
                else torch.empty(item.shape, dtype=item.dtype, device=device)
            )
            if self.pp > 1:
                full = comm.broadcast_tensor(full, src=_global(self.pp_group, src_stage), group=self.pp_group)
            return full
        if not self.in_dense:
            return None
        collector = self.collector[src_stage]
        full = None
        if lp is not None:  # on the source stage: gather the shards onto the collector
            full = _gather_tp(lp, self.tp, self.tp_group, collector, self.me == collector)
            if src_stage != self.dst_stage and self.me == collector and full is not None:
                comm.send_tensor(full, dst=self.target, group=self.pp_group)
                return None
        elif self.me == self.dst:
            full = comm.recv_tensor(item.shape, item.dtype, src=collector, group=self.pp_group, device=device)
        return full if self.me == self.dst else None

    def _move_expert(
        self, src_stage: int, item: _Item, local: list[LocalParam], device: torch.device
    ) -> torch.Tensor | None:
        owner = item.owner
        if owner is None:
            raise ValueError(f"{item.name}: not an expert tensor")
        holds = self.stage == src_stage and self.ep_rank == owner
        lp = local[item.local] if holds else None
        if self.everyone:
            full = (
                _all_gather_tp(lp, self.etp, self.etp_group)
                if lp is not None
                else torch.empty(item.shape, dtype=item.dtype, device=device)
            )
            if self.stage == src_stage and self.ep > 1:
                full = comm.broadcast_tensor(full, src=_global(self.ep_group, owner), group=self.ep_group)
            if self.pp > 1:
                full = comm.broadcast_tensor(full, src=_global(self.pp_group, src_stage), group=self.pp_group)
            return full
        holder = self.holder[src_stage][owner]
        full = None
        if lp is not None and self.me in self.coords[self.collector[src_stage]][6]:
            full = _gather_tp(lp, self.etp, self.etp_group, holder, self.me == holder)
            if self.me == holder and holder != self.dst and full is not None:
                comm.send_tensor(full, dst=self.target)
                return None
        elif self.me == self.dst:
            full = comm.recv_tensor(item.shape, item.dtype, src=holder, device=device)
        return full if self.me == self.dst else None


def _full_shape(lp: LocalParam, tp: int) -> tuple[int, ...]:
    shape = list(lp.param.shape)
    if lp.tp_split:
        shape[lp.partition_dim] *= tp
    return tuple(shape)


def _all_gather_tp(lp: LocalParam, tp: int, group: comm.Group) -> torch.Tensor:
    p = lp.param.detach()
    if tp == 1 or not lp.tp_split:
        return p
    return torch.cat(comm.all_gather_tensors(p, group), dim=lp.partition_dim)


def _gather_tp(lp: LocalParam, tp: int, group: comm.Group, collector: int, am_collector: bool) -> torch.Tensor | None:
    p = lp.param.detach()
    if tp == 1 or not lp.tp_split:
        return p if am_collector else None
    parts = comm.gather_tensors(p, dst=collector, group=group)
    return torch.cat(parts, dim=lp.partition_dim) if am_collector and parts is not None else None


def _global(group: Any, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank)
