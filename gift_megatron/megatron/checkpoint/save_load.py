"""``save_checkpoint`` and ``load_checkpoint``: a run's state as one Megatron ``torch_dist`` checkpoint.

The collective part of checkpointing (every rank writes and reads its shards through Megatron's
``dist_checkpointing``), and the model-state helpers that describe the model the way the manifest records
it (sharded state dicts, the global shape of every tensor, the layer spec, the parallel layout). The file
protocol is :mod:`~gift_megatron.megatron.checkpoint.publish`, the checks against the manifest
:mod:`~gift_megatron.megatron.checkpoint.manifest`, Megatron's quirks
:mod:`~gift_megatron.megatron.checkpoint.workarounds`; the package docstring describes the whole.
"""

from __future__ import annotations

import logging
import os
import pickle
import uuid
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.distributed as dist

from gift_megatron import comm
from gift_megatron.device import use_cuda
from gift_megatron.megatron.checkpoint.manifest import (
    CheckpointError,
    file_problems,
    format_problems,
    preview,
    shape_problems,
    state_problems,
    try_read_manifest,
    write_manifest,
)
from gift_megatron.megatron.checkpoint.publish import checkpoint_path, clean_up, publish, tmp_step_name
from gift_megatron.megatron.checkpoint.workarounds import (
    RNG_KEY,
    allocate_distributed_optimizer_state,
    is_distributed_optimizer,
    keep_missing_extra_state,
    load_module_state,
    log_kept_extra_state,
    optimizer_info,
    optimizer_kind,
    optimizer_steps,
    restore_distributed_optimizer_steps,
    rng_sharded_object,
    rng_state,
    saved_object_keys,
    set_rng_state,
)

__all__ = [
    "LOCAL_SPEC",
    "TE_SPEC",
    "common_state",
    "content_metadata",
    "layer_spec",
    "layout",
    "load_checkpoint",
    "model_state",
    "model_tensors",
    "runtime_metadata",
    "save_checkpoint",
]

# The package's logger, as before the split into modules: users (and tests) filter on this name.
logger = logging.getLogger("gift_megatron.megatron.checkpoint")

_SAVE_SHARDING_TYPES = ("dp_reshardable", "fully_reshardable")
# Layer specs a model can be built with (gift_megatron.megatron.model.layer_spec), as the manifest names them.
LOCAL_SPEC = "local"
TE_SPEC = "transformer_engine"
# Parameters that exist only where Transformer Engine fuses a norm into the next linear layer.
_TE_FUSED_NORM_PARAMS = (".linear_qkv.layer_norm_weight", ".linear_fc1.layer_norm_weight")


# --------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    model_chunks: Any,
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    data_state: dict | None = None,
    extra: dict | None = None,
    keep_last: int | None = None,
    distrib_optim_sharding_type: str = "dp_reshardable",
) -> str:
    """Save a resumable checkpoint of ``step`` atomically; collective over all ranks. Returns its path.

    Args:
        root: the run's checkpoint directory (created if missing; shared by all ranks).
        step: the number of optimizer steps done; the checkpoint is ``root/step_{step:08d}``.
        model_chunks: the model (a module or the list of virtual-pipeline chunks), Megatron DDP-wrapped or not.
        optimizer: Megatron's optimizer (``get_megatron_optimizer``), or None for a weights-only checkpoint.
        scheduler: Megatron's ``OptimizerParamScheduler``, or None.
        data_state: the data position (consumed samples, sampler state); picklable, the same on every rank.
        extra: anything else to keep with the checkpoint (e.g. the resolved config); picklable.
        keep_last: keep only the newest ``keep_last`` complete checkpoints up to this step (None: keep all;
            newer ones, left by a run restarted from an older checkpoint, are not deleted).
        distrib_optim_sharding_type: the distributed optimizer's format (see the package docstring).

    A checkpoint of the same step that already exists is replaced. If saving raises (on every rank, e.g. a
    full disk), the exception propagates and ``latest`` still names the previous checkpoint; a rank that
    fails alone inside Megatron's writer leaves the others waiting in its collectives until the job dies,
    as in Megatron-LM, with the same result on disk.
    """
    root = os.fspath(root)
    chunks = _as_chunks(model_chunks)
    _check_save_arguments(step, keep_last, data_state, extra)
    from megatron.core import dist_checkpointing

    distributed = is_distributed_optimizer(optimizer)
    if distributed:
        _check_sharding_type(distrib_optim_sharding_type)
    content = content_metadata(distrib_optim_sharding_type if distributed else None)
    rank = dist.get_rank()

    # One temporary name for all ranks; a fresh one per save, so a stale directory is never reused.
    token: list[str | None] = [tmp_step_name(step, uuid.uuid4().hex[:12]) if rank == 0 else None]
    comm.broadcast_objects(token, src=0)
    tmp = os.path.join(root, cast(str, token[0]))  # set by the broadcast from rank 0
    error = None
    if rank == 0:
        try:
            os.makedirs(tmp)  # Megatron writes into an existing directory
        except OSError as exc:
            error = f"cannot create {tmp}: {exc}"
    _raise_if_rank0_failed(error, root)

    state = model_state(chunks, runtime_metadata(content))
    tensors = _gather_model_tensors(state)
    if optimizer is not None:
        # A distributed optimizer that has not stepped yet (a step-0 checkpoint) has no state to save.
        allocate_distributed_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=False, metadata=runtime_metadata(content)
        )
        state["optimizer_steps"] = optimizer_steps(optimizer)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state.update(common_state(step, data_state, extra))

    dist_checkpointing.save(state, tmp, content_metadata=content)
    comm.barrier()  # every rank's shards are on disk before rank 0 declares the checkpoint complete

    final = checkpoint_path(root, step)
    if rank == 0:
        try:
            write_manifest(
                tmp,
                step=step,
                layout=layout(len(chunks)),
                chunks=len(chunks),
                tensors=tensors,
                spec=layer_spec(chunks),
                optimizer=optimizer_info(optimizer, distrib_optim_sharding_type),
                scheduler=scheduler is not None,
                content_metadata=content,
            )
            publish(root, tmp, final)
            clean_up(root, final, keep_last)
        except Exception as exc:  # reported to every rank below, so none waits for rank 0 forever
            error = f"{type(exc).__name__}: {exc}"
    _raise_if_rank0_failed(error, final)
    return final


def common_state(step: int, data_state: Any, extra: Any) -> dict[str, Any]:
    """What a checkpoint holds besides the model, optimizer and scheduler: every rank's RNG states (see
    :func:`~gift_megatron.megatron.checkpoint.workarounds.rng_sharded_object`), ``step``, ``data_state``
    and ``extra``. Needs Megatron's parallel state (the RNG tracker) and a process group."""
    return {RNG_KEY: rng_sharded_object(rng_state()), "step": step, "data_state": data_state, "extra": extra}


def _check_save_arguments(step: int, keep_last: int | None, data_state: Any, extra: Any) -> None:
    """Errors a save would otherwise hit after some ranks started writing (picklability: rank 0 alone
    writes the common state, so a failure there would leave the other ranks waiting)."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be None or an int >= 1, got {keep_last!r}")
    for name, value in (("data_state", data_state), ("extra", extra)):
        try:
            pickle.dumps(value)
        except Exception as exc:
            raise ValueError(f"{name} must be picklable: {type(exc).__name__}: {exc}") from exc


def _check_sharding_type(sharding_type: str) -> None:
    if sharding_type not in _SAVE_SHARDING_TYPES:
        hint = ""
        if sharding_type == "fully_sharded_model_space":
            hint = " (it fails in megatron-core 0.16 and 0.19 with 'ShardedTensor.flattened_range is not supported')"
        raise ValueError(
            f"distrib_optim_sharding_type must be one of {_SAVE_SHARDING_TYPES}, got {sharding_type!r}{hint}"
        )
    if sharding_type == "fully_reshardable" and not use_cuda():
        raise ValueError(
            "distrib_optim_sharding_type='fully_reshardable' gathers the optimizer state on the "
            "CUDA device (megatron-core 0.16, 0.19); without CUDA use 'dp_reshardable'"
        )


def _raise_if_rank0_failed(error: str | None, path: str) -> None:
    """Share rank 0's error (or None) with every rank; all raise together."""
    box = comm.broadcast_objects([error], src=0)
    if box[0] is not None:
        raise CheckpointError(f"saving checkpoint {path} failed on rank 0: {box[0]}")


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike[str],
    model_chunks: Any,
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    strict: bool = True,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into the model (and optimizer, scheduler); collective.

    Args:
        path: a checkpoint directory (``root/step_*``; e.g. from ``latest_checkpoint``).
        model_chunks: the model, built in any TP/PP/DP layout with the checkpoint's architecture.
        optimizer: Megatron's optimizer to restore, or None to load the weights only (with a
            mixed-precision or distributed optimizer that exists already, call its
            ``reload_model_params()`` afterwards so that its fp32 main params follow the new weights).
        scheduler: the ``OptimizerParamScheduler`` to restore, or None.
        strict: every model tensor must be in the checkpoint and every model tensor of the checkpoint in
            the model. Not strict: tensors missing from the checkpoint keep their values, extra ones are
            ignored. Shapes must match either way. ``_extra_state`` entries (Transformer Engine's FP8
            metadata) are not weights: missing ones keep their values in both modes (package docstring).
        restore_rng: restore every rank's RNG states when the layout is the saving one.

    The model may be built with the other layer spec than the checkpoint (local / Transformer Engine).

    Returns:
        ``{"step", "data_state", "extra", "path", "rng_restored", "saved_layout", "spec",
        "extra_state_not_loaded"}``: ``spec`` is ``{"checkpoint": the saving model's spec (None for a
        checkpoint from before specs were recorded), "model": this model's}``; ``extra_state_not_loaded``
        the sorted checkpoint keys of this rank's extra state that kept its value.

    Raises:
        CheckpointError: naming ``path`` and each problem, before the model or optimizer is modified,
            for a missing or incomplete checkpoint, mismatched shapes or keys, missing optimizer or
            scheduler state, or an optimizer format that cannot be loaded in this layout.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model
    from torch.distributed.checkpoint.api import CheckpointException

    path = os.fspath(path)
    chunks = _as_chunks(model_chunks)
    if not chunks:
        raise ValueError("load_checkpoint: model_chunks is empty (use verify_checkpoint to check files only)")
    manifest, problems = try_read_manifest(path)
    if not problems and _is_rank0():
        # One rank checks the files: a stat per file, which every rank of a large job need not repeat.
        problems += file_problems(path, manifest)
    this_layout = layout(len(chunks))
    model_keys: dict[str, Any] = {}
    saved_objects: set[str] = set()
    if not problems:
        model_keys = model_tensors(model_state(chunks, runtime_metadata(manifest["content_metadata"])))
        problems += shape_problems(manifest, model_keys, strict)
        problems += state_problems(manifest, this_layout, optimizer_kind(optimizer), scheduler)
        saved_objects, object_problems = saved_object_keys(path)
        problems += object_problems
    problems, all_model_keys = _gather_problems(problems, set(model_keys))
    if not problems and strict:
        unexpected = sorted(set(manifest["model"]["tensors"]) - all_model_keys)
        if unexpected:
            problems.append(
                f"{len(unexpected)} model tensor(s) of the checkpoint are not in the model (strict): "
                f"{preview(unexpected)}"
            )
    if problems:
        raise CheckpointError(format_problems(path, problems))

    runtime = runtime_metadata(manifest["content_metadata"])
    state = model_state(chunks, runtime)
    saved_tensors = manifest["model"]["tensors"]
    if not strict:
        state = {name: _drop_missing(sd, saved_tensors) for name, sd in state.items()}
    kept_extra_state: list[str] = []
    for sd in state.values():
        kept_extra_state += keep_missing_extra_state(sd, saved_objects)
    specs = {"checkpoint": manifest["model"].get("spec"), "model": layer_spec(chunks)}
    if _is_rank0():
        log_kept_extra_state(path, specs, kept_extra_state)
    model_part = dict(state)
    if optimizer is not None:
        allocate_distributed_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_part, is_loading=True, metadata=runtime)
    same_layout = manifest["layout"] == this_layout
    rng_restored = restore_rng and same_layout
    if rng_restored:
        state[RNG_KEY] = rng_sharded_object(rng_state())
    try:
        # Megatron returns (state, missing keys, unexpected keys) only for the `strict` modes that report
        # keys; the default used here returns the state dict.
        loaded = cast(dict[str, Any], dist_checkpointing.load(state, path))
    except CheckpointException as exc:
        # torch's checkpoint reader raises a BaseException (not an Exception) carrying each rank's error.
        causes = "; ".join(
            f"rank {rank}: {type(error).__name__}: {error}" for rank, (error, _) in sorted(exc.failures.items())
        )
        raise CheckpointError(f"reading checkpoint {path} failed: {causes}") from exc
    except Exception as exc:
        raise CheckpointError(f"reading checkpoint {path} failed: {type(exc).__name__}: {exc}") from exc

    for name, chunk in zip(_model_entry_names(len(chunks)), chunks):
        load_module_state(unwrap_model(chunk), loaded[name], strict, path)
    if optimizer is not None:
        # Under no_grad: with fp32 params the distributed optimizer's main params are views of the model
        # params (leaves that require grad), which copy_() refuses outside it.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        restore_distributed_optimizer_steps(optimizer, loaded.get("optimizer_steps"))
    if scheduler is not None:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if rng_restored:
        set_rng_state(loaded[RNG_KEY])
    elif restore_rng and _is_rank0():
        logger.warning(
            "checkpoint %s was saved in layout %s, this run is %s: RNG states not restored",
            path,
            manifest["layout"],
            this_layout,
        )
    return {
        "step": loaded["step"],
        "data_state": loaded.get("data_state"),
        "extra": loaded.get("extra"),
        "path": path,
        "rng_restored": rng_restored,
        "saved_layout": manifest["layout"],
        "spec": specs,
        "extra_state_not_loaded": sorted(set(kept_extra_state)),
    }


def _gather_problems(problems: list[str], model_keys: set[str]) -> tuple[list[str], set[str]]:
    """Every rank's problems (rank-tagged, deduplicated) and the union of every rank's model tensor keys."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return problems, model_keys
    gathered = comm.all_gather_objects((problems, model_keys))
    merged: list[str] = []
    keys: set[str] = set()
    for rank, (rank_problems, rank_keys) in enumerate(gathered):
        keys |= rank_keys
        for problem in rank_problems:
            if not any(problem == m.split("] ", 1)[-1] for m in merged):
                merged.append(f"[rank {rank}] {problem}")
    return merged, keys


def _drop_missing(sharded_state_dict: dict[str, Any], saved_tensors: dict[str, Any]) -> dict[str, Any]:
    """Non-strict load: leave out model tensors the checkpoint does not have (they keep their values)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return {
        name: value
        for name, value in sharded_state_dict.items()
        if not isinstance(value, (ShardedTensor, ShardedTensorFactory)) or value.key in saved_tensors
    }


# --------------------------------------------------------------------------------------------------
# Model state
# --------------------------------------------------------------------------------------------------


def _as_chunks(model_chunks: Any) -> list[Any]:
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def _model_entry_names(num_chunks: int) -> list[str]:
    """Megatron-LM's names: ``model`` for one chunk, ``model0``, ``model1``, ... for virtual pipeline chunks."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def layer_spec(chunks: Sequence[Any]) -> str:
    """The layer spec this rank's model chunks were built with: ``"transformer_engine"`` if a norm is fused
    into ``linear_qkv`` / ``linear_fc1`` (their ``layer_norm_weight``: TE's spec always builds
    ``TELayerNormColumnParallelLinear`` there), else ``"local"``.

    Why not "any module from Transformer Engine": where TE is installed Megatron builds even a local-spec
    model's final norm with TE (``TransformerBlock``'s ``LayerNormImpl``), so that would misname converter
    output written on a GPU machine. A pipeline stage without decoder layers reads as local.
    """
    from megatron.core.utils import unwrap_model

    for chunk in chunks:
        if any(name.endswith(_TE_FUSED_NORM_PARAMS) for name, _ in unwrap_model(chunk).named_parameters()):
            return TE_SPEC
    return LOCAL_SPEC


def model_state(chunks: Sequence[Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """The sharded state dict of every model chunk, under Megatron-LM's entry names (``model`` or
    ``model0``, ``model1``, ...); ``metadata`` is :func:`runtime_metadata`'s."""
    from megatron.core.utils import unwrap_model

    return {
        name: unwrap_model(chunk).sharded_state_dict(metadata=metadata)
        for name, chunk in zip(_model_entry_names(len(chunks)), chunks)
    }


def model_tensors(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """key -> {"shape": global shape, "allow_shape_mismatch"} of every model ShardedTensor of this rank in
    ``state`` (e.g. :func:`model_state`'s).

    Factories (e.g. the fused SwiGLU fc1) are built on a fresh state dict so that their tensors are seen.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    table: dict[str, dict[str, Any]] = {}
    pending: list[Any] = list(nested_values(state))
    while pending:
        value = pending.pop()
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            pending.extend(nested_values(built) if isinstance(built, (dict, list)) else [built])
        elif isinstance(value, ShardedTensor):
            table[value.key] = {
                "shape": list(value.global_shape),
                "allow_shape_mismatch": bool(value.allow_shape_mismatch),
            }
    return table


def _gather_model_tensors(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The model tensor table of all ranks (each pipeline stage has its own layers)."""
    table = model_tensors(state)
    gathered = comm.all_gather_objects(table)
    merged: dict[str, dict[str, Any]] = {}
    for part in gathered:
        merged.update(part)
    return dict(sorted(merged.items()))


def content_metadata(sharding_type: str | None) -> dict[str, Any]:
    """The (serializable) metadata that selects Megatron's sharded_state_dict formats; stored with the
    checkpoint, as Megatron-LM does, and used again at load. ``sharding_type``: the distributed optimizer's
    format, None without one."""
    metadata: dict[str, Any] = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if sharding_type is not None:
        metadata["distrib_optim_sharding_type"] = sharding_type
    return metadata


def runtime_metadata(content: dict[str, Any]) -> dict[str, Any]:
    """Content metadata plus the data-parallel group Transformer Engine layers need to build replica ids."""
    from megatron.core import parallel_state

    return {**content, "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def layout(num_chunks: int) -> dict[str, int]:
    """This run's parallel layout as the manifest records it: world size, TP, PP, CP, EP, DP and the number
    of virtual-pipeline chunks."""
    from megatron.core import parallel_state as ps

    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "vpp": num_chunks,
    }


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
