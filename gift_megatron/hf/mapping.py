"""Megatron-Core GPTModel <-> Hugging Face names and layouts: dense Llama, Qwen2, Qwen3 and the
Mixture-of-Experts Qwen3-MoE, Qwen2-MoE and Mixtral.

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

Mixture-of-Experts layers (E = num_experts, I = the expert width ``expert_ffn_hidden_size``, S = the shared
expert's width). Megatron names each routed expert's weights by its *global* index ``e`` here
(``mlp.experts.local_experts.{e}.linear_fc1.weight`` [2*I, h] = ``[gate; up]`` per expert-TP rank,
``...linear_fc2.weight`` [h, I]); :mod:`.layout` turns the local index of an expert-parallel rank (and
Transformer Engine's grouped-GEMM names ``mlp.experts.linear_fc1.weight{j}``) into it. The router
``mlp.router.weight`` [E, h] is HF's ``mlp.gate.weight``; Qwen2-MoE's shared expert
``mlp.shared_experts.linear_fc1/fc2`` is HF's ``mlp.shared_expert.{gate,up,down}_proj`` and its gate
``mlp.shared_experts.gate_weight`` [1, h] is ``mlp.shared_expert_gate.weight``. Mixtral keeps its original
names: ``block_sparse_moe.gate`` and ``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up) / ``w2`` (down).
Dense layers of a MoE model (Qwen ``mlp_only_layers``) use the dense rows of the table.

Hugging Face names: the per-expert names above are what transformers writes to disk (and what vLLM loads).
transformers 5 holds the experts of a layer fused in memory, ``mlp.experts.gate_up_proj`` [E, 2*I, h]
(``[gate_e; up_e]`` per expert) and ``mlp.experts.down_proj`` [E, h, I] (Mixtral: under ``mlp.`` instead of
``block_sparse_moe.``); files saved from a state dict carry those names. :func:`split_fused_hf` turns such
tensors into the per-expert ones (views), so every reader accepts both spellings; writers use per-expert names.

With the Transformer Engine layer spec (GPU) the layer norms are fused into the next linear layer and
named ``self_attention.linear_qkv.layer_norm_weight`` and ``mlp.linear_fc1.layer_norm_weight``;
:data:`TE_NORM_NAMES` maps them to the local spec's ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight``,
so one table serves both specs (the names are read from the model's own parameters).
"""

from __future__ import annotations

import re
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
# Mixture-of-Experts rows. ``{e}``: the global 0-based expert index. Dense MLP rows stay for the layers a
# Qwen model keeps dense (mlp_only_layers); which rows a layer has is decided by megatron_param_shapes.
_EXPERT = "mlp.experts.local_experts.{e}."
_QWEN_MOE = {
    "mlp.router.weight": _copy(f"{_MLP}gate.weight"),
    f"{_EXPERT}linear_fc1.weight": Rule(
        "fc1", (f"{_MLP}experts.{{e}}.gate_proj.weight", f"{_MLP}experts.{{e}}.up_proj.weight")
    ),
    f"{_EXPERT}linear_fc2.weight": _copy(f"{_MLP}experts.{{e}}.down_proj.weight"),
}
_MOE = "model.layers.{i}.block_sparse_moe."
MIXTRAL_LAYER = {
    **{k: v for k, v in LLAMA_LAYER.items() if not k.startswith("mlp.")},
    "mlp.router.weight": _copy(f"{_MOE}gate.weight"),
    f"{_EXPERT}linear_fc1.weight": Rule("fc1", (f"{_MOE}experts.{{e}}.w1.weight", f"{_MOE}experts.{{e}}.w3.weight")),
    f"{_EXPERT}linear_fc2.weight": _copy(f"{_MOE}experts.{{e}}.w2.weight"),
}
QWEN3_MOE_LAYER = {**QWEN3_LAYER, **_QWEN_MOE}
QWEN2_MOE_LAYER = {
    **QWEN2_LAYER,
    **_QWEN_MOE,
    "mlp.shared_experts.linear_fc1.weight": Rule(
        "fc1", (f"{_MLP}shared_expert.gate_proj.weight", f"{_MLP}shared_expert.up_proj.weight")
    ),
    "mlp.shared_experts.linear_fc2.weight": _copy(f"{_MLP}shared_expert.down_proj.weight"),
    "mlp.shared_experts.gate_weight": _copy(f"{_MLP}shared_expert_gate.weight"),
}
FAMILY_TABLES: dict[str, dict[str, Rule]] = {
    "llama": LLAMA_LAYER,
    "qwen2": QWEN2_LAYER,
    "qwen3": QWEN3_LAYER,
    "qwen3_moe": QWEN3_MOE_LAYER,
    "qwen2_moe": QWEN2_MOE_LAYER,
    "mixtral": MIXTRAL_LAYER,
}

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
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
SUPPORTED_ARCHITECTURES = tuple(sorted(HF_ARCHITECTURES.values()))

_EXPERT_NAME = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def expert_of(name: str) -> tuple[str, int | None]:
    """(table key, global expert index) of a layer-local Megatron name: ``mlp.experts.local_experts.5.x``
    -> (``mlp.experts.local_experts.{e}.x``, 5); any other name -> (name, None)."""
    m = _EXPERT_NAME.match(name)
    if m is None:
        return name, None
    return f"mlp.experts.local_experts.{{e}}.{m.group(2)}", int(m.group(1))


def rule_for(name: str, layer: int | None, family: str) -> Rule:
    """The rule of Megatron tensor ``name`` (layer-local for ``layer`` not None, either spec's spelling).
    Raises KeyError naming the tensor for one this family does not have."""
    if layer is None:
        if name not in TOP_LEVEL:
            raise KeyError(f"no Hugging Face tensor for Megatron tensor {name!r}")
        return TOP_LEVEL[name]
    table = FAMILY_TABLES[family]
    local, _ = expert_of(TE_NORM_NAMES.get(name, name))
    if local not in table:
        raise KeyError(f"family {family!r} has no Hugging Face tensor for Megatron tensor decoder.layers.N.{name}")
    return table[local]


def hf_names(name: str, layer: int | None, model_cfg: Any) -> tuple[str, ...]:
    """The Hugging Face tensor names Megatron tensor ``name`` is made of. A tied output layer (the copy
    of the embedding the last pipeline stage holds) is made of the embedding."""
    if name == "output_layer.weight" and model_cfg.tie_embeddings:
        return TOP_LEVEL["embedding.word_embeddings.weight"].hf
    _, expert = expert_of(name)
    return tuple(t.format(i=layer, e=expert) for t in rule_for(name, layer, model_cfg.family).hf)


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
    parts = [
        q.reshape(num_groups, per, head_dim, *rest),
        k.reshape(num_groups, 1, head_dim, *rest),
        v.reshape(num_groups, 1, head_dim, *rest),
    ]
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


def megatron_tensor_to_hf(
    name: str, full: torch.Tensor, model_cfg: Any, tp: int, layer: int | None = None
) -> list[tuple[str, torch.Tensor]]:
    """The Hugging Face (name, tensor) pairs of one full Megatron tensor.

    name: the parameter name inside the GPTModel (``decoder.layers.N.`` removed for layer tensors, whose
    global 0-based index is ``layer``; a routed expert by its global index); full: the tensor gathered over
    the ``tp`` ranks that split it (the expert-TP ranks for a routed expert; vocabulary padding included:
    it is stripped here). The results may be views of ``full``.
    """
    rule = rule_for(name, layer, model_cfg.family)
    names = list(hf_names(name, layer, model_cfg)) if layer is not None else [rule.hf[0]]
    if rule.kind == "qkv":
        return list(
            zip(names, split_qkv(full, model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.head_dim))
        )
    if rule.kind == "fc1":
        return list(zip(names, split_fc1(full, tp)))
    if rule.kind == "vocab":
        return [(names[0], full[: model_cfg.vocab_size])]
    return [(names[0], full)]


def megatron_tensor_from_hf(
    name: str,
    layer: int | None,
    parts: list[torch.Tensor],
    model_cfg: Any,
    *,
    tp: int = 1,
    tp_rank: int = 0,
    partition_dim: int = 0,
    padded_rows: int | None = None,
) -> torch.Tensor:
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
        q = q[tp_rank * g * per * d : (tp_rank + 1) * g * per * d]
        k, v = (x[tp_rank * g * d : (tp_rank + 1) * g * d] for x in (k, v))
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
            return src[start : start + per_rank]
        out = torch.zeros((per_rank, *src.shape[1:]), dtype=src.dtype, device=src.device)
        out[:valid] = src[start : start + valid]
        return out
    return src.chunk(tp, dim=partition_dim)[tp_rank] if tp > 1 else src


# ------------------------------------------------------------------------------------ the HF side
def megatron_param_shapes(model_cfg: Any) -> dict[tuple[str, int | None], tuple[int, ...]]:
    """(local-spec name, global layer index or None) -> unpadded full shape of every Megatron parameter of
    ``model_cfg`` at TP=1 (the vocabulary dim is ``vocab_size``, not the padded one; routed experts by their
    global index)."""
    h, d, ffn = model_cfg.hidden_size, model_cfg.head_dim, model_cfg.ffn_hidden_size
    qkv = (model_cfg.num_attention_heads + 2 * model_cfg.num_query_groups) * d
    shapes: dict[tuple[str, int | None], tuple[int, ...]] = {
        ("embedding.word_embeddings.weight", None): (model_cfg.vocab_size, h)
    }
    moe_layers = _moe_layers(model_cfg)
    for i in range(model_cfg.num_layers):
        layer: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (h,),
            "self_attention.linear_qkv.weight": (qkv, h),
            "self_attention.linear_proj.weight": (h, model_cfg.num_attention_heads * d),
            "pre_mlp_layernorm.weight": (h,),
        }
        if moe_layers[i]:
            layer.update(_moe_shapes(model_cfg))
        else:
            layer.update({"mlp.linear_fc1.weight": (2 * ffn, h), "mlp.linear_fc2.weight": (h, ffn)})
        if model_cfg.add_qkv_bias:
            layer["self_attention.linear_qkv.bias"] = (qkv,)
        if model_cfg.qk_layernorm:
            layer["self_attention.q_layernorm.weight"] = (d,)
            layer["self_attention.k_layernorm.weight"] = (d,)
        for n, s in layer.items():
            shapes[(n, i)] = s
    shapes[("decoder.final_layernorm.weight", None)] = (h,)
    if not model_cfg.tie_embeddings:
        shapes[("output_layer.weight", None)] = (model_cfg.vocab_size, h)
    return shapes


def _moe_layers(model_cfg: Any) -> list[bool]:
    """Per layer, whether it is a Mixture-of-Experts layer (all False for a dense ModelConfig)."""
    layers = getattr(model_cfg, "moe_layers", None)
    return layers() if layers is not None else [False] * model_cfg.num_layers


def _moe_shapes(model_cfg: Any) -> dict[str, tuple[int, ...]]:
    """Layer-local name -> full shape of the MLP parameters of one MoE layer (router, every routed expert by
    global index, the shared expert and its gate when the config has them)."""
    h, experts, width = model_cfg.hidden_size, model_cfg.num_experts, model_cfg.expert_ffn_hidden_size
    out: dict[str, tuple[int, ...]] = {"mlp.router.weight": (experts, h)}
    for e in range(experts):
        out[f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = (2 * width, h)
        out[f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = (h, width)
    shared = getattr(model_cfg, "moe_shared_expert_intermediate_size", None)
    if shared:
        out["mlp.shared_experts.linear_fc1.weight"] = (2 * shared, h)
        out["mlp.shared_experts.linear_fc2.weight"] = (h, shared)
        if model_cfg.moe_shared_expert_gate:
            out["mlp.shared_experts.gate_weight"] = (1, h)
    return out


def expected_hf_shapes(model_cfg: Any) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a Hugging Face checkpoint of ``model_cfg`` holds (a tied
    ``lm_head.weight`` is not listed: transformers does not save it, and it is ignored when present).

    Raises KeyError if the family's table lacks a tensor the config implies (e.g. QKV biases on Llama)."""
    out: dict[str, tuple[int, ...]] = {}
    H, G, d = model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.head_dim
    for (name, layer), shape in megatron_param_shapes(model_cfg).items():
        rule = rule_for(name, layer, model_cfg.family)
        names = list(hf_names(name, layer, model_cfg)) if layer is not None else [rule.hf[0]]
        if rule.kind == "qkv":
            rest = shape[1:]
            out.update(zip(names, [(H * d, *rest), (G * d, *rest), (G * d, *rest)]))
        elif rule.kind == "fc1":
            out.update({n: (shape[0] // 2, *shape[1:]) for n in names})
        else:
            out[names[0]] = shape
    return out


# --------------------------------------------------------------- transformers' fused in-memory experts
_FUSED_HF = re.compile(r"^model\.layers\.(\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)$")


def fused_hf_names(name: str, model_cfg: Any) -> list[str] | None:
    """The per-expert (on-disk) HF names that transformers' in-memory tensor ``name`` stands for, in expert
    order (``[gate_0, up_0, gate_1, up_1, ...]`` for ``gate_up_proj``); None when ``name`` is not such a
    tensor of this family (every per-expert or dense name)."""
    m = _FUSED_HF.match(name)
    if m is None or not getattr(model_cfg, "num_experts", 0):
        return None
    i, what = int(m.group(1)), m.group(2)
    if i >= model_cfg.num_layers or not _moe_layers(model_cfg)[i]:
        return None
    mixtral = model_cfg.family == "mixtral"
    if what == "gate.weight":  # Qwen's router name is already the on-disk one; Mixtral's moves
        return [f"model.layers.{i}.block_sparse_moe.gate.weight"] if mixtral else None
    base = f"model.layers.{i}.block_sparse_moe.experts" if mixtral else f"model.layers.{i}.mlp.experts"
    parts = (
        (("w1", "w3") if mixtral else ("gate_proj", "up_proj"))
        if what.endswith("gate_up_proj")
        else (("w2",) if mixtral else ("down_proj",))
    )
    return [f"{base}.{e}.{p}.weight" for e in range(model_cfg.num_experts) for p in parts]


def fused_hf_shape(name: str, model_cfg: Any) -> tuple[int, ...]:
    """The shape transformers gives the fused tensor ``name`` (see :func:`fused_hf_names`) under ``model_cfg``:
    gate_up_proj [E, 2*I, h], down_proj [E, h, I], Mixtral's in-memory router [E, h]."""
    h, experts, width = model_cfg.hidden_size, model_cfg.num_experts, model_cfg.expert_ffn_hidden_size
    if name.endswith("gate_up_proj"):
        return (experts, 2 * width, h)
    if name.endswith("down_proj"):
        return (experts, h, width)
    return (experts, h)


def split_fused_hf(name: str, tensor: torch.Tensor, model_cfg: Any) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) as the per-expert (on-disk) HF tensors: views of ``tensor`` when ``name`` is one of
    transformers' fused in-memory expert tensors (``gate_up_proj`` [E, 2*I, h] -> gate [I, h] and up
    [I, h] per expert; ``down_proj`` [E, h, I] -> down [h, I]), else ``[(name, tensor)]`` unchanged.

    Raises ValueError naming both numbers when a fused tensor holds another number of experts than the
    config, and naming both shapes for any other shape mismatch."""
    names = fused_hf_names(name, model_cfg)
    if names is None:
        return [(name, tensor)]
    want = fused_hf_shape(name, model_cfg)
    got = tuple(tensor.shape)
    if len(got) == len(want) and got[0] != want[0] and len(want) == 3:
        raise ValueError(
            f"HF tensor {name!r} holds {got[0]} experts (shape {list(got)}), the config has num_experts={want[0]}"
        )
    if got != want:
        raise ValueError(f"HF tensor {name!r} has shape {list(got)}, the config implies {list(want)}")
    if len(names) == 1:  # Mixtral's router
        return [(names[0], tensor)]
    if name.endswith("gate_up_proj"):
        width = want[1] // 2
        views = [t for e in range(want[0]) for t in (tensor[e, :width], tensor[e, width:])]
    else:
        views = list(tensor.unbind(0))
    return list(zip(names, views))


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
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        cfg["use_sliding_window"] = False
    if family in ("qwen3", "qwen3_moe", "mixtral"):
        cfg["attention_bias"] = False
    if getattr(model_cfg, "num_experts", 0):
        cfg.update(_hf_moe_config(model_cfg))
    if model_cfg.rope_scaling_factor is not None:
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": model_cfg.rope_scaling_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    cfg.update(extra)
    return cfg


def _hf_moe_config(model_cfg: Any) -> dict:
    """The Mixture-of-Experts keys of config.json for a Qwen3-MoE / Qwen2-MoE / Mixtral ModelConfig.

    Raises ValueError for a combination the Hugging Face class cannot express (a shared expert outside
    Qwen2-MoE, Qwen2-MoE without its gated shared expert, Mixtral with dense layers or pre-softmax routing)."""
    family, layers = model_cfg.family, model_cfg.moe_layers()
    shared, gate = model_cfg.moe_shared_expert_intermediate_size, model_cfg.moe_shared_expert_gate
    if family == "qwen2_moe" and not (shared and gate):
        raise ValueError(
            "Qwen2-MoE always has a shared expert with a sigmoid gate: set "
            "model.moe_shared_expert_intermediate_size and model.moe_shared_expert_gate"
        )
    if family != "qwen2_moe" and shared:
        raise ValueError(f"model.moe_shared_expert_intermediate_size: {HF_ARCHITECTURES[family]} has no shared expert")
    if family == "mixtral":
        if not all(layers) or model_cfg.moe_router_pre_softmax:
            raise ValueError(
                "Mixtral has a MoE block in every layer and renormalizes the top-k weights: "
                "model.moe_layer_freq and model.moe_router_pre_softmax must keep their defaults"
            )
        # Mixtral's intermediate_size is the expert width (it has no dense MLP).
        return {
            "num_local_experts": model_cfg.num_experts,
            "num_experts_per_tok": model_cfg.moe_router_topk,
            "intermediate_size": model_cfg.expert_ffn_hidden_size,
            "sliding_window": None,
            "output_router_logits": False,
        }
    out = {
        "num_experts": model_cfg.num_experts,
        "num_experts_per_tok": model_cfg.moe_router_topk,
        "moe_intermediate_size": model_cfg.expert_ffn_hidden_size,
        # norm_topk_prob: renormalized top-k weights = Megatron's default (softmax over the top-k logits).
        "norm_topk_prob": not model_cfg.moe_router_pre_softmax,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, moe in enumerate(layers) if not moe],
        "output_router_logits": False,
    }
    if family == "qwen2_moe":
        out.update(shared_expert_intermediate_size=shared, qkv_bias=bool(model_cfg.add_qkv_bias))
    return out
