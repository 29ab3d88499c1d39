"""Mixture-of-Experts pieces of the training step: router-loss scale, router metrics, micro-batch counts.

Router losses. Megatron-Core adds the router's load-balancing (aux) and z losses to the gradient inside the
backward pass (``MoEAuxLossAutoScaler``), scaled so that, with ``calculate_per_token_loss``, they come out
right when every ``loss_func`` returns count = its tokens: the router pre-multiplies each loss by its local
token count, and ``finalize_model_grads`` divides every gradient by the step's global count. Our
``loss_func`` returns count = members (``gift_megatron/megatron/step.py``), so the global count is
D = members x cp instead of T = the step's router tokens, and the router losses would be T / D (the row
length) times too strong. megatron-core 0.19 multiplies the router-loss gradient by
``config.moe_grad_scale_func()``; :class:`RouterLossScale` sets it to D / T (times the fp16 loss scale, which
that hook replaces), which restores exactly Megatron's intended scale. megatron-core 0.16 has no such hook:
there, non-zero ``model.moe_aux_loss_coeff`` / ``model.moe_z_loss_coeff`` are refused
(:func:`check_router_loss_support`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["check_router_loss_support", "has_moe_grad_scale_func"]


def has_moe_grad_scale_func() -> bool:
    """Whether the installed megatron-core lets the router-loss gradient scale be set (0.17+; not 0.16)."""
    from megatron.core.transformer import TransformerConfig

    return "moe_grad_scale_func" in {f.name for f in dataclasses.fields(TransformerConfig)}


def check_router_loss_support(model: Any) -> None:
    """Raise ValueError naming the keys when ``model`` (a ModelConfig, or anything with
    ``moe_aux_loss_coeff`` / ``moe_z_loss_coeff``) asks for router losses this megatron-core cannot scale."""
    keys = [f"model.{k}={getattr(model, k)}" for k in ("moe_aux_loss_coeff", "moe_z_loss_coeff")
            if getattr(model, k, 0) or 0]
    if keys and not has_moe_grad_scale_func():
        import megatron.core

        raise ValueError(f"{', '.join(keys)}: router losses need megatron-core >= 0.17 (its moe_grad_scale_func "
                         f"sets their gradient scale under our per-member loss normalization); the installed "
                         f"megatron-core {getattr(megatron.core, '__version__', '?')} would scale them by the "
                         "row length. Set these coefficients to 0 or upgrade megatron-core")
