"""Save and resume a training run as Megatron-Core distributed checkpoints (``torch_dist`` format).

A checkpoint is the directory ``root/step_{step:08d}/`` holding one Megatron distributed checkpoint with

- ``model`` (``model0``, ``model1``, ... for virtual-pipeline chunks): the model's sharded state dict;
- ``optimizer``: ``optimizer.sharded_state_dict(model_sharded_state_dict)`` (Megatron's own format, also for
  the distributed optimizer);
- ``opt_param_scheduler``: ``OptimizerParamScheduler.state_dict()`` when a scheduler is given;
- ``gift_rng_state``: every rank's RNG states (python ``random``, numpy, torch CPU, CUDA when present and
  the model-parallel tracker's ``get_cuda_rng_tracker().get_states()``), one ShardedObject per rank;
- ``step``, ``data_state`` (e.g. consumed samples, sampler state; must be the same on every rank, rank 0's
  is stored), ``extra`` (e.g. the resolved config), all picklable;

plus ``gift_checkpoint.json``, a manifest that rank 0 writes last: the step, the parallel layout, the
global shape of every model tensor, the model's layer spec (``"local"`` or ``"transformer_engine"``), the
optimizer kind and format, and the size of every file.

Atomicity. Every rank writes into a fresh temporary sibling ``root/.tmp_step_{step:08d}_{token}/``; after a
barrier rank 0 writes the manifest, renames the directory to its final name and then replaces
``root/latest`` (a temp file, fsync, ``os.replace``). A job killed at any point before that replace
leaves ``latest`` naming the previous complete checkpoint; leftover ``.tmp_*`` entries are never read and
are deleted by the next successful save. ``keep_last=K`` keeps the K newest complete checkpoints. This
relies on POSIX ``rename`` being atomic (local disks, NFS, Lustre, GPFS; not object stores) and on one
job at a time saving into ``root``.

Loading checks everything it can before touching the model: the directory and manifest exist, every
file listed in the manifest is present with its recorded size (a missing metadata file or a truncated
shard is caught here), every model tensor's global shape matches the checkpoint's, the checkpoint has the
optimizer / scheduler state asked for, and the optimizer format can be loaded in this layout. Problems
are gathered from every rank and raised as :class:`CheckpointError` on all of them (no rank is left
waiting in a collective). Megatron then reads the shards in place; bytes corrupted without changing a
file's size are only detected by the reader, after part of the model may have been overwritten.

Layer specs. On GPU the trainer builds Transformer Engine's layer spec, on CPU and in every converted
checkpoint the local spec; a checkpoint of either loads into a model of the other. What a TE model saves
was read from the sources of megatron-core 0.16.1 / 0.19.2 and Transformer Engine (>= 1.13, where
``te.pytorch.RMSNorm`` became a fusible op with extra state); TE does not run on CPU, so
tests/test_checkpoint_specs.py checks this on a CPU model that asks for exactly those keys:

- weights: both specs save the same ShardedTensor keys. TE fuses the pre-attention / pre-MLP RMSNorm into
  ``linear_qkv`` / ``linear_fc1`` (``layer_norm_weight``), and the local spec's ``sharded_state_dict_keys_map``
  saves ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight`` under those fused names.
- ``_extra_state`` (TE's FP8 metadata, ShardedObjects): the local spec's linear layers save ``None`` under
  the same keys, which TE's ``set_extra_state`` ignores; TE's norms (``final_layernorm``, ``q_layernorm``,
  ``k_layernorm``) save extra state the local spec has no counterpart for (where TE is installed, a
  local-spec model's ``final_layernorm`` is TE's too). Extra state the model asks for
  and the checkpoint lacks keeps its current (initial) value, named in the result's
  ``extra_state_not_loaded``; extra state in the checkpoint that the model does not ask for is not read.
  Modules whose torch state dict has ``_extra_state`` that their sharded state dict leaves out (TE's
  ``DotProductAttention`` in both versions) keep theirs too. A missing weight is still an error naming it.
- the manifest records the saving model's spec; loading compares it with the model's, so extra state
  missing from a checkpoint of the *same* spec (an FP8 run resumed without its scaling state) is logged as
  a warning rather than as the expected difference between specs. Manifests from before the field load
  as before, the spec read as unknown.

Resharding (measured on CPU with megatron-core 0.16.1 and 0.19.2; tests/test_checkpoint.py):

- model weights: any TP / PP / DP change (Megatron reshards sharded tensors, fused QKV and SwiGLU
  included). RNG states are restored only in the saving layout; elsewhere they are skipped and the result
  says so (``rng_restored``), as Megatron's own loader does.
- optimizer without the distributed optimizer: Adam's moments and step are stored per model tensor and
  reshard like the weights: TP, PP and DP changes all work.
- distributed optimizer: saved as ``dp_reshardable`` (Megatron-LM's default): DP may change, TP and PP
  may not; loading it in another TP/PP layout raises a clear error before anything is modified (load the
  weights only with ``optimizer=None``). ``fully_reshardable`` reshards everything but gathers on the CUDA
  device in both versions, so it is refused on CPU and untested here. Megatron's default
  ``fully_sharded_model_space`` fails in both versions ("ShardedTensor.flattened_range is not
  supported") and is refused.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pickle
import random
import re
import shutil
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gift_megatron import comm
from gift_megatron.device import use_cuda

__all__ = [
    "LATEST_NAME",
    "MANIFEST_NAME",
    "CheckpointError",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "gift_checkpoint.json"
LATEST_NAME = "latest"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp_"
_RNG_KEY = "gift_rng_state"
# Distributed-optimizer formats that load in any TP/PP layout (Megatron's own list, both versions).
_FULLY_RESHARDABLE = ("fully_reshardable", "fully_sharded_model_space")
_SAVE_SHARDING_TYPES = ("dp_reshardable", "fully_reshardable")
# Layer specs a model can be built with (gift_megatron.megatron.model.layer_spec), as the manifest names them.
LOCAL_SPEC = "local"
TE_SPEC = "transformer_engine"
# torch's state-dict suffix for Module.get_extra_state; Megatron saves such entries as ShardedObjects.
_EXTRA_STATE = "_extra_state"
# Parameters that exist only where Transformer Engine fuses a norm into the next linear layer.
_TE_FUSED_NORM_PARAMS = (".linear_qkv.layer_norm_weight", ".linear_fc1.layer_norm_weight")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message names the path and the problem."""


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


def checkpoint_path(root: str | os.PathLike, step: int) -> str:
    """The directory of the checkpoint of ``step`` under ``root``: ``root/step_{step:08d}``."""
    return os.path.join(os.fspath(root), f"step_{step:08d}")


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint (a ``step_*`` directory with a manifest), oldest first."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, MANIFEST_NAME)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> str | None:
    """The checkpoint to resume from (``--resume auto``): the one ``root/latest`` names, or None if ``root``
    holds no complete checkpoint.

    If ``latest`` is missing or names something that is not a complete checkpoint (it was edited, or the
    job died between replacing an existing same-step checkpoint and updating ``latest``), the newest
    complete checkpoint is returned instead, with a warning. Checkpoints are not verified file by file
    here; :func:`load_checkpoint` does that.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        return None
    latest_file = os.path.join(root, LATEST_NAME)
    named = None
    if os.path.isfile(latest_file):
        with open(latest_file) as f:
            named = f.read().strip()
        # Only a plain entry name of root is accepted: `latest` must not send a resume elsewhere.
        if _STEP_DIR.match(named) and os.path.isfile(os.path.join(root, named, MANIFEST_NAME)):
            return os.path.join(root, named)
    complete = list_checkpoints(root)
    if not complete:
        return None
    if named is not None:
        logger.warning(
            "%s names %r, which is not a complete checkpoint; using the newest complete one, %s",
            latest_file,
            named,
            complete[-1][1],
        )
    return complete[-1][1]


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path`` (step, layout, model tensors, optimizer, files).

    Raises CheckpointError if ``path`` is not a complete checkpoint written by :func:`save_checkpoint`.
    """
    path = os.fspath(path)
    manifest, problems = _read_manifest(path)
    if problems:
        raise CheckpointError(_format_problems(path, problems))
    return manifest


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` is a complete checkpoint: its manifest is readable and every file it lists is
    present with the size it was written with. Returns the manifest; raises CheckpointError naming every
    problem. Needs no model and no process group (:func:`load_checkpoint` runs the same checks first)."""
    path = os.fspath(path)
    manifest, problems = _read_manifest(path)
    if not problems:
        problems = _file_problems(path, manifest)
    if problems:
        raise CheckpointError(_format_problems(path, problems))
    return manifest


# --------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------


def save_checkpoint(
    root: str | os.PathLike,
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
        distrib_optim_sharding_type: the distributed optimizer's format (see the module docstring).

    A checkpoint of the same step that already exists is replaced. If saving raises (on every rank, e.g. a
    full disk), the exception propagates and ``latest`` still names the previous checkpoint; a rank that
    fails alone inside Megatron's writer leaves the others waiting in its collectives until the job dies,
    as in Megatron-LM, with the same result on disk.
    """
    root = os.fspath(root)
    chunks = _as_chunks(model_chunks)
    _check_save_arguments(step, keep_last, data_state, extra)
    from megatron.core import dist_checkpointing

    distributed = _is_distributed_optimizer(optimizer)
    if distributed:
        _check_sharding_type(distrib_optim_sharding_type)
    content_metadata = _content_metadata(distrib_optim_sharding_type if distributed else None)
    rank = dist.get_rank()

    # One temporary name for all ranks; a fresh one per save, so a stale directory is never reused.
    token = [f"{_TMP_PREFIX}step_{step:08d}_{uuid.uuid4().hex[:12]}" if rank == 0 else None]
    comm.broadcast_objects(token, src=0)
    tmp = os.path.join(root, token[0])
    error = None
    if rank == 0:
        try:
            os.makedirs(tmp)  # Megatron writes into an existing directory
        except OSError as exc:
            error = f"cannot create {tmp}: {exc}"
    _raise_if_rank0_failed(error, root)

    state = _model_state(chunks, _runtime_metadata(content_metadata))
    model_tensors = _gather_model_tensors(state)
    if optimizer is not None:
        # A distributed optimizer that has not stepped yet (a step-0 checkpoint) has no state to save.
        _allocate_distributed_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=False, metadata=_runtime_metadata(content_metadata)
        )
        state["optimizer_steps"] = _optimizer_steps(optimizer)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state[_RNG_KEY] = _rng_sharded_object(_rng_state())
    state["step"] = step
    state["data_state"] = data_state
    state["extra"] = extra

    dist_checkpointing.save(state, tmp, content_metadata=content_metadata)
    comm.barrier()  # every rank's shards are on disk before rank 0 declares the checkpoint complete

    final = checkpoint_path(root, step)
    if rank == 0:
        try:
            manifest = {
                "format": FORMAT_VERSION,
                "step": step,
                "saved_at": datetime.datetime.now(datetime.UTC).isoformat(),
                "megatron_core": _megatron_version(),
                "backend": "torch_dist",
                "layout": _layout(len(chunks)),
                "model": {"chunks": len(chunks), "tensors": model_tensors, "spec": _layer_spec(chunks)},
                "optimizer": _optimizer_info(optimizer, distrib_optim_sharding_type),
                "scheduler": scheduler is not None,
                "content_metadata": content_metadata,
                "files": _file_sizes(tmp),
            }
            _write_json_atomic(os.path.join(tmp, MANIFEST_NAME), manifest)
            _publish(root, tmp, final)
            _clean_up(root, final, keep_last)
        except Exception as exc:  # reported to every rank below, so none waits for rank 0 forever
            error = f"{type(exc).__name__}: {exc}"
    _raise_if_rank0_failed(error, final)
    return final


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


def _publish(root: str, tmp: str, final: str) -> None:
    """Rank 0: make the complete checkpoint in ``tmp`` the one named ``final`` and point ``latest`` at it."""
    _fsync_dir(tmp)
    replaced = None
    if os.path.exists(final):
        # rename() cannot replace a non-empty directory: move the old one aside first. A crash between the
        # two renames leaves `latest` naming a missing directory, and latest_checkpoint() falls back to
        # the newest complete one.
        replaced = os.path.join(root, f"{_TMP_PREFIX}replaced_{os.path.basename(final)}_{uuid.uuid4().hex[:12]}")
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(os.path.join(root, LATEST_NAME), os.path.basename(final) + "\n")
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _clean_up(root: str, final: str, keep_last: int | None) -> None:
    """Rank 0, after publishing: delete stale temporary entries and checkpoints beyond ``keep_last``."""
    for name in os.listdir(root):
        if name.startswith(_TMP_PREFIX):
            _remove(os.path.join(root, name))
    if keep_last is None:
        return
    saved_step = int(_STEP_DIR.match(os.path.basename(final)).group(1))
    # Only checkpoints up to this one compete for the K places: newer ones (left by a run that was
    # restarted from an older checkpoint) are not this run's history, and are not deleted.
    older = [path for step, path in list_checkpoints(root) if step <= saved_step and path != final]
    for path in older[: max(0, len(older) - (keep_last - 1))]:
        # Renamed first (atomic), so a crash mid-delete leaves a stale temp entry, not a damaged checkpoint.
        doomed = os.path.join(root, f"{_TMP_PREFIX}delete_{os.path.basename(path)}_{uuid.uuid4().hex[:12]}")
        os.rename(path, doomed)
        _remove(doomed)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except OSError:
            pass


def _raise_if_rank0_failed(error: str | None, path: str) -> None:
    """Share rank 0's error (or None) with every rank; all raise together."""
    box = comm.broadcast_objects([error], src=0)
    if box[0] is not None:
        raise CheckpointError(f"saving checkpoint {path} failed on rank 0: {box[0]}")


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike,
    model_chunks: Any,
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    strict: bool = True,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into the model (and optimizer, scheduler); collective.

    Args:
        path: a checkpoint directory (``root/step_*``; e.g. from :func:`latest_checkpoint`).
        model_chunks: the model, built in any TP/PP/DP layout with the checkpoint's architecture.
        optimizer: Megatron's optimizer to restore, or None to load the weights only (with a
            mixed-precision or distributed optimizer that exists already, call its
            ``reload_model_params()`` afterwards so that its fp32 main params follow the new weights).
        scheduler: the ``OptimizerParamScheduler`` to restore, or None.
        strict: every model tensor must be in the checkpoint and every model tensor of the checkpoint in
            the model. Not strict: tensors missing from the checkpoint keep their values, extra ones are
            ignored. Shapes must match either way. ``_extra_state`` entries (Transformer Engine's FP8
            metadata) are not weights: missing ones keep their values in both modes (module docstring).
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
    manifest, problems = _read_manifest(path)
    if not problems and _is_rank0():
        # One rank checks the files: a stat per file, which every rank of a large job need not repeat.
        problems += _file_problems(path, manifest)
    layout = _layout(len(chunks))
    model_keys: dict[str, Any] = {}
    saved_objects: set[str] = set()
    if not problems:
        content_metadata = manifest["content_metadata"]
        model_keys = _model_tensors(_model_state(chunks, _runtime_metadata(content_metadata)))
        problems += _shape_problems(manifest, model_keys, strict)
        problems += _state_problems(manifest, layout, optimizer, scheduler)
        saved_objects, object_problems = _saved_object_keys(path)
        problems += object_problems
    problems, all_model_keys = _gather_problems(problems, set(model_keys))
    if not problems and strict:
        unexpected = sorted(set(manifest["model"]["tensors"]) - all_model_keys)
        if unexpected:
            problems.append(
                f"{len(unexpected)} model tensor(s) of the checkpoint are not in the model (strict): "
                f"{_preview(unexpected)}"
            )
    if problems:
        raise CheckpointError(_format_problems(path, problems))

    content_metadata = manifest["content_metadata"]
    runtime_metadata = _runtime_metadata(content_metadata)
    state = _model_state(chunks, runtime_metadata)
    saved_tensors = manifest["model"]["tensors"]
    if not strict:
        state = {name: _drop_missing(sd, saved_tensors) for name, sd in state.items()}
    kept_extra_state: list[str] = []
    for sd in state.values():
        kept_extra_state += _keep_missing_extra_state(sd, saved_objects)
    specs = {"checkpoint": manifest["model"].get("spec"), "model": _layer_spec(chunks)}
    _log_kept_extra_state(path, specs, kept_extra_state)
    model_part = dict(state)
    if optimizer is not None:
        _allocate_distributed_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_part, is_loading=True, metadata=runtime_metadata)
    same_layout = manifest["layout"] == layout
    rng_restored = restore_rng and same_layout
    if rng_restored:
        state[_RNG_KEY] = _rng_sharded_object(_rng_state())
    try:
        loaded = dist_checkpointing.load(state, path)
    except CheckpointException as exc:
        # torch's checkpoint reader raises a BaseException (not an Exception) carrying each rank's error.
        causes = "; ".join(
            f"rank {rank}: {type(error).__name__}: {error}" for rank, (error, _) in sorted(exc.failures.items())
        )
        raise CheckpointError(f"reading checkpoint {path} failed: {causes}") from exc
    except Exception as exc:
        raise CheckpointError(f"reading checkpoint {path} failed: {type(exc).__name__}: {exc}") from exc

    for name, chunk in zip(_model_entry_names(len(chunks)), chunks):
        _load_module_state(unwrap_model(chunk), loaded[name], strict, path)
    if optimizer is not None:
        # Under no_grad: with fp32 params the distributed optimizer's main params are views of the model
        # params (leaves that require grad), which copy_() refuses outside it.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_distributed_optimizer_steps(optimizer, loaded.get("optimizer_steps"))
    if scheduler is not None:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if rng_restored:
        _set_rng_state(loaded[_RNG_KEY])
    elif restore_rng and _is_rank0():
        logger.warning(
            "checkpoint %s was saved in layout %s, this run is %s: RNG states not restored",
            path,
            manifest["layout"],
            layout,
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


def _read_manifest(path: str) -> tuple[dict[str, Any], list[str]]:
    """(manifest, problems): the manifest of ``path`` and why it is unusable, if it is."""
    if not os.path.exists(path):
        return {}, ["the checkpoint directory does not exist"]
    if not os.path.isdir(path):
        return {}, ["not a directory"]
    manifest_file = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(manifest_file):
        if os.path.isfile(os.path.join(path, LATEST_NAME)):
            return {}, [f"this is a checkpoint root, not a checkpoint: pass latest_checkpoint({path!r})"]
        return {}, [
            f"no {MANIFEST_NAME}: not a complete checkpoint written by save_checkpoint "
            "(an interrupted save, or not a gift_megatron checkpoint)"
        ]
    try:
        with open(manifest_file) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        return {}, [f"{MANIFEST_NAME} is unreadable: {type(exc).__name__}: {exc}"]
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        return {}, [f"{MANIFEST_NAME} has format {found!r}, this version reads format {FORMAT_VERSION}"]
    return manifest, []


def _file_problems(path: str, manifest: dict[str, Any]) -> list[str]:
    """Files of the manifest that are missing or have another size than when they were written."""
    problems = []
    for name, size in sorted(manifest["files"].items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            problems.append(f"file {name!r} is missing (incomplete checkpoint)")
            continue
        actual = os.path.getsize(file)
        if actual != size:
            what = "truncated" if actual < size else "modified"
            problems.append(f"file {name!r} has {actual} bytes, {size} were written ({what})")
    return problems


def _shape_problems(manifest: dict[str, Any], model: dict[str, Any], strict: bool) -> list[str]:
    """This rank's model tensors whose global shape differs from the checkpoint's, or (strict) that the
    checkpoint lacks."""
    saved = manifest["model"]["tensors"]
    mismatched, missing = [], []
    for key, entry in sorted(model.items()):
        if key not in saved:
            missing.append(key)
            continue
        want, have = tuple(entry["shape"]), tuple(saved[key]["shape"])
        # Megatron lets the vocab dimension (dim 0) of embeddings / output layers differ: the padded
        # vocab size depends on the TP size. The other dimensions must agree.
        if entry["allow_shape_mismatch"]:
            same = len(want) == len(have) and want[1:] == have[1:]
        else:
            same = want == have
        if not same:
            mismatched.append(f"{key}: checkpoint {list(have)}, model {list(want)}")
    problems = []
    experts = _expert_count_problem(saved, model)
    if experts:
        problems.append(experts)
    if mismatched:
        problems.append(
            f"{len(mismatched)} model tensor(s) have another global shape than in the checkpoint "
            f"(a different model configuration?): "
            + "; ".join(mismatched[:5])
            + ("; ..." if len(mismatched) > 5 else "")
        )
    if missing and strict:
        problems.append(f"{len(missing)} model tensor(s) are not in the checkpoint: {_preview(missing)}")
    return problems


def _expert_count_problem(saved: dict[str, Any], model: dict[str, Any]) -> str | None:
    """A Mixture-of-Experts checkpoint whose expert count differs from the model's, said in those words (the
    router weight, [..., experts, hidden], shows it; the shape list below it would name every expert tensor)."""
    for key in sorted(model):
        if key.endswith("mlp.router.weight") and key in saved:
            have, want = saved[key]["shape"], model[key]["shape"]
            if len(have) == len(want) >= 2 and have[-2] != want[-2]:
                return (
                    f"the checkpoint has {have[-2]} experts per MoE layer, the model {want[-2]} (model.num_experts; "
                    f"{key}: checkpoint {list(have)}, model {list(want)})"
                )
    return None


def _state_problems(manifest: dict[str, Any], layout: dict[str, int], optimizer: Any, scheduler: Any) -> list[str]:
    """Optimizer / scheduler state that was asked for but is absent, or cannot be loaded in this layout."""
    problems = []
    saved = manifest["optimizer"]
    if optimizer is not None:
        kind = "distributed" if _is_distributed_optimizer(optimizer) else "non-distributed"
        if saved is None:
            problems.append(
                "the checkpoint has no optimizer state (saved with optimizer=None); load with optimizer=None"
            )
        elif saved["kind"] != kind:
            problems.append(
                f"the checkpoint's optimizer state is from a {saved['kind']} optimizer, this "
                f"optimizer is {kind}; use the same use_distributed_optimizer setting, or "
                "load the weights only (optimizer=None)"
            )
        elif kind == "distributed" and saved["sharding_type"] not in _FULLY_RESHARDABLE:
            was = manifest["layout"]
            if (was["tp"], was["pp"]) != (layout["tp"], layout["pp"]):
                problems.append(
                    f"the distributed optimizer's state was saved in the '{saved['sharding_type']}' format at "
                    f"TP={was['tp']}, PP={was['pp']}; it loads only at the same TP and PP (DP may change), "
                    f"this run is TP={layout['tp']}, PP={layout['pp']}. Load the weights only "
                    "(optimizer=None), or save with distrib_optim_sharding_type='fully_reshardable' (CUDA)"
                )
    if scheduler is not None and not manifest["scheduler"]:
        problems.append("the checkpoint has no scheduler state (saved with scheduler=None)")
    return problems


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


def _format_problems(path: str, problems: Sequence[str]) -> str:
    return f"cannot load checkpoint {path}:\n  - " + "\n  - ".join(problems)


def _preview(keys: Sequence[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _drop_missing(sharded_state_dict: dict[str, Any], saved_tensors: dict[str, Any]) -> dict[str, Any]:
    """Non-strict load: leave out model tensors the checkpoint does not have (they keep their values)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return {
        name: value
        for name, value in sharded_state_dict.items()
        if not isinstance(value, (ShardedTensor, ShardedTensorFactory)) or value.key in saved_tensors
    }


def _saved_object_keys(path: str) -> tuple[set[str], list[str]]:
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


def _keep_missing_extra_state(sharded_state_dict: dict[str, Any], saved_objects: set[str]) -> list[str]:
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


def _log_kept_extra_state(path: str, specs: dict[str, str | None], kept: list[str]) -> None:
    """Say which extra state kept its value: expected across specs, suspicious within one."""
    if not kept or not _is_rank0():
        return
    saved, model = specs["checkpoint"], specs["model"]
    keys = _preview(sorted(set(kept)))
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


def _load_module_state(module: Any, state: dict[str, Any], strict: bool, path: str) -> None:
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
            f"loading checkpoint {path} into the model: missing keys {_preview(missing)}; "
            f"unexpected keys {_preview(unexpected)}"
        )


# --------------------------------------------------------------------------------------------------
# Model state
# --------------------------------------------------------------------------------------------------


def _as_chunks(model_chunks: Any) -> list[Any]:
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def _model_entry_names(num_chunks: int) -> list[str]:
    """Megatron-LM's names: ``model`` for one chunk, ``model0``, ``model1``, ... for virtual pipeline chunks."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _layer_spec(chunks: Sequence[Any]) -> str:
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


def _model_state(chunks: Sequence[Any], metadata: dict[str, Any]) -> dict[str, Any]:
    from megatron.core.utils import unwrap_model

    return {
        name: unwrap_model(chunk).sharded_state_dict(metadata=metadata)
        for name, chunk in zip(_model_entry_names(len(chunks)), chunks)
    }


def _model_tensors(model_state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """key -> {"shape": global shape, "allow_shape_mismatch"} of every model ShardedTensor of this rank.

    Factories (e.g. the fused SwiGLU fc1) are built on a fresh state dict so that their tensors are seen.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    table: dict[str, dict[str, Any]] = {}
    pending: list[Any] = list(nested_values(model_state))
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


def _gather_model_tensors(model_state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The model tensor table of all ranks (each pipeline stage has its own layers)."""
    table = _model_tensors(model_state)
    gathered = comm.all_gather_objects(table)
    merged: dict[str, dict[str, Any]] = {}
    for part in gathered:
        merged.update(part)
    return dict(sorted(merged.items()))


def _content_metadata(sharding_type: str | None) -> dict[str, Any]:
    """The (serializable) metadata that selects Megatron's sharded_state_dict formats; stored with the
    checkpoint, as Megatron-LM does, and used again at load."""
    metadata: dict[str, Any] = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if sharding_type is not None:
        metadata["distrib_optim_sharding_type"] = sharding_type
    return metadata


def _runtime_metadata(content_metadata: dict[str, Any]) -> dict[str, Any]:
    """Content metadata plus the data-parallel group Transformer Engine layers need to build replica ids."""
    from megatron.core import parallel_state

    return {**content_metadata, "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def _layout(num_chunks: int) -> dict[str, int]:
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


def _megatron_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------


def _sub_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _is_distributed_optimizer(optimizer: Any) -> bool:
    if optimizer is None:
        return False
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(sub, DistributedOptimizer) for sub in _sub_optimizers(optimizer))


def _optimizer_info(optimizer: Any, sharding_type: str) -> dict[str, Any] | None:
    if optimizer is None:
        return None
    distributed = _is_distributed_optimizer(optimizer)
    return {
        "kind": "distributed" if distributed else "non-distributed",
        "sharding_type": sharding_type if distributed else None,
        "classes": [type(sub).__name__ for sub in _sub_optimizers(optimizer)],
    }


def _optimizer_steps(optimizer: Any) -> list[float | None]:
    """Per sub-optimizer: the step count torch's optimizers keep per parameter (None if absent or uneven)."""
    steps: list[float | None] = []
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        values = {
            float(s["step"])
            for s in getattr(inner, "state", {}).values()
            if isinstance(s, dict) and torch.is_tensor(s.get("step"))
        }
        steps.append(values.pop() if len(values) == 1 else None)
    return steps


def _allocate_distributed_optimizer_state(optimizer: Any) -> None:
    """Give a fresh distributed optimizer the state Megatron's loading path expects to exist.

    Why: without TE/Apex (e.g. on CPU) the distributed optimizer wraps torch's Adam, whose state
    (moments and a per-parameter ``step``) appears only at its first step, while
    ``DistributedOptimizer.sharded_state_dict`` reads that state and asserts on the steps (megatron-core
    0.16, 0.19). Zeros and step 0 are allocated where state is missing: exactly what torch's Adam would
    create at its first step, so training is unchanged; loading overwrites them.
    """
    from megatron.core.optimizer import distrib_optimizer

    for sub in _sub_optimizers(optimizer):
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
            for p in params:
                inner.state[p].setdefault("step", torch.tensor(0.0))


def _restore_distributed_optimizer_steps(optimizer: Any, saved_steps: list[float | None] | None) -> None:
    """Set every parameter's step of a distributed optimizer's torch optimizer to the saved value.

    Why: on the torch-optimizer path (no TE/Apex) megatron-core 0.16 and 0.19 restore a wrong step: the
    'dp_reshardable' format does not store torch's per-parameter step and loading copies the placeholder
    back, and all parameters are given one shared step tensor, which torch's Adam then increments once per
    parameter per step. Adam's bias correction depends on the step, so the resumed run would diverge.
    """
    if not saved_steps:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = _sub_optimizers(optimizer)
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


def _rng_state() -> dict[str, Any]:
    """This rank's RNG states: python, numpy, torch CPU, CUDA (if in use) and Megatron's tracker."""
    from megatron.core import tensor_parallel

    cuda = None
    if use_cuda() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state()
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and use_cuda():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: dict[str, Any]) -> Any:
    """One shard per global rank: every rank's states are kept (TP ranks' tracker streams differ, and
    python/numpy states may differ per rank)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(_RNG_KEY, state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _file_sizes(directory: str) -> dict[str, int]:
    """Relative path -> size of every file under ``directory``."""
    sizes = {}
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            full = os.path.join(dirpath, name)
            sizes[os.path.relpath(full, directory)] = os.path.getsize(full)
    return dict(sorted(sizes.items()))


def _write_json_atomic(path: str, obj: Any) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a partial one."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f"{_TMP_PREFIX}{os.path.basename(path)}_{uuid.uuid4().hex[:12]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Persist a directory's entries (renames, new files) where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
