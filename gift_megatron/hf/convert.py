"""Hugging Face folder <-> Megatron distributed checkpoint, for the families of :mod:`.mapping`.

HF -> Megatron (:func:`hf_to_megatron`): validate the folder (:class:`~.hf_io.HFCheckpoint`), build the
model at TP=1 / PP=1 on the meta device (local spec), then fill and write it one decoder layer at a time
(:func:`~.streaming.save_streamed`: each layer is filled from the HF shards, written with Megatron's own
``dist_checkpointing.save`` and released; the parts are merged into one checkpoint) as ``OUT/step_00000000``
(weights only), the same checkpoint :func:`gift_megatron.megatron.save_checkpoint` writes. Megatron's
distributed checkpoint then loads at any TP/PP/EP (``load_checkpoint(resolve_checkpoint(OUT), [model])``).
``OUT/gift_conversion.json`` records the architecture (ModelConfig), dtype and source; ``OUT/hf_files/``
keeps the source's config.json and tokenizer files for the way back.

Megatron -> HF (:func:`megatron_to_hf`): the same meta-device model, read one layer at a time from the
checkpoint (:func:`~.streaming.iter_streamed`) and streamed through the mapping into safetensors shards of
bounded size (:class:`~.hf_io.SafetensorsShardWriter`), then config.json and the tokenizer files. A training
run's checkpoint stacks its layers' tensors (one key per name, a leading layer axis), which one process
cannot read a layer at a time through Megatron: it is read whole (the model at TP=1, plus the copies of
the fc1 halves Megatron's reader makes).

Host memory, both ways (a converted checkpoint): the weights of the largest group (the embedding and output layer, or one decoder
layer: for a Mixture-of-Experts model, one layer's experts) about twice over (the layer, plus the copies
Megatron's checkpoint writer makes of the fused fc1's gate / up halves, or its reader's), plus the HF
tensors in flight (Megatron -> HF: up to one output shard, ``--max-shard-size``); not the whole model.
The HF shards are memory-mapped: read as page cache, one layer's tensors at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch

from gift_megatron.hf.export import iter_hf_tensors
from gift_megatron.hf.hf_io import (
    ConversionError,
    HFCheckpoint,
    SafetensorsShardWriter,
    check_tokenizer_fits,
    copy_tokenizer_files,
    dtype_name,
    has_tokenizer,
    model_config_from_hf,
    parse_dtype,
    write_hf_config,
)
from gift_megatron.hf.layout import local_params
from gift_megatron.hf.load import load_hf_weights_into_model
from gift_megatron.hf.mapping import hf_config_dict, hf_names
from gift_megatron.hf.streaming import iter_streamed, per_layer_keys, save_streamed

logger = logging.getLogger(__name__)

CONVERSION_FILE = "gift_conversion.json"
HF_FILES_DIR = "hf_files"
_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

__all__ = [
    "CONVERSION_FILE",
    "ConversionError",
    "build_cpu_model",
    "checkpoint_dtype",
    "hf_to_megatron",
    "megatron_to_hf",
    "model_config_from_info",
    "read_conversion_info",
    "resolve_checkpoint",
    "single_process_megatron",
    "write_hf_config",
]


# ----------------------------------------------------------------------------------- output directory
def check_output_dir(out_dir: str, overwrite: bool, source: str | None = None) -> None:
    """Refuse an existing non-empty ``out_dir`` unless ``overwrite`` (the tools' ``--force``), and an
    ``out_dir`` that holds ``source`` (replacing it would delete the input).

    Without this a conversion into the wrong directory silently replaced whatever checkpoint was there
    (a Qwen2 checkpoint became a Llama one). Called before any work, so a refusal costs nothing.
    """
    if source is not None:
        out_real, src_real = os.path.realpath(out_dir), os.path.realpath(source)
        if os.path.commonpath([out_real, src_real]) == out_real:
            raise ConversionError(f"--out {out_dir}: holds the input {source}; write the output elsewhere")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ConversionError(f"--out {out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        entries = sorted(os.listdir(out_dir))
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ConversionError(
            f"--out {out_dir}: directory is not empty ({shown}); pass --force to replace it "
            "(overwrite=True from Python)"
        )


@contextmanager
def staged_output(out_dir: str, overwrite: bool) -> Iterator[str]:
    """Yield a fresh sibling directory to write into; on success it becomes ``out_dir``.

    The old ``out_dir`` (with ``overwrite``) is moved aside only once the new one is complete, then
    deleted: a conversion that fails half-way (bad shard, full disk, killed) leaves the old one as it was.
    A sibling, not a system temp dir, so that the final renames stay on one file system (atomic, no copy).
    On failure the staging directory is removed; a process killed outright leaves ``.NAME.partial-*``.
    """
    check_output_dir(out_dir, overwrite)
    # A symlinked --out is replaced where it points (the link stays), not by a directory in the link's place.
    out_dir = os.path.realpath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(out_dir)
    stage = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if os.path.isdir(out_dir):
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.rmdir(old)  # only the unique name is wanted: rename needs a free target
        os.rename(out_dir, old)
    os.rename(stage, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------- process set-up
@contextmanager
def single_process_megatron(tp: int = 1, pp: int = 1) -> Iterator[None]:
    """Megatron's parallel state in this process (a gloo world of one, created here and destroyed on exit
    when no process group exists yet); for conversion and checks outside a distributed job."""
    import torch.distributed as dist

    from gift_megatron.device import ENV, use_cuda
    from gift_megatron.parallel import destroy_model_parallel_cpu, initialize_model_parallel_cpu

    if use_cuda():
        # Conversion holds the whole model in host memory and runs Megatron on the CPU runtime, which a
        # process that uses CUDA does not install (the two cannot share one process's Megatron modules).
        raise RuntimeError(
            f"checkpoint conversion and verification run on the CPU: set {ENV}=cpu for this "
            "process (the tools/ scripts do)"
        )
    owned = not dist.is_initialized()
    tmp = tempfile.mkdtemp(prefix="gift_convert_")
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
    try:
        initialize_model_parallel_cpu(tp, pp)
        try:
            yield
        finally:
            destroy_model_parallel_cpu()
    finally:
        if owned:
            dist.destroy_process_group()
        shutil.rmtree(tmp, ignore_errors=True)


def build_cpu_model(model_cfg: Any, dtype: torch.dtype, *, tp: int | None = None, pp: int | None = None):
    """This rank's GPTModel for ``model_cfg`` on the CPU with the local layer spec, parameters in ``dtype``,
    not randomly initialized (every weight is about to be overwritten), even on a CUDA machine: conversion
    keeps the whole TP=1 model in host memory, not on one GPU. Megatron's parallel state must exist; a
    Mixture-of-Experts model takes its expert-parallel sizes from it (SequentialMLP experts; sequence
    parallelism at TP > 1, which Megatron's MoE layer requires).

    Its checkpoints load into Transformer Engine models too (the local spec saves its norms under TE's
    names, ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from gift_megatron.megatron.model import ParallelConfig, PrecisionConfig, decoder_spec, transformer_config

    tp = tp or ps.get_tensor_model_parallel_world_size()
    pp = pp or ps.get_pipeline_model_parallel_world_size()
    moe = bool(getattr(model_cfg, "num_experts", 0))
    experts: dict[str, Any] = (
        dict(
            expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
            expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
            sequence_parallel=tp > 1,
        )
        if moe
        else {}
    )
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **experts)
    parallel.validate(dist.get_world_size(), model_cfg)
    config = transformer_config(
        model_cfg,
        parallel,
        PrecisionConfig(dtype=_PRECISION[dtype]),
        perform_initialization=False,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    gpt = GPTModel(
        config=config,
        # A TransformerBlockSubmodules (the MoE decoder spec) is accepted too, though annotated ModuleSpec.
        transformer_layer_spec=cast(Any, decoder_spec(model_cfg, config, "local")),
        vocab_size=model_cfg.padded_vocab_size(tp),
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model_cfg.rotary_base) if float(model_cfg.rotary_base).is_integer() else model_cfg.rotary_base,
        rope_scaling=model_cfg.rope_scaling_factor is not None,
        rope_scaling_factor=model_cfg.rope_scaling_factor or 8.0,
    )
    return gpt.to(dtype) if dtype != torch.float32 else gpt


# ---------------------------------------------------------------------------------- HF -> Megatron
def hf_to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> str:
    """Convert a Hugging Face folder into a Megatron checkpoint root ``out_dir`` (loadable at any TP/PP).

    Args:
        hf_dir: config.json + model.safetensors, or shards + model.safetensors.index.json (+ tokenizer).
        out_dir: the checkpoint root to write. It must be absent or empty unless ``overwrite``; the
            conversion is written next to it and replaces it only once complete (see :func:`staged_output`).
        dtype: cast the weights (bf16 / fp16 / fp32 or a torch dtype); None keeps the checkpoint's.
        progress: tqdm bar over the bytes read.

    Returns the checkpoint directory (``out_dir/step_00000000``); ``out_dir`` itself can be given to
    :func:`resolve_checkpoint`, ``init.checkpoint`` and the other tools. Raises ConversionError naming the
    problem (before anything is written) for unsupported or inconsistent input, or a tokenizer with more
    tokens than the model's vocabulary.
    """
    hf_dir, out_dir = os.fspath(hf_dir), os.fspath(out_dir)
    check_output_dir(out_dir, overwrite, source=hf_dir)
    hf = HFCheckpoint(hf_dir)
    cfg = hf.model_config
    if has_tokenizer(hf_dir):
        check_tokenizer_fits(hf_dir, cfg.vocab_size, what="tokenizer of")
    target = parse_dtype(dtype) or hf.dtype
    if target not in _PRECISION:
        raise ConversionError(f"{hf_dir}: weights in {hf.dtype}; pass --dtype bf16, fp16 or fp32")
    info = {
        "model_config": dataclasses.asdict(cfg),
        "dtype": dtype_name(target),
        "hf_source": os.path.abspath(hf_dir),
        "hf_config": hf.hf_config,
    }
    with staged_output(out_dir, overwrite) as stage:
        with single_process_megatron():
            with torch.device("meta"):  # materialized one layer at a time (streaming.py)
                model = build_cpu_model(cfg, target)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                needed = _group_hf_names(model, cfg, lambda lp: True)
                bar = tqdm(
                    total=hf.nbytes([n for n in hf.names if n in needed]),
                    desc="HF -> Megatron",
                    unit="B",
                    unit_scale=True,
                )

            def fill(group):
                load_hf_weights_into_model(model, cfg, hf, only=group.has)
                if bar is not None:
                    bar.update(hf.nbytes([n for n in hf.names if n in _group_hf_names(model, cfg, group.has)]))

            path = save_streamed(stage, model, cfg, fill, extra={"conversion": info})
            if bar is not None:
                bar.close()
            model = None  # drop the last layers before the file copies below
        hf_files = os.path.join(stage, HF_FILES_DIR)
        copy_tokenizer_files(hf_dir, hf_files)
        shutil.copyfile(os.path.join(hf_dir, "config.json"), os.path.join(hf_files, "config.json"))
        with open(os.path.join(stage, CONVERSION_FILE), "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)
    return os.path.join(out_dir, os.path.basename(path))


# ---------------------------------------------------------------------------------- Megatron -> HF
def megatron_to_hf(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 5 * 10**9,
    model_config: Any = None,
    progress: bool = True,
    overwrite: bool = False,
) -> str:
    """Convert a Megatron checkpoint (a root with ``latest`` or a ``step_*`` directory, from
    :func:`hf_to_megatron` or a training run) into the Hugging Face folder ``out_dir``; returns it.

    Args:
        tokenizer_dir: copy the tokenizer files from here (default: the ones recorded at conversion,
            else the recorded HF source folder; none for a training checkpoint without them).
        dtype: cast the weights; None keeps the checkpoint's dtype (read from its tensor metadata).
        max_shard_bytes: the most tensor bytes per safetensors shard (one larger tensor gets its own).
        model_config: the architecture (a ModelConfig); needed when the checkpoint has no conversion
            record (a training run's: its ``init.hf_config`` / ``model`` section).
        overwrite: replace a non-empty ``out_dir`` (the tool's ``--force``); it is replaced only once the
            new folder is complete (see :func:`staged_output`).

    Writes config.json (the recorded original when the architecture is unchanged, dtype updated),
    model.safetensors or ``model-*-of-*.safetensors`` + model.safetensors.index.json, and the tokenizer
    files. Raises ConversionError for a missing architecture, a tokenizer directory without tokenizer
    files, or a tokenizer with more tokens than the model's vocabulary.
    """
    from gift_megatron.megatron.checkpoint import load_checkpoint

    ckpt, out_dir = os.fspath(ckpt), os.fspath(out_dir)
    check_output_dir(out_dir, overwrite, source=ckpt)
    path = resolve_checkpoint(ckpt)
    root = conversion_root(ckpt, path)
    info = read_conversion_info(root) if root else {}
    if model_config is None:
        if not info:
            raise ConversionError(
                f"{ckpt}: no {CONVERSION_FILE} next to the checkpoint (it was not written by "
                "tools/convert_hf_to_megatron.py): pass the architecture with --hf-config"
            )
        model_config = model_config_from_info(info)
    tokenizer_dir = _tokenizer_source(tokenizer_dir, root, info)
    if tokenizer_dir:
        check_tokenizer_fits(tokenizer_dir, model_config.vocab_size, what="--tokenizer")
    target = parse_dtype(dtype)
    with staged_output(out_dir, overwrite) as stage:
        with single_process_megatron():
            src = checkpoint_dtype(path)
            target = target or src
            if per_layer_keys(path):
                with torch.device("meta"):  # materialized one layer at a time (streaming.py)
                    model = build_cpu_model(model_config, src)
                tensors = iter_streamed(path, model, model_config, dtype=target)
            else:
                # A training run's checkpoint stacks the layers' tensors (one key per name, a leading layer
                # axis); a world of one cannot read a slice of those through Megatron (the other slices would
                # have to be another rank's), so it is read whole.
                logger.info("%s: layers stacked (a training checkpoint): read whole, not one layer at a time", path)
                model = build_cpu_model(model_config, src)
                load_checkpoint(path, [model], restore_rng=False)
                tensors = iter_hf_tensors(model, model_config, bucket_bytes=256 << 20, dtype=target)
            writer = SafetensorsShardWriter(stage, max_shard_bytes)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(
                    total=model_config.parameter_count() * target.itemsize,
                    desc="Megatron -> HF",
                    unit="B",
                    unit_scale=True,
                )
            for name, tensor in tensors:
                writer.add(name, tensor)
                if bar is not None:
                    bar.update(tensor.numel() * tensor.element_size())
            if bar is not None:
                bar.close()
            writer.close()
            del model
        write_hf_config(stage, _output_config(model_config, target, info.get("hf_config")))
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, stage)
        else:
            logger.warning("%s: no tokenizer files (pass --tokenizer DIR to add them)", out_dir)
    return out_dir


def _group_hf_names(model: Any, model_cfg: Any, has: Any) -> set[str]:
    """The HF names of the parameters ``has(local_param)`` selects (for the progress bar)."""
    return {
        n for lp in local_params([model], tied_output=True) if has(lp) for n in hf_names(lp.name, lp.layer, model_cfg)
    }


def _output_config(model_cfg: Any, dtype: torch.dtype, original: dict | None) -> dict:
    """The original config.json when it describes the same architecture (unknown keys, token ids and
    transformers' own spellings kept), with the dtype updated; else the one :func:`hf_config_dict` builds."""
    if original:
        try:
            same = model_config_from_hf(original) == model_cfg
        except ConversionError:
            same = False
        if same:
            out = dict(original)
            for key in ("dtype", "torch_dtype"):
                if key in out or key == "dtype":
                    out[key] = dtype_name(dtype)
            return out
    extra = {k: v for k, v in (original or {}).items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return hf_config_dict(model_cfg, dtype, **extra)


def _tokenizer_source(given: str | None, root: str | None, info: dict) -> str | None:
    if given:
        if not has_tokenizer(given):
            raise ConversionError(
                f"--tokenizer {given}: no tokenizer files there (tokenizer.json, tokenizer.model or vocab.json)"
            )
        return given
    for candidate in (os.path.join(root, HF_FILES_DIR) if root else None, info.get("hf_source")):
        if candidate and has_tokenizer(candidate):
            return candidate
    return None


# --------------------------------------------------------------------------------------- records
def resolve_checkpoint(path: str | os.PathLike) -> str:
    """The checkpoint directory of ``path``: ``path`` itself when it is one (a ``step_*`` directory with
    a manifest), else the one a checkpoint root's ``latest`` names."""
    from gift_megatron.megatron.checkpoint import MANIFEST_NAME, latest_checkpoint

    path = str(os.fspath(path))
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise ConversionError(
            f"{path}: no complete Megatron checkpoint here (expected a step_* directory with "
            "gift_checkpoint.json, or a root holding one)"
        )
    return found


def conversion_root(given: str, path: str) -> str | None:
    """The directory holding the conversion record of the checkpoint ``path`` (resolved from what the user
    gave, ``given``): ``given`` itself (a checkpoint root) or ``path``'s parent; None when neither has one."""
    for candidate in (given, os.path.dirname(os.path.abspath(path))):
        if os.path.isfile(os.path.join(candidate, CONVERSION_FILE)):
            return candidate
    return None


def read_conversion_info(path: str | os.PathLike) -> dict:
    """The conversion record of a converted checkpoint root: ``model_config`` (ModelConfig fields),
    ``dtype``, ``hf_source`` (the HF folder converted), ``hf_config`` (its config.json)."""
    file = os.path.join(os.fspath(path), CONVERSION_FILE)
    if not os.path.isfile(file):
        raise ConversionError(
            f"{path}: no {CONVERSION_FILE} (not written by tools/convert_hf_to_megatron.py); "
            "pass the architecture with --hf-config"
        )
    try:
        with open(file, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{file}: unreadable ({exc})") from exc


def model_config_from_info(info: dict):
    """The ModelConfig a conversion record describes."""
    from gift_megatron.megatron.model import ModelConfig

    return ModelConfig(**info["model_config"])


def checkpoint_dtype(path: str) -> torch.dtype:
    """The dtype of a Megatron checkpoint's weights (its word embedding's, from the tensor metadata)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(path)
    for key, value in meta.items():
        if key.endswith("embedding.word_embeddings.weight") and getattr(value, "dtype", None) is not None:
            return value.dtype
    raise ConversionError(f"{path}: the checkpoint has no embedding.word_embeddings.weight tensor")
