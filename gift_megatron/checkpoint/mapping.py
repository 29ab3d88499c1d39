"""Megatron-Core GPTModel <-> Hugging Face names and layouts for the dense families (Llama, Qwen2, Qwen3).

One table per family: Megatron parameter suffix -> Hugging Face name template. The three families share
the Llama layout; Qwen2 adds Q/K/V biases, Qwen3 adds RMSNorms on queries and keys. Two Megatron tensors
are fused and need a layout conversion, both done on full (TP-gathered) tensors:

- ``linear_qkv`` (weight [G * (H/G + 2) * d, h], bias likewise): grouped per query group, each group
  ``[its H/G query heads; its key head; its value head]``, groups in order. HF keeps q, k, v apart.
- ``linear_fc1`` ([2 * ffn, h]): each TP rank holds ``[gate shard; up shard]``, so the TP-gathered tensor
  is ``[gate_0; up_0; gate_1; up_1; ...]``: converting needs the TP size the tensor was gathered from.

With the Transformer Engine spec the layer norms are fused into the next linear layer
(``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); both spellings are mapped.
"""

from __future__ import annotations

import torch

_COMMON = {
    "input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "model.layers.{i}.input_layernorm.weight",
    "self_attention.linear_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "model.layers.{i}.post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "model.layers.{i}.mlp.down_proj.weight",
}
FAMILY_TABLES = {
    "llama": dict(_COMMON),
    "qwen2": dict(_COMMON),
    "qwen3": {
        **_COMMON,
        "self_attention.q_layernorm.weight": "model.layers.{i}.self_attn.q_norm.weight",
        "self_attention.k_layernorm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    },
}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
TOP_LEVEL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def split_qkv(fused: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Grouped ``linear_qkv`` weight [G*(H/G+2)*d, h] (or bias [G*(H/G+2)*d]) -> (q [H*d, ...], k, v)."""
    per = num_heads // num_groups
    x = fused.reshape(num_groups, per + 2, head_dim, *fused.shape[1:])
    q = x[:, :per].reshape(num_heads * head_dim, *fused.shape[1:])
    k = x[:, per].reshape(num_groups * head_dim, *fused.shape[1:])
    v = x[:, per + 1].reshape(num_groups * head_dim, *fused.shape[1:])
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of :func:`split_qkv`."""
    per = num_heads // num_groups
    rest = q.shape[1:]
    parts = [q.reshape(num_groups, per, head_dim, *rest), k.reshape(num_groups, 1, head_dim, *rest),
             v.reshape(num_groups, 1, head_dim, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_fc1(fused: torch.Tensor, tp: int):
    """TP-gathered ``linear_fc1`` [2*ffn, h] (``[gate_r; up_r]`` per rank r) -> (gate [ffn, h], up [ffn, h])."""
    x = fused.reshape(tp, 2, fused.shape[0] // (2 * tp), *fused.shape[1:])
    return x[:, 0].reshape(-1, *fused.shape[1:]), x[:, 1].reshape(-1, *fused.shape[1:])


def fuse_fc1(gate: torch.Tensor, up: torch.Tensor, tp: int):
    """Inverse of :func:`split_fc1`: the full tensor whose TP shards are ``[gate_r; up_r]``."""
    g = gate.reshape(tp, 1, -1, *gate.shape[1:])
    u = up.reshape(tp, 1, -1, *up.shape[1:])
    return torch.cat([g, u], dim=1).reshape(-1, *gate.shape[1:])


def megatron_tensor_to_hf(name: str, full: torch.Tensor, model_cfg, tp: int, layer: int | None = None
                   ) -> list[tuple[str, torch.Tensor]]:
    """The Hugging Face tensors of one full (TP-gathered) Megatron tensor.

    name: the parameter name inside the GPTModel, with layer-local prefixes removed (``layer`` is the
    global 0-based layer index for ``decoder.layers.*`` tensors). Vocabulary padding is stripped.
    Raises KeyError for a name this family does not map.
    """
    family = model_cfg.family
    if layer is None:
        hf = TOP_LEVEL[name]
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            full = full[:model_cfg.vocab_size]
        return [(hf, full)]
    prefix = f"model.layers.{layer}.self_attn."
    if name in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = name.rsplit(".", 1)[1]
        q, k, v = split_qkv(full, model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.head_dim)
        return [(f"{prefix}q_proj.{kind}", q), (f"{prefix}k_proj.{kind}", k), (f"{prefix}v_proj.{kind}", v)]
    if name == "mlp.linear_fc1.weight":
        gate, up = split_fc1(full, tp)
        return [(f"model.layers.{layer}.mlp.gate_proj.weight", gate), (f"model.layers.{layer}.mlp.up_proj.weight", up)]
    table = FAMILY_TABLES[family]
    if name not in table:
        raise KeyError(f"family {family}: no Hugging Face name for Megatron tensor decoder.layers.N.{name}")
    return [(table[name].format(i=layer), full)]


def hf_config_dict(model_cfg, dtype: torch.dtype | str = torch.bfloat16, **extra) -> dict:
    """The ``config.json`` content of the Hugging Face model equal to ``model_cfg`` (a ModelConfig).
    ``extra`` adds or overrides keys (eos_token_id, bos_token_id, pad_token_id, ...)."""
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
        "torch_dtype": dtype_name,
    }
    if family == "llama":
        cfg["attention_bias"] = model_cfg.add_qkv_bias
        cfg["mlp_bias"] = False
    if family == "qwen2":
        cfg["use_sliding_window"] = False
    if family == "qwen3":
        cfg["attention_bias"] = False
        cfg["use_sliding_window"] = False
    if model_cfg.rope_scaling_factor is not None:
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": model_cfg.rope_scaling_factor,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
    cfg.update(extra)
    return cfg
