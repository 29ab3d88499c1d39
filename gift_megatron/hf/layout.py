"""Where a TP/PP/EP-sharded Megatron GPTModel keeps its tensors: the parameters of this rank's model chunks,
each with its layer-local name, global layer index and how Megatron splits it over tensor-parallel ranks.

Routed experts: an expert-parallel rank holds ``num_experts / EP`` experts of every MoE layer, numbered
locally from 0 (``mlp.experts.local_experts.{j}`` with the local spec's SequentialMLP, ``mlp.experts.
linear_fc1.weight{j}`` with Transformer Engine's grouped GEMM); they are named here by their global index
``ep_rank * num_local + j`` in the SequentialMLP spelling, and split over the *expert* tensor-parallel
ranks (ETP), not the TP ranks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LocalParam:
    """One parameter of this rank.

    name: ``decoder.layers.N.`` removed for layer parameters (local or Transformer Engine spelling; a routed
    expert by its global index); layer: global 0-based layer index (None outside the decoder layers);
    param: the tensor; tp_split: whether Megatron splits it over the TP ranks (over the expert-TP ranks for
    a routed expert), along ``partition_dim``; expert: whether it is a routed expert's weight.
    """

    name: str
    layer: int | None
    param: torch.Tensor
    tp_split: bool
    partition_dim: int
    expert: bool = False


# Transformer Engine's grouped-GEMM experts (TEGroupedMLP): one weight per local expert on one module.
_GROUPED = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def expert_name(name: str, first_expert: int) -> str | None:
    """The global SequentialMLP name of a routed expert's layer-local parameter ``name`` (either spec's
    spelling) on an expert-parallel rank whose first expert is ``first_expert``; None for other names."""
    m = _LOCAL_EXPERT.match(name)
    if m:
        return f"mlp.experts.local_experts.{first_expert + int(m.group(1))}.{m.group(2)}"
    m = _GROUPED.match(name)
    if m:
        return f"mlp.experts.local_experts.{first_expert + int(m.group(2))}.{m.group(1)}.weight"
    return None


def expert_parallel() -> tuple[int, int]:
    """(EP size, EP rank) of Megatron's parallel state (1, 0 before it has expert groups)."""
    from megatron.core import parallel_state as ps

    try:
        return ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    except (AssertionError, AttributeError, RuntimeError):
        return 1, 0


def as_chunks(model: Any) -> list[Any]:
    """A model (GPTModel, possibly wrapped) or a list of virtual-pipeline chunks -> list of GPTModels."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if not chunks:
        raise ValueError("model: empty list of model chunks")
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunks)


def local_params(chunks: Sequence[Any], *, tied_output: bool) -> list[LocalParam]:
    """This rank's parameters, chunk by chunk, in a fixed order (the same on every TP rank of a stage).

    tied_output: include the last stage's copy of a tied embedding (``output_layer.weight`` exists as a
    parameter only on a last stage that is not also the first): loading fills it, exporting skips it (the
    embedding is exported once, from the first stage). Megatron's ``layer_number`` is 1-based and global
    (it counts earlier pipeline stages and virtual chunks).
    """
    out: list[LocalParam] = []
    _, ep_rank = expert_parallel()

    def add(name: str, layer: int | None, p: torch.Tensor, expert: bool = False) -> None:
        split = bool(getattr(p, "tensor_model_parallel", False))
        out.append(LocalParam(name, layer, p, split, int(getattr(p, "partition_dim", 0)) if split else 0, expert))

    for model in chunks:
        tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
        if getattr(model, "pre_process", False):
            add("embedding.word_embeddings.weight", None, model.embedding.word_embeddings.weight)
        for layer in model.decoder.layers:
            experts = getattr(getattr(layer, "mlp", None), "experts", None)
            first = ep_rank * int(getattr(experts, "num_local_experts", 0) or 0)
            for name, p in layer.named_parameters():
                global_name = expert_name(name, first) if experts is not None else None
                add(global_name or name, layer.layer_number - 1, p, global_name is not None)
        if getattr(model, "post_process", False):
            final = getattr(model.decoder, "final_layernorm", None)
            if final is not None:
                add("decoder.final_layernorm.weight", None, final.weight)
            weight = getattr(model.output_layer, "weight", None)
            if weight is not None and (not tied or tied_output):
                add("output_layer.weight", None, weight)
    return out
