"""Packed (THD) sequences for the local spec: core attention run per sequence.

Transformer Engine's attention takes Megatron-Core's ``PackedSeqParams(qkv_format="thd")`` natively. The
local spec's ``DotProductAttention`` (CPU, or CUDA without TE) refuses it. :class:`PackedDotProductAttention`
accepts it and runs the unchanged local attention once per slot of the packed row, so each sequence attends
causally to itself only: exactly the computation of the sequence alone, with O(max slot^2) memory. A
block-diagonal mask over the whole row would cost O(T^2) (about 30 GB per layer for one 16k-token row of a
7B model). RoPE needs nothing here: Megatron-Core restarts the rotary positions at every ``cu_seqlens``
boundary before core attention.

Everything above the core attention (projections, RoPE, MLP, norms) is the same module for padded and
packed rows, so CPU and GPU share one data path; only the attention kernel differs.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

__all__ = ["PackedDotProductAttention", "with_packed_attention"]


class PackedDotProductAttention(DotProductAttention):
    """Megatron-Core's local ``DotProductAttention`` that also takes packed rows.

    Padded rows (``packed_seq_params`` None): unchanged. Packed rows: query [T, np, hn], key/value
    [T, ng, hn] (Megatron squeezes the batch dim for THD), slots from ``cu_seqlens_q_padded`` (or
    ``cu_seqlens_q``); returns [T, 1, np * hn], the slots' outputs in row order.
    """

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if packed_seq_params is None:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type=attn_mask_type, attention_bias=attention_bias
            )
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences: qkv_format {packed_seq_params.qkv_format!r}, expected 'thd'")
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        # One host read of the slot boundaries per layer: this path runs where there is no TE kernel
        # (CPU, where it costs nothing); TE's own attention reads cu_seqlens on the device.
        bounds = cu.tolist()
        if bounds[-1] != query.shape[0]:
            raise ValueError(
                f"packed sequences: cu_seqlens end at {bounds[-1]} but the row has {query.shape[0]} tokens"
            )
        outs = []
        for start, end in itertools.pairwise(bounds):
            if end == start:
                continue
            outs.append(
                super().forward(
                    query[start:end].unsqueeze(1),
                    key[start:end].unsqueeze(1),
                    value[start:end].unsqueeze(1),
                    None,
                    attn_mask_type=attn_mask_type,
                    attention_bias=attention_bias,
                )
            )
        return torch.cat(outs, dim=0)


def with_packed_attention(spec: Any) -> Any:
    """``spec`` (a local GPT layer spec, or a decoder block spec with ``layer_specs``) with its core
    attention swapped for :class:`PackedDotProductAttention`; the spec is changed in place and returned.
    Specs whose core attention is not the local ``DotProductAttention`` (TE's) are left as they are."""
    layers = getattr(spec, "layer_specs", None)
    for layer in layers if layers is not None else [spec]:
        attn = getattr(getattr(layer, "submodules", None), "self_attention", None)
        sub = getattr(attn, "submodules", None)
        if sub is not None and getattr(sub, "core_attention", None) is DotProductAttention:
            sub.core_attention = PackedDotProductAttention
    return spec
