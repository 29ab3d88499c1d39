"""What saving and loading need because of how Megatron-Core (0.16.1, 0.19.2) and Transformer Engine behave.

- Optimizers: Megatron's optimizer may be a chain of sub-optimizers; a fresh distributed optimizer has no
  state for Megatron's sharded state dict to read, and on the torch-optimizer path Megatron restores a
  wrong per-parameter step.
- RNG: every rank's RNG states, one ShardedObject per global rank (Megatron's tracker streams differ per
  TP rank).
- Extra state (``_extra_state``, Transformer Engine's FP8 metadata): a local-spec checkpoint has none for
  TE's norms, and some TE modules keep extra state that their sharded state dict leaves out.

Each function says why it exists. Megatron-Core is imported when a function is called.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gift_megatron.device import use_cuda
from gift_megatron.megatron.checkpoint.manifest import CheckpointError, preview

__all__ = [
    "RNG_KEY",
    "allocate_distributed_optimizer_state",
    "is_distributed_optimizer",
    "keep_missing_extra_state",
    "load_module_state",
    "log_kept_extra_state",
    "optimizer_info",
    "optimizer_kind",
    "optimizer_steps",
    "restore_distributed_optimizer_steps",
    "rng_sharded_object",
    "rng_state",
    "saved_object_keys",
    "set_rng_state",
    "sub_optimizers",
]

# The package's logger, as before the split into modules: users (and tests) filter on this name.
logger = logging.getLogger("gift_megatron.megatron.checkpoint")

#: The checkpoint entry holding every rank's RNG states.
RNG_KEY = "gift_rng_state"
# torch's state-dict suffix for Module.get_extra_state; Megatron saves such entries as ShardedObjects.
_EXTRA_STATE = "_extra_state"


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------


def sub_optimizers(optimizer: Any) -> list[Any]:
    """The optimizers ``optimizer`` is made of: a ``ChainedOptimizer``'s parts, else ``[optimizer]``."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def is_distributed_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` (or one of its sub-optimizers) is Megatron's DistributedOptimizer."""
    if optimizer is None:
        return False
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(sub, DistributedOptimizer) for sub in sub_optimizers(optimizer))


def optimizer_kind(optimizer: Any) -> str | None:
    """``"distributed"`` or ``"non-distributed"``, as the manifest names them; None without an optimizer."""
    if optimizer is None:
        return None
    return "distributed" if is_distributed_optimizer(optimizer) else "non-distributed"


def optimizer_info(optimizer: Any, sharding_type: str) -> dict[str, Any] | None:
    """The manifest's record of ``optimizer``: its kind, the distributed optimizer's format and the classes
    of its sub-optimizers; None without an optimizer."""
    if optimizer is None:
        return None
    distributed = is_distributed_optimizer(optimizer)
    return {
        "kind": "distributed" if distributed else "non-distributed",
        "sharding_type": sharding_type if distributed else None,
        "classes": [type(sub).__name__ for sub in sub_optimizers(optimizer)],
    }


def optimizer_steps(optimizer: Any) -> list[float | None]:
    """Per sub-optimizer: the step count torch's optimizers keep per parameter (None if absent or uneven).

    Saved next to the optimizer state for :func:`restore_distributed_optimizer_steps`."""
    steps: list[float | None] = []
    for sub in sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        values = {
            float(s["step"])
            for s in getattr(inner, "state", {}).values()
            if isinstance(s, dict) and torch.is_tensor(s.get("step"))
        }
        steps.append(values.pop() if len(values) == 1 else None)
    return steps


def allocate_distributed_optimizer_state(optimizer: Any) -> None:
    """Give a fresh distributed optimizer the state Megatron's loading path expects to exist.

    Why: without TE/Apex (e.g. on CPU) the distributed optimizer wraps torch's Adam, whose state
    (moments and a per-parameter ``step``) appears only at its first step, while
    ``DistributedOptimizer.sharded_state_dict`` reads that state and asserts on the steps (megatron-core
    0.16, 0.19). Zeros and step 0 are allocated where state is missing: exactly what torch's Adam would
    create at its first step, so training is unchanged; loading overwrites them.
    """
    from megatron.core.optimizer import distrib_optimizer

    for sub in sub_optimizers(optimizer):
        if not isinstance(sub, distrib_optimizer.DistributedOptimizer):
            continue
        inner = sub.optimizer
        params = [p for group in inner.param_groups for p in group["params"]]
        if all(len(inner.state.get(p, {})) for p in params):
            continue
        init_state_fn = getattr(sub, "init_state_fn", None)
        if init_state_fn is not None:
            init_state_fn(inner, sub.config)
        if not distrib_optimizer.HAVE_APEX_OR_TE:
            # torch's Adam keeps a non-capturable ``step`` as a CPU scalar tensor, whatever the params' device.
            for p in params:
                inner.state[p].setdefault("step", torch.tensor(0.0, device="cpu"))


def restore_distributed_optimizer_steps(optimizer: Any, saved_steps: list[float | None] | None) -> None:
    """Set every parameter's step of a distributed optimizer's torch optimizer to the saved value.

    Why: on the torch-optimizer path (no TE/Apex) megatron-core 0.16 and 0.19 restore a wrong step: the
    'dp_reshardable' format does not store torch's per-parameter step and loading copies the placeholder
    back, and all parameters are given one shared step tensor, which torch's Adam then increments once per
    parameter per step. Adam's bias correction depends on the step, so the resumed run would diverge.
    """
    if not saved_steps:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = sub_optimizers(optimizer)
    if len(subs) != len(saved_steps):
        return
    for sub, step in zip(subs, saved_steps):
        if not isinstance(sub, DistributedOptimizer) or step is None:
            continue
        for state in sub.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                old = state["step"]
                state["step"] = torch.tensor(step, dtype=old.dtype, device=old.device)


# --------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This rank's RNG states: python, numpy, torch CPU, CUDA (if in use) and Megatron's tracker."""
    cuda = None
    if use_cuda() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state()
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "tracker": _rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states :func:`rng_state` captured (on the rank that captured them)."""
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and use_cuda():
        torch.cuda.set_rng_state(state["cuda"])
    _rng_tracker().set_states(state["tracker"])


def _rng_tracker() -> Any:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    # Typed Optional in Megatron; it creates the tracker on first use, so None would be a Megatron change.
    if tracker is None:
        raise RuntimeError("megatron.core.tensor_parallel.get_cuda_rng_tracker() returned None")
    return tracker


def rng_sharded_object(state: dict[str, Any]) -> Any:
    """One shard per global rank: every rank's states are kept (TP ranks' tracker streams differ, and
    python/numpy states may differ per rank)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(RNG_KEY, state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


# --------------------------------------------------------------------------------------------------
# Extra state (Transformer Engine)
# --------------------------------------------------------------------------------------------------


def saved_object_keys(path: str) -> tuple[set[str], list[str]]:
    """(keys of every ShardedObject stored in the checkpoint at ``path``, problems reading them).

    Read from Megatron's own index of the checkpoint (the torch_dist ``.metadata`` file, which every rank
    reads again when loading), so checkpoints written before the manifest recorded a spec are covered too.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    try:
        metadata = load_sharded_metadata(path)
    except Exception as exc:
        return set(), [f"Megatron's checkpoint metadata is unreadable: {type(exc).__name__}: {exc}"]
    return {value.key for value in metadata.values() if isinstance(value, ShardedObject)}, []


def keep_missing_extra_state(sharded_state_dict: dict[str, Any], saved_objects: set[str]) -> list[str]:
    """Replace, in place, each ``_extra_state`` ShardedObject the checkpoint lacks by Megatron's
    LocalNonpersistentObject holding the model's current value; return their checkpoint keys.

    Why: Megatron's reader fails on a requested key the checkpoint does not have, but a local-spec checkpoint
    has no counterpart for Transformer Engine's norm extra state (FP8 metadata, not weights). A
    LocalNonpersistentObject is handed back unchanged by ``dist_checkpointing.load``, so
    ``load_state_dict`` gives each module the extra state it already has.
    """
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject

    kept = []
    for name, value in sharded_state_dict.items():
        if isinstance(value, ShardedObject) and value.key.endswith(_EXTRA_STATE) and value.key not in saved_objects:
            sharded_state_dict[name] = LocalNonpersistentObject(value.data)
            kept.append(value.key)
    return kept


def log_kept_extra_state(path: str, specs: dict[str, str | None], kept: list[str]) -> None:
    """Say which extra state kept its value: expected across specs, suspicious within one (call on one
    rank)."""
    if not kept:
        return
    saved, model = specs["checkpoint"], specs["model"]
    keys = preview(sorted(set(kept)))
    if saved == model:
        logger.warning(
            "checkpoint %s was saved by a %r model like this one but lacks extra state (FP8 "
            "scaling metadata) that keeps its initial value, so a resume is not exact: %s",
            path,
            saved,
            keys,
        )
    else:
        logger.info(
            "checkpoint %s (spec %s) into a %r model: extra state it has no counterpart for keeps its "
            "initial value: %s",
            path,
            saved or "not recorded",
            model,
            keys,
        )


def load_module_state(module: Any, state: dict[str, Any], strict: bool, path: str) -> None:
    """``module.load_state_dict(state)``; ``_extra_state`` entries the module has but ``state`` lacks keep
    their values, also when strict.

    Why: some modules put extra state into their torch state dict that their sharded state dict leaves out
    (Transformer Engine's DotProductAttention: Megatron's ``TEDotProductAttention.sharded_state_dict`` saves
    nothing without a learnable softmax offset, megatron-core 0.16 and 0.19), so a strict
    ``load_state_dict`` would name them as missing although nothing was lost (TE's own load hook drops
    them the same way). Every other missing or unexpected key was ruled out before reading; one that
    appears here is reported, naming the keys.
    """
    result = module.load_state_dict(state, strict=False)
    if not strict:
        return
    missing = [k for k in result.missing_keys if not k.endswith(_EXTRA_STATE)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(
            f"loading checkpoint {path} into the model: missing keys {preview(missing)}; "
            f"unexpected keys {preview(unexpected)}"
        )
