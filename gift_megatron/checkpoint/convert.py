"""Hugging Face folder <-> Megatron distributed checkpoint, for the dense families of :mod:`.mapping`.

HF -> Megatron builds the model once at TP=1 / PP=1 on the CPU, fills it tensor by tensor from the
memory-mapped safetensors shards (a fused tensor reads just its parts), and saves it with
:func:`gift_megatron.megatron.save_checkpoint`: Megatron's distributed checkpoint then loads at any TP/PP.
Host memory: the model in its dtype plus one layer's tensors (Megatron-Core builds whole modules; writing
the torch_dist format without a model would need Megatron's private sharding metadata).

Megatron -> HF loads the checkpoint at TP=1 / PP=1 and streams :func:`iter_hf_weights` into safetensors
shards of at most ``max_shard_bytes``, with ``model.safetensors.index.json``, ``config.json`` and the
tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from gift_megatron.checkpoint.mapping import HF_ARCHITECTURES, fuse_fc1, fuse_qkv, hf_config_dict

CONVERSION_FILE = "gift_conversion.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "float32": torch.float32}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------- HF side
class HFCheckpoint:
    """A Hugging Face model folder: its config (as a ModelConfig) and lazy access to every tensor.

    Checks before any tensor is read: the architecture is supported, every shard the index names exists,
    and every shard's safetensors header is readable (a truncated file fails here, naming it).
    """

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        from gift_megatron.megatron.model import ModelConfig

        self.path = path
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise ConversionError(f"{path}: no config.json (is it a Hugging Face model folder?)")
        with open(cfg_file, encoding="utf-8") as fh:
            self.hf_config = json.load(fh)
        archs = self.hf_config.get("architectures") or []
        supported = sorted(HF_ARCHITECTURES.values())
        if not archs or archs[0] not in supported:
            raise ConversionError(f"{cfg_file}: unsupported architecture {archs[0] if archs else None!r}; supported: "
                                  f"{', '.join(supported)} (Megatron-Bridge, when installed, covers other families)")
        try:
            self.model_config = ModelConfig.from_hf_config(self.hf_config)
        except (ValueError, KeyError) as exc:
            raise ConversionError(f"{cfg_file}: {exc}") from exc
        self.dtype = DTYPES.get(str(self.hf_config.get("torch_dtype") or self.hf_config.get("dtype") or "float32"),
                                torch.float32)
        index_file = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_file):
            with open(index_file, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            weight_map = None
        else:
            raise ConversionError(f"{path}: no model.safetensors or model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles = {}
        for f in files:
            full = os.path.join(path, f)
            if not os.path.isfile(full):
                raise ConversionError(f"{index_file}: names shard {f}, which does not exist")
            try:
                self._handles[f] = safe_open(full, framework="pt")
            except Exception as exc:  # safetensors raises SafetensorError for truncated or corrupt files
                raise ConversionError(f"{full}: unreadable safetensors file ({exc})") from exc
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self._handles["model.safetensors"].keys()}
        self.weight_map = weight_map

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        file = self.weight_map[name]
        try:
            return self._handles[file].get_tensor(name)
        except Exception as exc:
            raise ConversionError(f"{os.path.join(self.path, file)}: cannot read {name!r} ({exc})") from exc

    def total_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, f)) for f in self._handles)


def megatron_tensor_from_hf(name: str, layer: int | None, hf: HFCheckpoint, model_cfg) -> torch.Tensor:
    """The full (TP=1) Megatron tensor ``name`` (layer-local name for decoder layers) from HF tensors."""
    from gift_megatron.checkpoint.mapping import FAMILY_TABLES, TOP_LEVEL

    if layer is None:
        t = hf.tensor(TOP_LEVEL[name] if not (name == "output_layer.weight" and model_cfg.tie_embeddings)
                      else "model.embed_tokens.weight")
        return t
    p = f"model.layers.{layer}."
    if name in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = name.rsplit(".", 1)[1]
        q, k, v = (hf.tensor(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv")
        return fuse_qkv(q, k, v, model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.head_dim)
    if name == "mlp.linear_fc1.weight":
        return fuse_fc1(hf.tensor(f"{p}mlp.gate_proj.weight"), hf.tensor(f"{p}mlp.up_proj.weight"), 1)
    table = FAMILY_TABLES[model_cfg.family]
    if name not in table:
        raise ConversionError(f"family {model_cfg.family}: no Hugging Face tensor for decoder.layers.N.{name}")
    return hf.tensor(table[name].format(i=layer))


@torch.no_grad()
def load_hf_weights_into_model(model, model_cfg, hf: HFCheckpoint, progress: bool = False) -> int:
    """Fill this rank's (TP/PP-sharded) model chunk from ``hf``; returns the number of tensors set.

    Each full tensor is built from its HF parts and this rank's TP slice copied in (Megatron marks sharded
    parameters with ``partition_dim``); vocabulary rows beyond the HF vocabulary (padding) are zeroed.
    """
    from megatron.core import parallel_state as ps

    from gift_megatron.checkpoint.export import _local_tensors

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    items = _local_tensors(model, model_cfg.tie_embeddings)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="HF -> Megatron", unit="tensor")
    for name, layer, param in items:
        full = megatron_tensor_from_hf(name, layer, hf, model_cfg)
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            padded = torch.zeros(param.shape[0] * (tp if getattr(param, "tensor_model_parallel", False) else 1),
                                 full.shape[1], dtype=full.dtype)
            padded[:full.shape[0]] = full
            full = padded
        if tp > 1 and getattr(param, "tensor_model_parallel", False):
            if name == "mlp.linear_fc1.weight":  # per-rank [gate_r; up_r] (mapping.split_fc1)
                gate, up = full.chunk(2, dim=0)
                full = fuse_fc1(gate, up, tp)
            full = full.chunk(tp, dim=param.partition_dim)[rank]
        if tuple(full.shape) != tuple(param.shape):
            raise ConversionError(f"{hf.path}: {name} (layer {layer}) has shape {list(full.shape)}, the model expects "
                                  f"{list(param.shape)}")
        param.copy_(full.to(param.dtype))
    return len(items)


# --------------------------------------------------------------------------------- process set-up
@contextmanager
def single_process_megatron(tp: int = 1, pp: int = 1) -> Iterator[None]:
    """A gloo world of one process with Megatron's parallel state (for conversion on a CPU machine)."""
    import torch.distributed as dist

    from gift_megatron.parallel import destroy_model_parallel_cpu, initialize_model_parallel_cpu

    owned = not dist.is_initialized()
    tmp = tempfile.mkdtemp(prefix="gift_convert_")
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
    initialize_model_parallel_cpu(tp, pp)
    try:
        yield
    finally:
        destroy_model_parallel_cpu()
        if owned:
            dist.destroy_process_group()
        shutil.rmtree(tmp, ignore_errors=True)


def _build(model_cfg, dtype: torch.dtype):
    from gift_megatron.megatron.model import ParallelConfig, PrecisionConfig, build_model

    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    # No random initialization: every weight is overwritten (from HF or from the checkpoint).
    return build_model(model_cfg, ParallelConfig(), PrecisionConfig(dtype=name), perform_initialization=False)


def read_conversion_info(path: str) -> dict:
    """The conversion record of a converted Megatron checkpoint root (architecture, dtype, HF source)."""
    file = os.path.join(path, CONVERSION_FILE)
    if not os.path.isfile(file):
        raise ConversionError(f"{path}: no {CONVERSION_FILE} (not written by tools/convert_hf_to_megatron.py); "
                              "pass the architecture with --hf-config")
    with open(file, encoding="utf-8") as fh:
        return json.load(fh)


def model_config_from_info(info: dict):
    from gift_megatron.megatron.model import ModelConfig

    return ModelConfig(**info["model_config"])


def has_tokenizer(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def check_tokenizer_fits(tokenizer_dir: str, vocab_size: int) -> None:
    """A tokenizer whose ids exceed the model's vocabulary is an error naming both sizes."""
    from transformers import AutoTokenizer

    try:
        n = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{tokenizer_dir}: cannot load the tokenizer ({exc})") from exc
    if n > vocab_size:
        raise ConversionError(f"{tokenizer_dir}: the tokenizer has {n} tokens but the model's vocab_size is "
                              f"{vocab_size}: ids past the embedding would crash or read garbage")


def hf_to_megatron(hf_dir: str, out_dir: str, *, dtype: str | None = None, progress: bool = True) -> str:
    """Convert a Hugging Face folder to a Megatron checkpoint under ``out_dir`` (loadable at any TP/PP).
    Returns the checkpoint path (``out_dir/step_00000000``; ``out_dir`` itself also works for loading)."""
    from gift_megatron.megatron.checkpoint import save_checkpoint

    hf = HFCheckpoint(hf_dir)
    if has_tokenizer(hf_dir):
        check_tokenizer_fits(hf_dir, hf.model_config.vocab_size)
    target = DTYPES[dtype] if dtype else hf.dtype
    os.makedirs(out_dir, exist_ok=True)
    with single_process_megatron():
        model = _build(hf.model_config, target)
        load_hf_weights_into_model(model, hf.model_config, hf, progress=progress)
        path = save_checkpoint(out_dir, 0, [model], extra={"hf_source": os.path.abspath(hf_dir)})
    info = {"model_config": dataclasses.asdict(hf.model_config), "dtype": str(target).replace("torch.", ""),
            "hf_source": os.path.abspath(hf_dir), "hf_config": hf.hf_config}
    with open(os.path.join(out_dir, CONVERSION_FILE), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2)
    return path


def resolve_checkpoint(path: str) -> str:
    """A checkpoint dir from a checkpoint root (its ``latest``) or the checkpoint dir itself."""
    from gift_megatron.megatron.checkpoint import MANIFEST_NAME, latest_checkpoint

    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise ConversionError(f"{path}: no complete Megatron checkpoint here")
    return found


def write_safetensors_shards(named: Iterator[tuple[str, torch.Tensor]], out_dir: str, max_shard_bytes: int,
                             metadata: dict | None = None) -> dict[str, str]:
    """Write (name, tensor) pairs into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most
    ``max_shard_bytes`` (one larger tensor gets a shard of its own) plus the index; returns the weight map.
    Shards are written to temporary names first and renamed once their count is known."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    size, written, weight_map = 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            tmp = os.path.join(out_dir, f".shard-{len(written):05d}.tmp")
            save_file({k: v.contiguous() for k, v in shard.items()}, tmp, metadata={"format": "pt"})
            written.append((tmp, list(shard)))
            shard, size = {}, 0

    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor.detach().cpu()
        size += nbytes
    flush()
    total = len(written)
    for i, (tmp, names) in enumerate(written):
        final = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(tmp, os.path.join(out_dir, final))
        weight_map.update({n: final for n in names})
    if total > 1:
        index = {"metadata": {"total_size": sum(os.path.getsize(os.path.join(out_dir, f))
                                                for f in set(weight_map.values())), **(metadata or {})},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)
    return weight_map


def megatron_to_hf(ckpt: str, out_dir: str, *, tokenizer_dir: str | None = None, dtype: str | None = None,
                   max_shard_bytes: int = 5 << 30, model_config: Any = None, progress: bool = True) -> str:
    """Convert a Megatron checkpoint (dir or root) to a Hugging Face folder ``out_dir``; returns it."""
    from gift_megatron.checkpoint.export import iter_hf_weights
    from gift_megatron.megatron.checkpoint import load_checkpoint

    root = ckpt if os.path.isfile(os.path.join(ckpt, CONVERSION_FILE)) else os.path.dirname(os.path.abspath(ckpt))
    info = read_conversion_info(root) if model_config is None else {"model_config": dataclasses.asdict(model_config)}
    model_cfg = model_config or model_config_from_info(info)
    path = resolve_checkpoint(ckpt)
    # The dtype the checkpoint was saved in: recorded by the converter; for a training run's checkpoint,
    # --dtype names it (its precision.dtype), else fp32.
    src_dtype = DTYPES.get(info.get("dtype") or dtype or "float32", torch.float32)
    target = DTYPES[dtype] if dtype else src_dtype
    if tokenizer_dir and not has_tokenizer(tokenizer_dir):
        raise ConversionError(f"--tokenizer {tokenizer_dir}: no tokenizer files there ({', '.join(TOKENIZER_FILES[:4])})")
    if tokenizer_dir is None and info.get("hf_source") and has_tokenizer(info["hf_source"]):
        tokenizer_dir = info["hf_source"]
    if tokenizer_dir:
        check_tokenizer_fits(tokenizer_dir, model_cfg.vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    with single_process_megatron():
        model = _build(model_cfg, src_dtype)
        load_checkpoint(path, [model], restore_rng=False)
        named = (t for bucket in iter_hf_weights(model, model_cfg, bucket_bytes=256 << 20, dtype=target)
                 for t in bucket)
        if progress:
            from tqdm.auto import tqdm

            named = tqdm(named, desc="Megatron -> HF", unit="tensor")
        write_safetensors_shards(named, out_dir, max_shard_bytes)
    extra = {k: v for k, v in (info.get("hf_config") or {}).items()
             if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = hf_config_dict(model_cfg, target, **extra)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    if tokenizer_dir:
        for f in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer_dir, f)):
                shutil.copy2(os.path.join(tokenizer_dir, f), os.path.join(out_dir, f))
    return out_dir


def write_hf_config(directory: str, config: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
