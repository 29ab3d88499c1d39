"""The dry run of a recipe's layout: the parallel layout of a :class:`~gift_megatron.config.TrainConfig` on a
number of ranks and a per-GPU memory plan of the trainer and the colocated vLLM engine (``gift-megatron validate
--world-size N``; docs/cluster.md explains the arithmetic).

Arithmetic on the config alone (no GPU, no Megatron-Core or vLLM import), so a login node can check a recipe
before anything is submitted. :func:`~gift_megatron.config.check_world_size`, which the trainer runs too, stays
in :mod:`gift_megatron.config`.
"""

from __future__ import annotations

from typing import Any

from gift_megatron.config import ConfigError, TrainConfig, check_world_size, offload_enabled
from gift_megatron.megatron.model import ModelConfig

#: What PyTorch reports for an H100 80 GB (81559 MiB): the default GPU of the memory plan.
H100_GPU_GIB = 79.6
#: Kept free on every GPU: the trainer's and the engine process's CUDA contexts, NCCL buffers, allocator
#: fragmentation (docs/cluster.md: 3-6 GB).
CONTEXT_RESERVE_GIB = 4.0
#: vLLM's offline (LLM class) defaults on H100/H200 (vllm/engine/arg_utils.py, 0.32): the profile run that
#: sizes its activations uses this many batched tokens and sequences.
VLLM_PROFILE_TOKENS = 16384
VLLM_PROFILE_SEQS = 1024
_GIB = 1024**3


def _micro_batch_tokens(cfg: TrainConfig) -> int:
    """The most tokens one micro-batch computes: its token budget, or rows x model.seq_length."""
    t = cfg.train
    return (
        t.micro_batch_tokens if t.micro_batch_tokens is not None else (t.micro_batch_size or 4) * cfg.model.seq_length
    )


def _activation_bytes(cfg: TrainConfig) -> float:
    """Bytes of activations the backward pass keeps for one micro-batch on one GPU (docs/cluster.md): per
    token and layer, the attention block keeps norm input and output, Q, K, V and the attention output, the
    MLP norm input and output, the gate/up output (2 f) and the SwiGLU output (f), in the training dtype;
    split over TP (sequence parallel) and CP. Under 1F1B the first stage holds up to PP micro-batches of L/PP
    layers, so PP does not shrink it."""
    m, p = cfg.model, cfg.parallel
    q, kv = m.num_attention_heads * m.head_dim, 2 * m.num_query_groups * m.head_dim
    attention = 2 * m.hidden_size + 2 * q + kv
    dense_mlp = 2 * m.hidden_size + 3 * m.ffn_hidden_size
    # An MoE layer keeps, per token: the norm input and output, the router's fp32 logits and probabilities
    # (2 x 2 E values in the training dtype's units), and for each of its top-k experts the dispatched copy of
    # the token (h), the expert's gate/up (2 f_e) and SwiGLU (f_e) outputs and its output (h); plus the shared
    # expert's 3 f_s. Averaged over ranks: the all-to-all moves tokens, balanced routing keeps the count.
    moe_mlp = (
        2 * m.hidden_size
        + 4 * m.num_experts
        + m.moe_router_topk * (2 * m.hidden_size + 3 * m.expert_ffn_hidden_size)
        + 3 * (m.moe_shared_expert_intermediate_size or 0)
    )
    per_layer = sum(attention + (moe_mlp if moe else dense_mlp) for moe in m.moe_layers())
    dtype_bytes = 4 if cfg.precision.dtype == "fp32" else 2
    tokens = _micro_batch_tokens(cfg)
    return tokens * per_layer * dtype_bytes / (p.tensor_model_parallel_size * p.context_parallel_size)


def routed_expert_parameters(m: ModelConfig) -> int:
    """Parameters of the routed experts (sharded over expert parallel x expert tensor parallel ranks; the rest
    of the model is sharded over tensor parallel ranks). 0 for a dense model."""
    return sum(m.moe_layers()) * m.num_experts * 3 * m.hidden_size * m.expert_ffn_hidden_size


def _engine_plan(cfg: TrainConfig, gpu_gib: float) -> dict[str, Any]:
    """Per-GPU memory of one vLLM engine (rollout TP ``r``): weights / r; activations of vLLM's profile run
    (VLLM_PROFILE_TOKENS tokens through one layer's widest tensors, plus fp32 logits and log-probs of
    VLLM_PROFILE_SEQS sequences); the KV cache, which is what remains of ``gpu_memory_utilization`` x the GPU
    (or ``kv_cache_bytes``); and the tokens that KV cache holds."""
    m, r = cfg.model, cfg.rollout
    rtp = r.tensor_parallel_size
    dtype_bytes = 4 if cfg.precision.dtype == "fp32" else 2
    weights = m.parameter_count() * dtype_bytes / rtp / _GIB
    q, kv = m.num_attention_heads * m.head_dim, 2 * m.num_query_groups * m.head_dim
    # MoE: vLLM's fused-MoE kernel holds top-k expert intermediates per token (its experts are TP-sharded too).
    mlp = m.moe_router_topk * 3 * m.expert_ffn_hidden_size if m.is_moe else 3 * m.ffn_hidden_size
    per_token = 4 * m.hidden_size + (q + kv + mlp) / rtp
    activations = (
        VLLM_PROFILE_TOKENS * per_token * dtype_bytes + VLLM_PROFILE_SEQS * m.padded_vocab_size(rtp) / rtp * 4 * 2
    ) / _GIB
    kv_heads_per_gpu = max(m.num_query_groups // rtp, 1)  # vLLM replicates KV heads when rtp > their count
    kv_token_bytes = 2 * m.num_layers * kv_heads_per_gpu * m.head_dim * dtype_bytes
    if r.kv_cache_bytes is not None:
        kv_gib = r.kv_cache_bytes / _GIB
        engine = weights + activations + kv_gib
    else:
        engine = r.gpu_memory_utilization * gpu_gib
        kv_gib = engine - weights - activations
    return {
        "rollout_weights_gib": weights,
        "rollout_activations_gib": activations,
        "rollout_kv_cache_gib": kv_gib,
        "rollout_kv_bytes_per_token": kv_token_bytes,
        "rollout_kv_tokens": max(int(kv_gib * _GIB // kv_token_bytes), 0),
        "rollout_engine_gib": engine,
    }


def layout_plan(
    cfg: TrainConfig,
    world_size: int,
    gpu_memory_gib: float = H100_GPU_GIB,
    gpus_per_node: int | None = None,
    check_memory: bool = True,
) -> dict[str, Any]:
    """The parallel layout of ``cfg`` on ``world_size`` ranks and a per-GPU memory plan (GiB), the dry run
    of a recipe (``gift-megatron validate --world-size N``; the arithmetic is explained in docs/cluster.md).

    Trainer: Megatron's mixed-precision layout (bf16/fp16 weights, fp32 gradient buffers, fp32 main weights +
    two Adam moments = 12 bytes a parameter, sharded over data-parallel ranks by the distributed optimizer),
    the activations of one micro-batch and its logits: the training peak.

    vLLM engine (``rollout.engine`` vllm or auto), on its replica's first ``rollout.tensor_parallel_size``
    GPUs (``gpus_per_node`` default: min(world, 8)): its weights, activations, KV cache and budget, and what
    the trainer holds on those GPUs while the engine is awake: its weights only with
    ``rollout.offload_training_states`` (default on here: the engine shares the GPUs), all its states without.
    With ``check_memory``, a budget that leaves the trainer too little memory (or the engine no KV cache) is
    a ConfigError naming the key; CONTEXT_RESERVE_GIB stays free on every GPU.
    """
    gpus_per_node = gpus_per_node or min(world_size, 8)
    dp = check_world_size(cfg, world_size, gpus_per_node=gpus_per_node)
    p, m = cfg.parallel, cfg.model
    # Routed experts are split over EP x ETP (x PP) and their optimizer state over the expert data-parallel
    # ranks world / (ETP x EP x PP); everything else over TP (x PP) and DP, as in Megatron.
    experts = routed_expert_parameters(m)
    tp_pp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    expert_split = p.etp * p.expert_model_parallel_size * p.pipeline_model_parallel_size
    dense_shard, expert_shard = (m.parameter_count() - experts) / tp_pp, experts / expert_split
    shard = dense_shard + expert_shard
    weight_bytes = 4 if cfg.precision.dtype == "fp32" else 2
    distributed = cfg.optimizer.use_distributed_optimizer
    optim_ranks = dp if distributed else 1
    expert_optim_ranks = world_size // expert_split if distributed else 1
    plan: dict[str, Any] = {
        "world_size": world_size,
        "gpus_per_node": min(gpus_per_node, world_size),
        "gpu_memory_gib": gpu_memory_gib,
        "tp": p.tensor_model_parallel_size,
        "pp": p.pipeline_model_parallel_size,
        "cp": p.context_parallel_size,
        "dp": dp,
        "parameters_b": m.parameter_count() / 1e9,
    }
    if m.is_moe:
        plan.update(
            {
                "ep": p.expert_model_parallel_size,
                "etp": p.etp,
                "expert_dp": world_size // expert_split,
                "active_parameters_b": m.active_parameter_count() / 1e9,
                "expert_parameters_per_gpu_b": expert_shard / 1e9,
            }
        )
    plan.update(
        {
            "weights_gib": shard * weight_bytes / _GIB,
            "grads_gib": shard * 4 / _GIB,
            "optimizer_gib": (dense_shard * 12 / optim_ranks + expert_shard * 12 / expert_optim_ranks) / _GIB,
        }
    )
    from gift_megatron.objectives import build_objective

    if "ref_logp" in build_objective(cfg.objective.name, **cfg.objective.options).uses:
        plan["reference_gib_offloaded_between_passes"] = shard * weight_bytes / _GIB
    plan["train_states_gib"] = plan["weights_gib"] + plan["grads_gib"] + plan["optimizer_gib"]
    plan["activations_gib"] = _activation_bytes(cfg) / _GIB
    plan["logits_gib"] = (
        _micro_batch_tokens(cfg)
        * m.padded_vocab_size(p.tensor_model_parallel_size)
        * 2
        / p.tensor_model_parallel_size
        / p.context_parallel_size
        / _GIB
    )
    plan["train_peak_gib"] = plan["train_states_gib"] + plan["activations_gib"] + plan["logits_gib"]
    plan["reserve_gib"] = CONTEXT_RESERVE_GIB
    if cfg.rollout.engine not in ("auto", "vllm"):
        return plan

    r = cfg.rollout
    from gift_megatron.rollout.placement import check_layout

    local = check_layout(
        world_size,
        plan["gpus_per_node"],
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
        r.tensor_parallel_size,
    )
    offload = offload_enabled(cfg, cuda=True)
    plan["rollout_tp"] = r.tensor_parallel_size
    plan["rollout_gpus_of_first_replica"] = ",".join(local)
    plan.update(_engine_plan(cfg, gpu_memory_gib))
    plan["offload_training_states"] = offload
    plan["awake_trainer_gib_with_offload"] = plan["weights_gib"]
    plan["awake_trainer_gib_without_offload"] = plan["train_states_gib"]
    plan["generation_peak_gib_with_offload"] = plan["weights_gib"] + plan["rollout_engine_gib"]
    plan["generation_peak_gib_without_offload"] = plan["train_states_gib"] + plan["rollout_engine_gib"]
    plan["generation_peak_gib"] = plan[
        "generation_peak_gib_with_offload" if offload else "generation_peak_gib_without_offload"
    ]
    # The engine asleep frees its weights and KV cache (both levels); awake through training it holds it all.
    plan["training_peak_gib_with_engine"] = plan["train_peak_gib"] + (
        0.0 if r.sleep_during_training else plan["rollout_engine_gib"]
    )
    if check_memory:
        _check_memory_plan(cfg, plan)
    return plan


def _check_memory_plan(cfg: TrainConfig, plan: dict[str, Any]) -> None:
    r = cfg.rollout
    gpu, reserve = plan["gpu_memory_gib"], plan["reserve_gib"]
    budget_key = "rollout.kv_cache_bytes" if r.kv_cache_bytes is not None else "rollout.gpu_memory_utilization"
    budget = (
        f"rollout.kv_cache_bytes={r.kv_cache_bytes}"
        if r.kv_cache_bytes is not None
        else f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} ({plan['rollout_engine_gib']:.1f} GiB of a "
        f"{gpu:.1f} GiB GPU)"
    )
    if plan["rollout_kv_cache_gib"] <= 0 or plan["rollout_kv_tokens"] < cfg.model.seq_length:
        raise ConfigError(
            f"{budget} leaves the vLLM engine {max(plan['rollout_kv_cache_gib'], 0):.1f} GiB of KV cache "
            f"({plan['rollout_kv_tokens']} tokens, fewer than one model.seq_length={cfg.model.seq_length} sequence) "
            f"after its weights ({plan['rollout_weights_gib']:.1f} GiB at rollout.tensor_parallel_size="
            f"{r.tensor_parallel_size}) and activations ({plan['rollout_activations_gib']:.1f} GiB): raise {budget_key}"
        )
    awake = plan["generation_peak_gib"]
    if awake + reserve > gpu:
        held = (
            "its weights"
            if plan["offload_training_states"]
            else "weights, gradient buffers and optimizer state (rollout.offload_training_states is off)"
        )
        raise ConfigError(
            f"{budget} leaves the trainer too little memory while the engine is awake: the trainer holds {held}, "
            f"{awake - plan['rollout_engine_gib']:.1f} GiB, the engine {plan['rollout_engine_gib']:.1f} GiB, plus "
            f"{reserve:.0f} GiB of CUDA contexts and buffers = {awake + reserve:.1f} GiB > {gpu:.1f} GiB per GPU: "
            f"lower {budget_key}"
            + ("" if plan["offload_training_states"] else " or set rollout.offload_training_states=true")
        )
    if not r.sleep_during_training and plan["training_peak_gib_with_engine"] + reserve > gpu:
        raise ConfigError(
            f"rollout.sleep_during_training=false keeps the engine's {plan['rollout_engine_gib']:.1f} GiB ({budget}) "
            f"on the GPU while the trainer peaks at {plan['train_peak_gib']:.1f} GiB: "
            f"{plan['training_peak_gib_with_engine'] + reserve:.1f} GiB with {reserve:.0f} GiB of contexts > "
            f"{gpu:.1f} GiB per GPU: set rollout.sleep_during_training=true or lower {budget_key}"
        )
