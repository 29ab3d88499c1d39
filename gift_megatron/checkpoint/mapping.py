"""Megatron-Core GPTModel <-> Hugging Face names and layouts for the dense families (Llama, Qwen2, Qwen3).

One small table per family maps a Megatron parameter (layer-local name) to its Hugging Face tensor(s) and
a :class:`Rule` saying how the layouts differ:

- ``copy``: same tensor (norms, ``linear_proj`` = ``o_proj``, ``linear_fc2`` = ``down_proj``).
- ``qkv``: ``linear_qkv.weight`` [G*(H/G+2)*d, h] (``.bias`` [G*(H/G+2)*d]) is grouped per query group,
  each group holding ``[its H/G query heads; its key head; its value head]`` along dim 0, groups in order;
  HF keeps ``q_proj`` [H*d, h], ``k_proj`` [G*d, h], ``v_proj`` [G*d, h] apart. TP shards dim 0 in whole
  groups, so the grouped layout is the same at every TP size.
- ``fc1``: ``linear_fc1.weight`` [2*ffn, h] is ``[gate; up]`` *per TP rank*: the TP-gathered tensor of a
  model at TP=t is ``[gate_0; up_0; ...; gate_{t-1}; up_{t-1}]``, so splitting it needs ``t``.
- ``vocab``: the embedding and the output layer [V_padded, h]: Megatron pads the vocabulary rows to
  ``ModelConfig.padded_vocab_size(tp)``; the padding is stripped on export and zero-filled on import.

H = num_attention_heads, G = num_query_groups, d = head_dim, h = hidden_size, ffn = ffn_hidden_size,
V = the tokenizer's vocab_size. All functions here take and return plain tensors of any dtype and device.

With the Transformer Engine layer spec (GPU) the layer norms are fused into the next linear layer and
named ``self_attention.linear_qkv.layer_norm_weight`` and ``mlp.linear_fc1.layer_norm_weight``;
:data:`TE_NORM_NAMES` maps them to the local spec's ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight``,
so one table serves both specs (the names are read from the model's own parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Rule:
    """How one Megatron tensor maps to Hugging Face: ``kind`` (copy | qkv | fc1 | vocab) and the HF name
    templates (``{i}``: the global 0-based layer index), in the order the layout conversion uses."""

    kind: str
    hf: tuple[str, ...]


def _copy(name: str) -> Rule:
    return Rule("copy", (name,))


_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."

LLAMA_LAYER = {
    "input_layernorm.weight": _copy("model.layers.{i}.input_layernorm.weight"),
    "self_attention.linear_qkv.weight": Rule("qkv", tuple(f"{_ATTN}{x}_proj.weight" for x in "qkv")),
    "self_attention.linear_proj.weight": _copy(f"{_ATTN}o_proj.weight"),
    "pre_mlp_layernorm.weight": _copy("model.layers.{i}.post_attention_layernorm.weight"),
    "mlp.linear_fc1.weight": Rule("fc1", (f"{_MLP}gate_proj.weight", f"{_MLP}up_proj.weight")),
    "mlp.linear_fc2.weight": _copy(f"{_MLP}down_proj.weight"),
}
QWEN2_LAYER = {  # Llama + biases on q, k, v (none on o_proj)
    **LLAMA_LAYER,
    "self_attention.linear_qkv.bias": Rule("qkv", tuple(f"{_ATTN}{x}_proj.bias" for x in "qkv")),
}
QWEN3_LAYER = {  # Llama + RMSNorm over each head's queries and keys (weights [d]); explicit head_dim
    **LLAMA_LAYER,
    "self_attention.q_layernorm.weight": _copy(f"{_ATTN}q_norm.weight"),
    "self_attention.k_layernorm.weight": _copy(f"{_ATTN}k_norm.weight"),
}
FAMILY_TABLES: dict[str, dict[str, Rule]] = {"llama": LLAMA_LAYER, "qwen2": QWEN2_LAYER, "qwen3": QWEN3_LAYER}

# Outside the decoder layers: the same for every family.
TOP_LEVEL: dict[str, Rule] = {
    "embedding.word_embeddings.weight": Rule("vocab", ("model.embed_tokens.weight",)),
    "decoder.final_layernorm.weight": _copy("model.norm.weight"),
    "output_layer.weight": Rule("vocab", ("lm_head.weight",)),
}
TE_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_ARCHITECTURES = tuple(sorted(HF_ARCHITECTURES.values()))


def rule_for(name: str, layer: int | None, family: str) -> Rule:
    """The rule of Megatron tensor ``name`` (layer-local for ``layer`` not None, either spec's spelling).
    Raises KeyError naming the tensor for one this family does not have."""
    if layer is None:
        if name not in TOP_LEVEL:
            raise KeyError(f"no Hugging Face tensor for Megatron tensor {name!r}")
        return TOP_LEVEL[name]
    table = FAMILY_TABLES[family]
    local = TE_NORM_NAMES.get(name, name)
    if local not in table:
        raise KeyError(f"family {family!r} has no Hugging Face tensor for Megatron tensor decoder.layers.N.{name}")
    return table[local]


def hf_names(name: str, layer: int | None, model_cfg: Any) -> tuple[str, ...]:
    """The Hugging Face tensor names Megatron tensor ``name`` is made of. A tied output layer (the copy
    of the embedding the last pipeline stage holds) is made of the embedding."""
    if name == "output_layer.weight" and model_cfg.tie_embeddings:
        return TOP_LEVEL["embedding.word_embeddings.weight"].hf
    return tuple(t.format(i=layer) for t in rule_for(name, layer, model_cfg.family).hf)


# --------------------------------------------------------------------------------------- layouts
def split_qkv(fused: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Grouped ``linear_qkv`` weight [G*(H/G+2)*d, h] (or bias [G*(H/G+2)*d]) -> (q [H*d, ...], k [G*d, ...],
    v [G*d, ...])."""
    per = num_heads // num_groups
    rest = fused.shape[1:]
    x = fused.reshape(num_groups, per + 2, head_dim, *rest)
    q = x[:, :per].reshape(num_heads * head_dim, *rest)
    k = x[:, per].reshape(num_groups * head_dim, *rest)
    v = x[:, per + 1].reshape(num_groups * head_dim, *rest)
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of :func:`split_qkv`: (q [H*d, ...], k [G*d, ...], v [G*d, ...]) -> [G*(H/G+2)*d, ...]."""
    per = num_heads // num_groups
    rest = q.shape[1:]
    parts = [q.reshape(num_groups, per, head_dim, *rest), k.reshape(num_groups, 1, head_dim, *rest),
             v.reshape(num_groups, 1, head_dim, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_fc1(fused: torch.Tensor, tp: int):
    """``linear_fc1`` gathered from TP=``tp`` ranks, [2*ffn, h] = ``[gate_r; up_r]`` per rank r ->
    (gate [ffn, h], up [ffn, h])."""
    x = fused.reshape(tp, 2, fused.shape[0] // (2 * tp), *fused.shape[1:])
    return x[:, 0].reshape(-1, *fused.shape[1:]), x[:, 1].reshape(-1, *fused.shape[1:])


def fuse_fc1(gate: torch.Tensor, up: torch.Tensor, tp: int):
    """Inverse of :func:`split_fc1`: the [2*ffn, h] tensor whose ``tp`` equal dim-0 shards are ``[gate_r; up_r]``."""
    g = gate.reshape(tp, 1, -1, *gate.shape[1:])
    u = up.reshape(tp, 1, -1, *up.shape[1:])
    return torch.cat([g, u], dim=1).reshape(-1, *gate.shape[1:])


def megatron_tensor_to_hf(name: str, full: torch.Tensor, model_cfg: Any, tp: int, layer: int | None = None
                          ) -> list[tuple[str, torch.Tensor]]:
    """The Hugging Face (name, tensor) pairs of one full Megatron tensor.

    name: the parameter name inside the GPTModel (``decoder.layers.N.`` removed for layer tensors, whose
    global 0-based index is ``layer``); full: the TP-gathered tensor of a model at TP=``tp`` (vocabulary
    padding included: it is stripped here). The results may be views of ``full``.
    """
    rule = rule_for(name, layer, model_cfg.family)
    names = [t.format(i=layer) for t in rule.hf]
    if rule.kind == "qkv":
        return list(zip(names, split_qkv(full, model_cfg.num_attention_heads, model_cfg.num_query_groups,
                                         model_cfg.head_dim)))
    if rule.kind == "fc1":
        return list(zip(names, split_fc1(full, tp)))
    if rule.kind == "vocab":
        return [(names[0], full[:model_cfg.vocab_size])]
    return [(names[0], full)]


def megatron_tensor_from_hf(name: str, layer: int | None, parts: list[torch.Tensor], model_cfg: Any, *,
                            tp: int = 1, tp_rank: int = 0, partition_dim: int = 0,
                            padded_rows: int | None = None) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard (of ``tp``) of Megatron tensor ``name`` from its HF ``parts`` (in
    :func:`hf_names` order); ``tp=1`` for the whole tensor or a parameter Megatron does not split.

    partition_dim: the dim Megatron splits a ``copy`` tensor along (``linear_proj`` / ``linear_fc2``: 1);
    QKV, fc1 and the vocabulary are always split along dim 0. padded_rows: the full vocabulary rows of
    the embedding / output layer (``ModelConfig.padded_vocab_size(tp)``); rows past the HF vocabulary are
    zeros. Only the shard's rows are assembled; the result is in the parts' dtype (it may be a view of a
    part) and the caller checks its shape against the parameter.
    """
    kind = "vocab" if name == "output_layer.weight" else rule_for(name, layer, model_cfg.family).kind
    if kind == "qkv":
        # Whole query groups per TP rank: fuse only this rank's groups.
        g = model_cfg.num_query_groups // tp
        per = model_cfg.num_attention_heads // model_cfg.num_query_groups
        d = model_cfg.head_dim
        q, k, v = parts
        q = q[tp_rank * g * per * d:(tp_rank + 1) * g * per * d]
        k, v = (x[tp_rank * g * d:(tp_rank + 1) * g * d] for x in (k, v))
        return fuse_qkv(q, k, v, g * per, g, d)
    if kind == "fc1":
        gate, up = (p.chunk(tp, dim=0)[tp_rank] for p in parts)
        return torch.cat([gate, up], dim=0)
    (src,) = parts
    if kind == "vocab":
        rows = padded_rows or src.shape[0]
        per_rank = rows // tp
        start = tp_rank * per_rank
        valid = max(0, min(src.shape[0] - start, per_rank))
        if valid == per_rank:
            return src[start:start + per_rank]
        out = torch.zeros((per_rank, *src.shape[1:]), dtype=src.dtype)
        out[:valid] = src[start:start + valid]
        return out
    return src.chunk(tp, dim=partition_dim)[tp_rank] if tp > 1 else src


# ------------------------------------------------------------------------------------ the HF side
def megatron_param_shapes(model_cfg: Any) -> dict[tuple[str, int | None], tuple[int, ...]]:
    """(local-spec name, global layer index or None) -> unpadded full shape of every Megatron parameter of
    ``model_cfg`` at TP=1 (the vocabulary dim is ``vocab_size``, not the padded one)."""
    h, d, ffn = model_cfg.hidden_size, model_cfg.head_dim, model_cfg.ffn_hidden_size
    qkv = (model_cfg.num_attention_heads + 2 * model_cfg.num_query_groups) * d
    shapes: dict[tuple[str, int | None], tuple[int, ...]] = {
        ("embedding.word_embeddings.weight", None): (model_cfg.vocab_size, h)}
    for i in range(model_cfg.num_layers):
        layer = {
            "input_layernorm.weight": (h,),
            "self_attention.linear_qkv.weight": (qkv, h),
            "self_attention.linear_proj.weight": (h, model_cfg.num_attention_heads * d),
            "pre_mlp_layernorm.weight": (h,),
            "mlp.linear_fc1.weight": (2 * ffn, h),
            "mlp.linear_fc2.weight": (h, ffn),
        }
        if model_cfg.add_qkv_bias:
            layer["self_attention.linear_qkv.bias"] = (qkv,)
        if model_cfg.qk_layernorm:
            layer["self_attention.q_layernorm.weight"] = (d,)
            layer["self_attention.k_layernorm.weight"] = (d,)
        shapes.update({(n, i): s for n, s in layer.items()})
    shapes[("decoder.final_layernorm.weight", None)] = (h,)
    if not model_cfg.tie_embeddings:
        shapes[("output_layer.weight", None)] = (model_cfg.vocab_size, h)
    return shapes


def expected_hf_shapes(model_cfg: Any) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a Hugging Face checkpoint of ``model_cfg`` holds (a tied
    ``lm_head.weight`` is not listed: transformers does not save it, and it is ignored when present).

    Raises KeyError if the family's table lacks a tensor the config implies (e.g. QKV biases on Llama)."""
    out: dict[str, tuple[int, ...]] = {}
    H, G, d = model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.head_dim
    for (name, layer), shape in megatron_param_shapes(model_cfg).items():
        rule = rule_for(name, layer, model_cfg.family)
        names = [t.format(i=layer) for t in rule.hf]
        if rule.kind == "qkv":
            rest = shape[1:]
            out.update(zip(names, [(H * d, *rest), (G * d, *rest), (G * d, *rest)]))
        elif rule.kind == "fc1":
            out.update({n: (shape[0] // 2, *shape[1:]) for n in names})
        else:
            out[names[0]] = shape
    return out


def hf_config_dict(model_cfg: Any, dtype: torch.dtype | str = torch.bfloat16, **extra: Any) -> dict:
    """The ``config.json`` content of the Hugging Face model equal to ``model_cfg`` (a ModelConfig), with
    weights in ``dtype`` (torch dtype or bf16 / fp16 / fp32 / bfloat16 / ...). ``extra`` adds or overrides
    keys (eos_token_id, bos_token_id, pad_token_id, ...).

    ``transformers.AutoConfig.for_model(**hf_config_dict(cfg))`` builds the matching transformers config,
    e.g. for a trainer's CPU rollout engine.
    """
    family = model_cfg.family
    dtype_name = str(dtype).replace("torch.", "") if not isinstance(dtype, str) else dtype
    dtype_name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype_name, dtype_name)
    cfg = {
        "architectures": [HF_ARCHITECTURES[family]],
        "model_type": family,
        "hidden_size": model_cfg.hidden_size,
        "intermediate_size": model_cfg.ffn_hidden_size,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_attention_heads,
        "num_key_value_heads": model_cfg.num_query_groups,
        "head_dim": model_cfg.head_dim,
        "vocab_size": model_cfg.vocab_size,
        "max_position_embeddings": model_cfg.max_position_embeddings,
        "rope_theta": float(model_cfg.rotary_base),
        "rms_norm_eps": model_cfg.norm_epsilon,
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "hidden_act": "silu",
        # transformers >= 5 reads "dtype", older versions "torch_dtype"; each ignores the other's key.
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    if family == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    if family in ("qwen2", "qwen3"):
        cfg["use_sliding_window"] = False
    if family == "qwen3":
        cfg["attention_bias"] = False
    if model_cfg.rope_scaling_factor is not None:
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": model_cfg.rope_scaling_factor,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
    cfg.update(extra)
    return cfg
