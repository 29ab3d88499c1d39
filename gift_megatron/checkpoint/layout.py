"""Where a TP/PP-sharded Megatron GPTModel keeps its tensors: the parameters of this rank's model chunks,
each with its layer-local name, global layer index and how Megatron splits it over tensor-parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class LocalParam:
    """One parameter of this rank.

    name: ``decoder.layers.N.`` removed for layer parameters (local or Transformer Engine spelling);
    layer: global 0-based layer index (None outside the decoder layers); param: the tensor;
    tp_split: whether Megatron splits it over the TP ranks, along ``partition_dim``.
    """

    name: str
    layer: int | None
    param: torch.Tensor
    tp_split: bool
    partition_dim: int


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

    def add(name: str, layer: int | None, p: torch.Tensor) -> None:
        split = bool(getattr(p, "tensor_model_parallel", False))
        out.append(LocalParam(name, layer, p, split, int(getattr(p, "partition_dim", 0)) if split else 0))

    for model in chunks:
        tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
        if getattr(model, "pre_process", False):
            add("embedding.word_embeddings.weight", None, model.embedding.word_embeddings.weight)
        for layer in model.decoder.layers:
            for name, p in layer.named_parameters():
                add(name, layer.layer_number - 1, p)
        if getattr(model, "post_process", False):
            final = getattr(model.decoder, "final_layernorm", None)
            if final is not None:
                add("decoder.final_layernorm.weight", None, final.weight)
            weight = getattr(model.output_layer, "weight", None)
            if weight is not None and (not tied or tied_output):
                add("output_layer.weight", None, weight)
    return out
