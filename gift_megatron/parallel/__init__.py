"""Layer 2: vocab-parallel log-probs, context-parallel reductions, cross-rank group statistics, and the CPU
runtime that lets Megatron-Core run without CUDA. Imports no Megatron module at import time."""

from gift_megatron.objectives.groups import GroupStats, group_statistics
from gift_megatron.parallel.context import (
    context_parallel_sequence_sum,
    context_parallel_token_count,
    zigzag_gather,
    zigzag_split,
)
from gift_megatron.parallel.cpu_runtime import (
    destroy_model_parallel_cpu,
    enable_cpu_runtime,
    initialize_model_parallel_cpu,
)
from gift_megatron.parallel.logprobs import vocab_parallel_logprobs

__all__ = [
    "GroupStats",
    "context_parallel_sequence_sum",
    "context_parallel_token_count",
    "destroy_model_parallel_cpu",
    "enable_cpu_runtime",
    "group_statistics",
    "initialize_model_parallel_cpu",
    "vocab_parallel_logprobs",
    "zigzag_gather",
    "zigzag_split",
]
