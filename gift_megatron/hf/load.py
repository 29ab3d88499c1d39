"""Fill a (TP/PP-sharded) Megatron GPTModel in memory from Hugging Face tensors.

    from gift_megatron.hf import load_hf_weights_into_model
    load_hf_weights_into_model(model, model_cfg, "/models/Qwen2.5-7B")          # a folder, streamed
    load_hf_weights_into_model(model, model_cfg, {"model.embed_tokens.weight": t, ...})   # in memory

Every rank of every layout loads what it holds itself: a rank reads only the HF tensors of its pipeline
stage (and of its expert-parallel rank's experts) and copies only its tensor-parallel rows / columns (QKV
per query group, ``[gate_r; up_r]`` for fc1, zero-padded vocabulary rows; routed experts over the expert-TP
ranks). No collective is involved. Mixture-of-Experts tensors may come per expert (on-disk names) or fused
as transformers 5 holds them in memory (``mlp.experts.gate_up_proj`` / ``down_proj``).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from gift_megatron.hf.hf_io import ConversionError, HFCheckpoint
from gift_megatron.hf.layout import LocalParam, as_chunks, local_params
from gift_megatron.hf.mapping import expected_hf_shapes, hf_names, megatron_tensor_from_hf, split_fused_hf


@torch.no_grad()
def load_hf_weights_into_model(
    model: Any, model_cfg: Any, source: Any, *, progress: bool = False, only: Any = None
) -> int:
    """Set every parameter of this rank's model chunk(s) from Hugging Face tensors; returns how many.

    Args:
        model: this rank's GPTModel (possibly wrapped in DDP / Float16Module) or its list of
            virtual-pipeline chunks, built for ``model_cfg`` at any TP/PP (local or Transformer Engine spec).
        model_cfg: its :class:`~gift_megatron.megatron.model.ModelConfig`.
        source: a Hugging Face folder (path or :class:`HFCheckpoint`; read shard by shard, only this
            stage's tensors), or HF (name, full tensor) pairs: a mapping or an iterable (e.g. a stream of
            ``iter_hf_weights`` buckets flattened). A tied ``lm_head.weight`` is ignored.
        progress: show a tqdm bar (bytes read).
        only: set only the parameters for which ``only(local_param)`` is true (the others are neither read
            nor required; the streaming conversion fills one layer at a time this way).

    Tensors are cast to each parameter's dtype and copied to its device. Each parameter is set as soon
    as all its HF parts have arrived (q, k, v for QKV; gate, up for fc1), so host memory holds at most the
    parts of the tensors in flight. Only the model's parameters change: a mixed-precision or distributed
    optimizer built already keeps fp32 copies, refresh them with its ``reload_model_params()``.

    Raises:
        ConversionError naming the tensor: an HF name the model does not have, a shape that does not
        match the config, or parameters whose HF tensors never came.
    """
    chunks = as_chunks(model)
    groups = {False: _tp(), True: _etp()}  # (size, rank) that splits a dense / a routed expert's tensor
    params = local_params(chunks, tied_output=True)
    if only is not None:
        params = [lp for lp in params if only(lp)]
    expected = expected_hf_shapes(model_cfg)
    # HF name -> the parameters that need it (a tied embedding feeds the embedding and its last-stage copy).
    needs: dict[str, list[int]] = defaultdict(list)
    for k, lp in enumerate(params):
        for n in hf_names(lp.name, lp.layer, model_cfg):
            needs[n].append(k)
    parts: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    done: set[int] = set()
    received: set[str] = set()

    if isinstance(source, Mapping):  # everything checked before the model changes
        source = dict(_split_fused(source.items(), model_cfg))
        for name, tensor in source.items():
            _check(name, tensor, expected, model_cfg)
        _raise_if_unset(
            params,
            [k for k, lp in enumerate(params) if any(n not in source for n in hf_names(lp.name, lp.layer, model_cfg))],
            set(source),
            model_cfg,
        )
    stream, total = _stream(source, set(needs))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="HF -> Megatron", unit="B", unit_scale=True)
    for name, tensor in _split_fused(stream, model_cfg):
        if bar is not None:
            bar.update(tensor.numel() * tensor.element_size())
        _check(name, tensor, expected, model_cfg)
        received.add(name)
        for k in needs.get(name, ()):
            lp = params[k]
            names = hf_names(lp.name, lp.layer, model_cfg)
            parts[k][name] = tensor
            if len(parts[k]) == len(names):
                got = parts.pop(k)
                _set(lp, [got[n] for n in names], model_cfg, *groups[lp.expert])
                done.add(k)
    if bar is not None:
        bar.close()
    _raise_if_unset(params, [k for k in range(len(params)) if k not in done], received, model_cfg)
    return len(done)


def _raise_if_unset(params: list[LocalParam], unset: list[int], received: set[str], model_cfg: Any) -> None:
    if unset:
        missing = sorted({n for k in unset for n in hf_names(params[k].name, params[k].layer, model_cfg)} - received)
        raise ConversionError(
            f"{len(unset)} parameters were not set: the HF source has no {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}"
        )


def _split_fused(pairs, model_cfg: Any):
    """(name, tensor) pairs with transformers' fused expert tensors replaced by their per-expert views."""
    for name, tensor in pairs:
        try:
            yield from split_fused_hf(name, tensor, model_cfg)
        except ValueError as exc:
            raise ConversionError(str(exc)) from None


def _check(name: str, tensor: torch.Tensor, expected: dict[str, tuple[int, ...]], model_cfg: Any) -> None:
    if name not in expected and not (name == "lm_head.weight" and model_cfg.tie_embeddings):
        raise ConversionError(f"HF tensor {name!r} is not part of a {model_cfg.family} model with this config")
    if name in expected and tuple(tensor.shape) != expected[name]:
        raise ConversionError(
            f"HF tensor {name!r} has shape {list(tensor.shape)}, the config implies {list(expected[name])}"
        )


def _set(lp: LocalParam, parts: list[torch.Tensor], model_cfg: Any, tp: int, tp_rank: int) -> None:
    param = lp.param
    vocab = lp.name in ("embedding.word_embeddings.weight", "output_layer.weight")
    split = tp if lp.tp_split else 1
    shard = megatron_tensor_from_hf(
        lp.name,
        lp.layer,
        parts,
        model_cfg,
        tp=split,
        tp_rank=tp_rank if split > 1 else 0,
        partition_dim=lp.partition_dim,
        padded_rows=param.shape[0] * split if vocab else None,
    )
    if tuple(shard.shape) != tuple(param.shape):
        where = f"decoder.layers.{lp.layer}.{lp.name}" if lp.layer is not None else lp.name
        raise ConversionError(
            f"{where}: the HF tensors give shape {list(shard.shape)} on TP rank {tp_rank}, the "
            f"model has {list(param.shape)} (does the model match the HF config?)"
        )
    param.copy_(shard)


def _tp() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def _etp() -> tuple[int, int]:
    """(size, rank) of the expert tensor-parallel group (TP's before Megatron has expert groups)."""
    from megatron.core import parallel_state as ps

    try:
        size, rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
        if size is None or rank is None:  # Megatron returns None before its expert groups exist
            return _tp()
        return size, rank
    except (AssertionError, AttributeError, RuntimeError):
        return _tp()


def _stream(source: Any, wanted: set[str]):
    """(iterator of (name, tensor), total bytes or None) for any accepted source."""
    if isinstance(source, (str, os.PathLike)):
        source = HFCheckpoint(source)
    if isinstance(source, HFCheckpoint):
        names = [n for n in source.names if n in wanted]
        return source.iter_tensors(names), source.nbytes(names)
    if isinstance(source, Mapping):
        return iter(source.items()), sum(t.numel() * t.element_size() for t in source.values())
    return iter(source), None
