"""Streaming export: a TP/PP-sharded Megatron GPTModel in memory -> Hugging Face named full tensors.

    for bucket in iter_hf_weights(model, model_cfg, bucket_bytes=512 << 20, dst_rank=owner):
        engine.update_weights(bucket)          # list of (HF name, full tensor), at most ~bucket_bytes

Every rank of the model replica (its TP x PP ranks) must iterate the generator to the end: each tensor is
all-gathered over the TP group on the stage that holds it and then broadcast from that stage over the
pipeline group. Nothing touches the disk, and no rank ever holds more than one bucket of full tensors
(plus the tensor being assembled). Ranks other than ``dst_rank`` take part in the collectives and get
empty buckets. Context-parallel ranks hold the same weights as CP rank 0: ranks with CP rank > 0 return
at once (their TP/PP groups contain only ranks of the same CP rank, so no collective waits for them).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist

from gift_megatron.checkpoint.mapping import megatron_tensor_to_hf
from gift_megatron.megatron.step import _unwrap


def _local_tensors(chunk, tied: bool) -> list[tuple[str, int | None, torch.Tensor]]:
    """(name, global layer index or None, local tensor) of one pipeline stage's model chunk, in a fixed
    order. Megatron's layer_number is 1-based and global (it already counts earlier stages)."""
    model = _unwrap(chunk)
    out = []
    if getattr(model, "pre_process", False):
        out.append(("embedding.word_embeddings.weight", None, model.embedding.word_embeddings.weight))
    for layer in model.decoder.layers:
        index = layer.layer_number - 1
        for name, p in layer.named_parameters():
            out.append((name, index, p))
    if getattr(model, "post_process", False):
        final = getattr(model.decoder, "final_layernorm", None)
        if final is not None:
            out.append(("decoder.final_layernorm.weight", None, final.weight))
        if not tied:
            out.append(("output_layer.weight", None, model.output_layer.weight))
    return out


def _gather_tp(p: torch.Tensor, group, tp: int) -> torch.Tensor:
    """The full tensor of a TP-sharded parameter (Megatron marks them with tensor_model_parallel and
    partition_dim); replicated parameters are returned as they are."""
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return p.detach()
    parts = [torch.empty_like(p) for _ in range(tp)]
    dist.all_gather(parts, p.detach().contiguous(), group=group)
    return torch.cat(parts, dim=p.partition_dim)


def iter_hf_weights(model: Any, model_cfg: Any, *, bucket_bytes: int = 512 << 20, dst_rank: int | None = None,
                    dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of (Hugging Face name, full tensor) of the replica's model.

    Args:
        model: this rank's model chunk (GPTModel, or wrapped in DDP / Float16Module), or a list of one.
        model_cfg: its ModelConfig (family, heads, groups, unpadded vocab size).
        bucket_bytes: a bucket is yielded once its tensors reach this many bytes (a single larger tensor
            is yielded alone).
        dst_rank: the global rank that receives the tensors (None: every rank of the replica).
        dtype: cast the tensors to this dtype (None: the model's own dtype).

    Yields:
        lists of (name, tensor): tensors are full (TP-gathered, vocabulary padding stripped, QKV and fc1
        split into HF's q/k/v and gate/up), on the model's device. Empty lists on non-receiving ranks.
    """
    from megatron.core import parallel_state as ps

    chunks = model if isinstance(model, (list, tuple)) else [model]
    if len(chunks) != 1:
        raise ValueError("iter_hf_weights: virtual pipeline stages (several model chunks) are not supported")
    if ps.get_context_parallel_rank() > 0:
        return
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    stage = ps.get_pipeline_model_parallel_rank()
    receive = dst_rank is None or dist.get_rank() == dst_rank
    local = _local_tensors(chunks[0], model_cfg.tie_embeddings)
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for src_stage in range(pp):
        if pp > 1:
            # The sending stage announces its tensors (name, layer, full shape, dtype); the other stages
            # allocate receive buffers from it.
            meta = [None]
            if stage == src_stage:
                meta = [[(n, i, _full_shape(p, tp), p.dtype) for n, i, p in local]]
            dist.broadcast_object_list(meta, src=dist.get_global_rank(pp_group, src_stage), group=pp_group)
            items = meta[0]
        else:
            items = [(n, i, _full_shape(p, tp), p.dtype) for n, i, p in local]
        for k, (name, layer, shape, tdtype) in enumerate(items):
            if stage == src_stage:
                full = _gather_tp(local[k][2], tp_group, tp)
            else:
                full = torch.empty(shape, dtype=tdtype, device=_device(local))
            if pp > 1:
                dist.broadcast(full, src=dist.get_global_rank(pp_group, src_stage), group=pp_group)
            if not receive:
                continue
            for hf_name, tensor in megatron_tensor_to_hf(name, full, model_cfg, tp, layer):
                tensor = tensor if dtype is None else tensor.to(dtype)
                bucket.append((hf_name, tensor))
                size += tensor.numel() * tensor.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
    if bucket or not receive:
        yield bucket


def _full_shape(p: torch.Tensor, tp: int) -> tuple[int, ...]:
    shape = list(p.shape)
    if tp > 1 and getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp
    return tuple(shape)


def _device(local) -> torch.device:
    return local[0][2].device if local else torch.device("cuda" if torch.cuda.is_available() else "cpu")
