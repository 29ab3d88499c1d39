"""The checkpoint manifest (``gift_checkpoint.json``) and the checks made against it before loading.

Rank 0 writes the manifest last, into the complete temporary directory: the step, the parallel layout, the
global shape of every model tensor, the model's layer spec (``"local"`` or ``"transformer_engine"``), the
optimizer kind and format, the content metadata and the size of every file. Loading reads it first and
compares it with the files on disk and with the model, optimizer and scheduler it is asked to fill, so that
a problem is named before anything is modified.

Why a module of its own: everything here is a comparison of recorded facts with the present ones; it reads
files and the caller's tables and runs no collective (the caller gathers the problems of every rank).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from typing import Any

from gift_megatron.megatron.checkpoint.publish import LATEST_NAME, MANIFEST_NAME, file_sizes, write_json_atomic

__all__ = [
    "FORMAT_VERSION",
    "FULLY_RESHARDABLE",
    "CheckpointError",
    "expert_count_problem",
    "file_problems",
    "format_problems",
    "megatron_version",
    "preview",
    "read_manifest",
    "shape_problems",
    "state_problems",
    "try_read_manifest",
    "verify_checkpoint",
    "write_manifest",
]

FORMAT_VERSION = 1
# Distributed-optimizer formats that load in any TP/PP layout (Megatron's own list, both versions).
FULLY_RESHARDABLE = ("fully_reshardable", "fully_sharded_model_space")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message names the path and the problem."""


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def write_manifest(
    directory: str,
    *,
    step: int,
    layout: dict[str, int],
    chunks: int,
    tensors: dict[str, dict[str, Any]],
    spec: str,
    optimizer: dict[str, Any] | None,
    scheduler: bool,
    content_metadata: dict[str, Any],
) -> dict[str, Any]:
    """Write the manifest of the complete checkpoint in ``directory`` (atomically, as its last file) and
    return it. ``tensors`` is every model tensor's ``{"shape", "allow_shape_mismatch"}`` over all ranks,
    ``optimizer`` is
    :func:`~gift_megatron.megatron.checkpoint.workarounds.optimizer_info`'s record; the file sizes are taken from ``directory`` now."""
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "megatron_core": megatron_version(),
        "backend": "torch_dist",
        "layout": layout,
        "model": {"chunks": chunks, "tensors": tensors, "spec": spec},
        "optimizer": optimizer,
        "scheduler": scheduler,
        "content_metadata": content_metadata,
        "files": file_sizes(directory),
    }
    write_json_atomic(os.path.join(directory, MANIFEST_NAME), manifest)
    return manifest


def megatron_version() -> str:
    """The installed megatron-core version, or ``"unknown"`` (read from the package metadata: no import)."""
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path`` (step, layout, model tensors, optimizer, files).

    Raises CheckpointError if ``path`` is not a complete checkpoint written by ``save_checkpoint``.
    """
    path = os.fspath(path)
    manifest, problems = try_read_manifest(path)
    if problems:
        raise CheckpointError(format_problems(path, problems))
    return manifest


def verify_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that ``path`` is a complete checkpoint: its manifest is readable and every file it lists is
    present with the size it was written with. Returns the manifest; raises CheckpointError naming every
    problem. Needs no model and no process group (``load_checkpoint`` runs the same checks first)."""
    path = os.fspath(path)
    manifest, problems = try_read_manifest(path)
    if not problems:
        problems = file_problems(path, manifest)
    if problems:
        raise CheckpointError(format_problems(path, problems))
    return manifest


def try_read_manifest(path: str) -> tuple[dict[str, Any], list[str]]:
    """(manifest, problems): the manifest of ``path`` and why it is unusable, if it is (then ``{}``)."""
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


# --------------------------------------------------------------------------------------------------
# Pre-load checks
# --------------------------------------------------------------------------------------------------


def file_problems(path: str, manifest: dict[str, Any]) -> list[str]:
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


def shape_problems(manifest: dict[str, Any], model: dict[str, Any], strict: bool) -> list[str]:
    """This rank's model tensors (``model``: key -> ``{"shape", "allow_shape_mismatch"}``) whose global shape
    differs from the checkpoint's, or (strict) that the checkpoint lacks."""
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
    experts = expert_count_problem(saved, model)
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
        problems.append(f"{len(missing)} model tensor(s) are not in the checkpoint: {preview(missing)}")
    return problems


def expert_count_problem(saved: dict[str, Any], model: dict[str, Any]) -> str | None:
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


def state_problems(
    manifest: dict[str, Any], layout: dict[str, int], optimizer_kind: str | None, scheduler: Any
) -> list[str]:
    """Optimizer / scheduler state that was asked for but is absent, or cannot be loaded in this layout.

    ``optimizer_kind``: ``"distributed"`` or ``"non-distributed"`` for the optimizer to load (as the
    manifest names them), None to load no optimizer state; ``scheduler``: the scheduler to load, or None.
    """
    problems = []
    saved = manifest["optimizer"]
    kind = optimizer_kind
    if kind is not None:
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
        elif kind == "distributed" and saved["sharding_type"] not in FULLY_RESHARDABLE:
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


def format_problems(path: str, problems: Sequence[str]) -> str:
    """The message of the CheckpointError for ``problems`` of the checkpoint at ``path``, one per line."""
    return f"cannot load checkpoint {path}:\n  - " + "\n  - ".join(problems)


def preview(keys: Sequence[str], n: int = 5) -> str:
    """The first ``n`` of ``keys``, comma-separated, and how many more there are."""
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
