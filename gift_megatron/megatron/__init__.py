"""Layer 3: Megatron-Core integration, the public surface for existing Megatron training scripts.

- ``model``: typed configs and the GPTModel builder (local spec on CPU, Transformer Engine spec and FP8 on GPU);
- ``forward``: the objective's forward_step / loss_func for ``get_forward_backward_func``, forward-only passes;
- ``batching``: micro-batches of a global batch (padded rows over DP, packed rows under a token budget);
- ``step``: ``ObjectiveStep``, one optimizer step with exact group statistics;
- ``reference``: the frozen reference policy;
- ``checkpoint``: crash-safe distributed checkpoints (save, resume, reshard weights).

Importing this package imports neither Megatron-Core nor Transformer Engine; the submodules import
Megatron-Core when they are used.
"""

from gift_megatron.megatron.batching import pack_global_batch, split_global_batch, validate_micro_batches
from gift_megatron.megatron.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from gift_megatron.megatron.forward import forward_logprobs, make_forward_step
from gift_megatron.megatron.model import (
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    build_model,
    check_fp8_support,
    transformer_config,
)
from gift_megatron.megatron.reference import FrozenReference
from gift_megatron.megatron.step import ObjectiveStep, StepResult

__all__ = [
    "CheckpointError",
    "FrozenReference",
    "ModelConfig",
    "ObjectiveStep",
    "ParallelConfig",
    "PrecisionConfig",
    "StepResult",
    "build_model",
    "check_fp8_support",
    "forward_logprobs",
    "latest_checkpoint",
    "load_checkpoint",
    "make_forward_step",
    "pack_global_batch",
    "save_checkpoint",
    "split_global_batch",
    "transformer_config",
    "validate_micro_batches",
]
