"""Conversion one layer at a time: host memory for the weights of one decoder layer (plus the embedding and
output layer), not of the whole model.

Why: conversion runs at TP=1 / PP=1 in one process, and a Mixture-of-Experts model is mostly experts
(Qwen3-30B-A3B: 29 of its 30.5 B parameters, 61 GB in bf16). Building the whole model to save it with one
``dist_checkpointing.save`` would hold all of them, plus the copies Megatron's writer makes of every fc1's
gate / up halves.

How, HF -> Megatron (:func:`save_streamed`): the GPTModel is built on the meta device (no memory). For each
group of parameters (the embedding, final norm and output layer; then each decoder layer) the group's
modules get real CPU tensors, are filled from the HF files (only that group's tensors are read), and
Megatron's own ``dist_checkpointing.save`` writes the group's part of the model's sharded state dict into
a part directory; the group goes back to the meta device. The parts are then merged into one checkpoint:
torch's distributed-checkpoint format is a set of data files plus a ``.metadata`` file that maps every
(tensor, offset) to (file, byte range); a save by several ranks produces exactly that from the ranks'
files, so the merge renames the parts' data files apart and writes the union of their ``.metadata``. The
result is what :func:`gift_megatron.megatron.save_checkpoint` writes (same manifest, same keys) and loads
at any TP/PP/EP layout with :func:`gift_megatron.megatron.load_checkpoint`.

Megatron -> HF (:func:`iter_streamed`): the same groups, each loaded from the checkpoint with
``dist_checkpointing.load`` of the group's keys only, exported through the mapping and released.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch

from gift_megatron.hf.layout import LocalParam
from gift_megatron.hf.mapping import megatron_tensor_to_hf


@dataclasses.dataclass
class Group:
    """A set of parameters converted together: ``name`` (for messages), ``modules`` (materialized together),
    ``owns(state_dict_key)`` (which entries of the model's sharded state dict are the group's) and
    ``has(local_param)`` (which :class:`~.layout.LocalParam` are)."""

    name: str
    modules: list[torch.nn.Module]
    owns: Callable[[str], bool]
    has: Callable[[LocalParam], bool]


def groups_of(model: Any) -> list[Group]:
    """The conversion groups of a TP=1 / PP=1 GPTModel: the parameters outside the decoder layers, then one
    group per decoder layer (its global index is ``layer_number - 1``)."""
    top = [
        m
        for m in (
            getattr(model, "embedding", None),
            getattr(model.decoder, "final_layernorm", None),
            getattr(model, "output_layer", None),
        )
        if m is not None
    ]
    out = [
        Group(
            "embedding, final norm and output layer",
            top,
            lambda key: not key.startswith("decoder.layers."),
            lambda lp: lp.layer is None,
        )
    ]
    for local, layer in enumerate(model.decoder.layers):
        index = layer.layer_number - 1
        out.append(
            Group(
                f"layer {index}",
                [layer],
                lambda key, local=local: key.startswith(f"decoder.layers.{local}."),
                lambda lp, index=index: lp.layer == index,
            )
        )
    return out


def materialize(modules: list[torch.nn.Module], device: str | torch.device = "cpu") -> None:
    """Give every parameter (and buffer) of ``modules`` fresh uninitialized storage on ``device``, keeping
    Megatron's attributes on the parameters (``tensor_model_parallel``, ``partition_dim``, ...), which
    ``Module.to_empty`` would drop. ``device="meta"`` releases the memory."""
    for module in modules:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is None or p.device == torch.device(device):
                    continue
                new = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad
                )
                new.__dict__.update(p.__dict__)
                sub._parameters[name] = new
            for name, b in list(sub._buffers.items()):
                if b is not None and b.device != torch.device(device):
                    sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


def save_streamed(
    root: str,
    model: Any,
    model_cfg: Any,
    fill: Callable[[Group], None],
    *,
    extra: dict | None = None,
    on_group: Callable[[Group], None] | None = None,
) -> str:
    """Write ``model`` (a TP=1 / PP=1 GPTModel on the meta device) as checkpoint ``root/step_00000000``, one
    group at a time: ``fill(group)`` sets the group's parameters after they are materialized. Returns the
    checkpoint directory. Single process (conversion); ``extra`` is stored as the checkpoint's ``extra``.

    ``on_group(group)`` is called after each group is written and released (tests count what is held).
    """
    from megatron.core import dist_checkpointing

    from gift_megatron.megatron.checkpoint.manifest import write_manifest
    from gift_megatron.megatron.checkpoint.publish import checkpoint_path, publish, tmp_step_name
    from gift_megatron.megatron.checkpoint.save_load import (
        common_state,
        content_metadata,
        layer_spec,
        layout,
        model_tensors,
        runtime_metadata,
    )

    # Each layer under its own keys (decoder.layers.<i>.*): by default Megatron stacks the layers' tensors into
    # one key per name with a leading layer axis, which a part holding one layer would only partly cover. The
    # flag is stored in the manifest, and load_checkpoint builds the model's keys with it at any layout.
    content = {**content_metadata(None), "non_homogeneous_layers": True}
    runtime = runtime_metadata(content)
    final = checkpoint_path(root, 0)
    parts_dir = os.path.join(root, ".parts")
    os.makedirs(parts_dir)
    parts, tensors = [], {}
    for k, group in enumerate(groups_of(model)):
        materialize(group.modules, "cpu")
        fill(group)
        full = model.sharded_state_dict(metadata=runtime)
        state: dict[str, Any] = {"model": {key: v for key, v in full.items() if group.owns(key)}}
        if k == 0:  # what save_checkpoint stores besides the weights, once
            state.update(common_state(0, None, extra))
        tensors.update(model_tensors({"model": state["model"]}))
        part = os.path.join(parts_dir, f"{k:05d}")
        os.makedirs(part)
        dist_checkpointing.save(state, part, content_metadata=content)
        del full, state
        materialize(group.modules, "meta")
        parts.append(part)
        if on_group is not None:
            on_group(group)
    tmp = os.path.join(root, tmp_step_name(0))
    merge_parts(parts, tmp)
    shutil.rmtree(parts_dir)
    write_manifest(
        tmp,
        step=0,
        layout=layout(1),
        chunks=1,
        tensors=dict(sorted(tensors.items())),
        spec=layer_spec([model]),
        optimizer=None,
        scheduler=False,
        content_metadata=content,
    )
    publish(root, tmp, final)
    return final


def merge_parts(parts: list[str], out: str) -> None:
    """Merge torch distributed-checkpoint directories written by separate saves of disjoint keys into one
    directory ``out``: the data files of part k become ``__{k}_{i}.distcp`` (as if rank k had written them),
    ``.metadata`` is the union of the parts' (keys, planner data, and the storage map with the new file
    names), and the first part's other files (Megatron's ``common.pt``, ``metadata.json``) are kept.

    Raises ValueError when two parts hold the same key (they would not be disjoint)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    os.makedirs(out)
    merged = None
    for k, part in enumerate(parts):
        metadata = FileSystemReader(part).read_metadata()
        if k:
            # Megatron's common (non-sharded) state: the first part's holds step, extra, ...; the others'
            # must be empty (their groups have nothing outside sharded tensors and objects), and are dropped.
            _check_common_empty(part)
            metadata.state_dict_metadata = {
                key: md for key, md in metadata.state_dict_metadata.items() if not key.startswith(_COMMON)
            }
            metadata.storage_data = {
                index: info
                for index, info in (metadata.storage_data or {}).items()
                if not index.fqn.startswith(_COMMON)
            }
        renamed = {}
        for i, name in enumerate(sorted(f for f in os.listdir(part) if f.endswith(".distcp"))):
            renamed[name] = f"__{k}_{i}.distcp"
            os.replace(os.path.join(part, name), os.path.join(out, renamed[name]))
        storage = {
            index: dataclasses.replace(info, relative_path=renamed[info.relative_path])
            for index, info in (metadata.storage_data or {}).items()
        }
        if merged is None:
            merged = metadata
            merged.state_dict_metadata = dict(metadata.state_dict_metadata)
            merged.planner_data = dict(metadata.planner_data or {})
            merged.storage_data = storage
            for name in os.listdir(part):
                if name != ".metadata" and not name.endswith(".distcp"):
                    shutil.copy2(os.path.join(part, name), os.path.join(out, name))
            continue
        twice = sorted(set(merged.state_dict_metadata) & set(metadata.state_dict_metadata))
        if twice:
            raise ValueError(f"checkpoint part {part}: {twice[:3]} are also in an earlier part")
        merged.state_dict_metadata.update(metadata.state_dict_metadata)
        merged.planner_data.update(metadata.planner_data or {})
        merged.storage_data.update(storage)
    if merged is None:
        raise ValueError("merge_parts: no parts")
    for key, md in merged.state_dict_metadata.items():  # every tensor complete, as one save would have it
        if isinstance(md, TensorStorageMetadata):
            have = sum(int(torch.Size(c.sizes).numel()) for c in md.chunks)
            if have != int(md.size.numel()):
                raise ValueError(f"merged checkpoint: {key!r} has {have} of its {int(md.size.numel())} elements")
    with open(os.path.join(out, ".metadata"), "wb") as fh:
        pickle.dump(merged, fh)
        fh.flush()
        os.fsync(fh.fileno())


_COMMON = "common_state"


def per_layer_keys(path: str) -> bool:
    """Whether the checkpoint at ``path`` keeps every layer under its own keys (``non_homogeneous_layers`` in
    its content metadata, as :func:`save_streamed` writes it), so that :func:`iter_streamed` can read it a
    layer at a time. A training run's checkpoint stacks the layers instead."""
    from gift_megatron.megatron.checkpoint import read_manifest

    return bool(read_manifest(path)["content_metadata"].get("non_homogeneous_layers"))


def _check_common_empty(part: str) -> None:
    from megatron.core.dist_checkpointing import load_common_state_dict

    def values(tree: Any, prefix: str = "") -> list[str]:
        if isinstance(tree, dict):
            return [v for key, sub in tree.items() if key != "content_metadata" for v in values(sub, f"{prefix}{key}.")]
        return [prefix.rstrip(".")]

    left = values(load_common_state_dict(part))
    if left:
        raise ValueError(f"checkpoint part {part}: non-sharded state {left[:5]} would be lost in the merge")


def iter_streamed(
    path: str, model: Any, model_cfg: Any, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) of the Megatron checkpoint ``path`` (with per-layer keys: see
    :func:`per_layer_keys`), read one group at a time into ``model`` (a TP=1 / PP=1 GPTModel on the meta device
    of the checkpoint's architecture; checked against it first, as ``load_checkpoint`` does). The tensors are
    views of the group's parameters, which are released (not overwritten) when the next group is read."""
    from megatron.core import dist_checkpointing

    from gift_megatron.hf.layout import local_params
    from gift_megatron.megatron.checkpoint.save_load import runtime_metadata
    from gift_megatron.megatron.checkpoint.workarounds import load_module_state

    manifest = check_loadable(path, model)
    runtime = runtime_metadata(manifest["content_metadata"])
    for group in groups_of(model):
        materialize(group.modules, "cpu")
        full = model.sharded_state_dict(metadata=runtime)
        state = {"model": {key: v for key, v in full.items() if group.owns(key)}}
        # Megatron returns (state, missing keys, unexpected keys) only for the `strict` modes that report
        # keys; the default used here returns the state dict.
        loaded = cast(dict[str, Any], dist_checkpointing.load(state, path))
        load_module_state(model, loaded["model"], False, path)
        del full, state, loaded
        for lp in local_params([model], tied_output=False):
            if group.has(lp):
                for name, tensor in megatron_tensor_to_hf(lp.name, lp.param.detach(), model_cfg, 1, lp.layer):
                    yield name, tensor if dtype is None else tensor.to(dtype)
        materialize(group.modules, "meta")


def check_loadable(path: str, model: Any) -> dict:
    """The manifest of checkpoint ``path`` after the checks :func:`gift_megatron.megatron.load_checkpoint`
    makes before reading (complete files; every tensor of ``model``, a meta-device model, in the checkpoint
    with its shape and no other tensor); raises CheckpointError naming ``path`` and each problem."""
    from gift_megatron.megatron.checkpoint.manifest import (
        CheckpointError,
        file_problems,
        format_problems,
        preview,
        shape_problems,
        try_read_manifest,
    )
    from gift_megatron.megatron.checkpoint.save_load import model_state, model_tensors, runtime_metadata

    manifest, problems = try_read_manifest(path)
    if not problems:
        problems += file_problems(path, manifest)
    if not problems:
        keys = model_tensors(model_state([model], runtime_metadata(manifest["content_metadata"])))
        problems += shape_problems(manifest, keys, True)
        unexpected = sorted(set(manifest["model"]["tensors"]) - set(keys))
        if unexpected:
            problems.append(
                f"{len(unexpected)} model tensor(s) of the checkpoint are not in the model: {preview(unexpected)}"
            )
    if problems:
        raise CheckpointError(format_problems(path, problems))
    return manifest
