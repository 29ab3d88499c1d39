"""Reading and writing Hugging Face model folders: config.json, safetensors files (one, or shards with
``model.safetensors.index.json``) and the tokenizer files.

:class:`HFCheckpoint` validates a folder completely before any tensor is read (architecture, config,
index, every shard's header and size, the tensor names and shapes the model needs) and then streams the
tensors shard by shard in file order, each one a zero-copy view of the memory-mapped file.

:class:`SafetensorsShardWriter` writes (name, tensor) pairs into shards of bounded size with safetensors'
``save_file`` (0.8 writes straight from the tensors' memory; releases before it copied a whole shard into
memory first, safetensors issue #458), fsyncs each finished shard in the background, then writes the index.

Why the reading side is written here and not with ``safetensors.safe_open``: its ``get_tensor`` copies each
tensor out of the file (measured on a 0.5 GB bf16 shard: 1.2 s and +0.5 GB resident, against 0.17 s to
read every byte of the zero-copy views below). The format is small and fixed
(https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`` (padded with spaces to a multiple of 8), then the tensors' bytes, contiguous, in offset order.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import shutil
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from gift_megatron.errors import StartupError
from gift_megatron.hf.mapping import (
    HF_ARCHITECTURES,
    MOE_ARCHITECTURES,
    SUPPORTED_ARCHITECTURES,
    expected_hf_shapes,
    fused_hf_names,
    fused_hf_shape,
    split_fused_hf,
)

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# A routed expert's weight in on-disk naming: model.layers.<layer>.(mlp|block_sparse_moe).experts.<expert>.
_EXPERT_HF = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.")


class ConversionError(StartupError):
    """A checkpoint that cannot be converted; the message names the file, field or flag and the problem."""


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (the spelling of config.json's ``dtype``)."""
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str | torch.dtype | None, what: str = "--dtype") -> torch.dtype | None:
    """bf16 / fp16 / fp32 (or bfloat16 / float16 / float32, or a torch dtype) -> torch dtype; None stays."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConversionError(f"{what} {name!r}: expected one of bf16, fp16, fp32")
    return DTYPES[name]


def parse_size(text: str | int, what: str = "--max-shard-size") -> int:
    """Bytes from '5GB' (10^9, as Hugging Face counts), '500MiB' (2^20), '100KB' or a plain number."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
        if not match:
            raise ConversionError(f"{what} {text!r}: expected a size such as 5GB, 500MB, 2GiB or 1000000")
        unit = (match.group(2) or "B").upper().replace("IB", "iB")
        scale = {
            "B": 1,
            "KB": 10**3,
            "MB": 10**6,
            "GB": 10**9,
            "TB": 10**12,
            "KiB": 2**10,
            "MiB": 2**20,
            "GiB": 2**30,
            "TiB": 2**40,
        }[unit]
        value = int(float(match.group(1)) * scale)
    if value < 1:
        raise ConversionError(f"{what} {text!r}: must be at least 1 byte")
    return value


# --------------------------------------------------------------------------------- safetensors files
def read_safetensors_header(path: str) -> tuple[dict[str, dict[str, Any]], int]:
    """(tensor name -> {"dtype", "shape", "data_offsets"}, offset of the data section) of a safetensors
    file, checked against the file's size: a truncated or corrupt file raises ConversionError naming it
    (and the first tensor whose bytes are missing)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ConversionError(
                f"{path}: truncated safetensors file: the header says {n} header bytes, the file has {size} bytes"
            )
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConversionError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            dtype = _ST_DTYPES[info["dtype"]]
            numel = 1
            for s in info["shape"]:
                numel *= int(s)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"{path}: corrupt safetensors header entry for {name!r} ({exc!r})") from exc
        if end > data:
            raise ConversionError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end} of the "
                f"data section, which has {data} bytes"
            )
        if end - begin != numel * dtype.itemsize:
            raise ConversionError(
                f"{path}: corrupt safetensors header: tensor {name!r} has {end - begin} bytes "
                f"for shape {info['shape']} {info['dtype']}"
            )
    return header, 8 + n


class _MappedFile:
    """A safetensors file mapped copy-on-write: tensors are zero-copy views of the page cache (writable
    views, so torch does not warn; writes would stay private to this process)."""

    def __init__(self, path: str, header: dict[str, dict[str, Any]], data_start: int) -> None:
        self.path, self.header, self.data_start = path, header, data_start
        with open(path, "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if os.path.getsize(path) else None

    def tensor(self, name: str) -> torch.Tensor:
        info = self.header[name]
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype, device="cpu")  # read from the file, like the rest
        flat = torch.frombuffer(
            self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self.data_start + begin
        )
        return flat.reshape(info["shape"])

    def names_in_file_order(self) -> list[str]:
        return sorted(self.header, key=lambda n: self.header[n]["data_offsets"][0])


class HFCheckpoint:
    """A Hugging Face causal-LM folder of a supported family, validated before any tensor is read.

    Attributes: ``path``; ``hf_config`` (config.json as a dict); ``model_config`` (the
    :class:`~gift_megatron.megatron.model.ModelConfig`); ``dtype`` (the torch dtype of the weights, read
    from the embedding tensor); ``weight_map`` (tensor name in the files -> file name); ``names`` (the
    tensors in Hugging Face's on-disk naming, per expert for Mixture-of-Experts layers, in file order);
    ``total_bytes`` (tensor bytes).

    Mixture-of-Experts files may name the experts one by one (what transformers writes) or fused as
    transformers 5 holds them in memory (``mlp.experts.gate_up_proj`` [E, 2*I, h], ``mlp.experts.down_proj``
    [E, h, I]); either way :meth:`iter_tensors` and :meth:`tensor` give the per-expert tensors (views of
    the fused ones, see :func:`~.mapping.split_fused_hf`).

    Raises ConversionError naming the file and the problem for: no config.json, an unsupported
    architecture (listing the supported ones), a config Megatron cannot express, no safetensors weights,
    an unreadable index, a shard the index names that does not exist, a truncated or corrupt shard, a
    number of experts other than config.json's (both numbers and the file), and tensors missing,
    unexpected or of the wrong shape for the config.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.hf_config = read_hf_config(self.path)
        self.model_config = model_config_from_hf(self.hf_config, os.path.join(self.path, "config.json"))
        self.weight_map, index_file = self._weight_map()
        self._headers: dict[str, tuple[dict[str, dict[str, Any]], int]] = {}
        for file in sorted(set(self.weight_map.values())):
            full = os.path.join(self.path, file)
            if not os.path.isfile(full):
                raise ConversionError(f"{index_file}: names shard {file}, which does not exist in {self.path}")
            self._headers[file] = read_safetensors_header(full)
        for name, file in self.weight_map.items():
            if name not in self._headers[file][0]:
                raise ConversionError(f"{index_file}: maps {name!r} to {file}, which does not contain it")
        # On-disk name -> (name in the file, its part): fused expert tensors stand for several names.
        self._source: dict[str, tuple[str, int | None]] = {}
        for name in self.weight_map:
            parts = fused_hf_names(name, self.model_config)
            for k, part in enumerate(parts or [name]):
                self._source[part] = (name, k if parts is not None else None)
        self._check_experts()
        self._check_tensors()
        embed = self._info("model.embed_tokens.weight")
        self.dtype = _ST_DTYPES[embed["dtype"]]
        self.names = [
            n
            for file in sorted(self._headers)
            for raw in self._file_order(file)
            for n in (fused_hf_names(raw, self.model_config) or [raw])
        ]
        self.total_bytes = self.nbytes(self.names)

    def _file_order(self, file: str) -> list[str]:
        header = self._headers[file][0]
        return [n for n in sorted(header, key=lambda n: header[n]["data_offsets"][0]) if self.weight_map.get(n) == file]

    def _expert_key(self) -> str:
        return "num_local_experts" if "num_local_experts" in self.hf_config else "num_experts"

    def _check_experts(self) -> None:
        """A checkpoint with another number of experts than config.json: one error naming both numbers and
        the file, instead of a list of missing or unexpected tensors."""
        cfg = self.model_config
        want = getattr(cfg, "num_experts", 0)
        if not want:
            return
        key = self._expert_key()
        for name, file in sorted(self.weight_map.items()):
            if fused_hf_names(name, cfg) is not None and len(fused_hf_shape(name, cfg)) == 3:
                got = list(self._headers[file][0][name]["shape"])
                if got and got[0] != want:
                    raise ConversionError(
                        f"{os.path.join(self.path, file)}: {name} holds {got[0]} experts (shape "
                        f"{got}), config.json says {key}={want}"
                    )
        per_layer: dict[int, dict[int, str]] = {}
        for name, file in self.weight_map.items():
            m = _EXPERT_HF.match(name)
            if m:
                per_layer.setdefault(int(m.group(1)), {})[int(m.group(2))] = file
        for layer, found in sorted(per_layer.items()):
            if len(found) != want or max(found) != want - 1:
                files = ", ".join(sorted({os.path.join(self.path, f) for f in found.values()}))
                raise ConversionError(
                    f"{files}: layer {layer} has {len(found)} experts (indices {min(found)}.."
                    f"{max(found)}), config.json says {key}={want}"
                )

    def _weight_map(self) -> tuple[dict[str, str], str]:
        index_file = os.path.join(self.path, INDEX_FILE)
        if os.path.isfile(index_file):
            try:
                with open(index_file, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConversionError(
                    f"{index_file}: unreadable index ({exc!r}); expected a JSON object with a "
                    "'weight_map' of tensor name -> shard file"
                ) from exc
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index_file}: 'weight_map' is empty or not an object")
            return weight_map, index_file
        single = os.path.join(self.path, SINGLE_FILE)
        if os.path.isfile(single):
            header, _ = read_safetensors_header(single)
            return {name: SINGLE_FILE for name in header}, single
        if any(f.startswith("pytorch_model") and f.endswith(".bin") for f in os.listdir(self.path)):
            raise ConversionError(
                f"{self.path}: only pytorch_model*.bin weights; convert them to safetensors first "
                "(transformers: model.save_pretrained(dir, safe_serialization=True))"
            )
        raise ConversionError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _info(self, name: str) -> dict[str, Any]:
        return self._headers[self.weight_map[name]][0][name]

    def _shape(self, name: str) -> tuple[int, ...]:
        """Shape of on-disk name ``name`` (of its part, for a fused expert tensor)."""
        raw, part = self._source[name]
        shape = tuple(self._info(raw)["shape"])
        if part is None or len(fused_hf_shape(raw, self.model_config)) == 2:  # Mixtral's router: renamed only
            return shape
        if raw.endswith("gate_up_proj"):
            return (shape[1] // 2, shape[2])
        return shape[1:]

    def nbytes(self, names: Iterable[str]) -> int:
        """Bytes of the tensors ``names`` (on-disk names) in the files."""
        total = 0
        for n in names:
            raw, _ = self._source[n]
            numel = 1
            for d in self._shape(n):
                numel *= d
            total += numel * _ST_DTYPES[self._info(raw)["dtype"]].itemsize
        return total

    def _check_tensors(self) -> None:
        expected = expected_hf_shapes(self.model_config)
        have = set(self._source)
        tied_head = {"lm_head.weight"} if self.model_config.tie_embeddings else set()
        missing = sorted(set(expected) - have)
        unexpected = sorted(have - set(expected) - tied_head)
        wrong = [
            f"{n}: {list(self._shape(n))} (config implies {list(expected[n])})"
            for n in sorted(have & set(expected))
            if self._shape(n) != expected[n]
        ]
        for raw in sorted(self.weight_map):  # fused expert tensors: their whole shape
            if fused_hf_names(raw, self.model_config) is not None:
                want = fused_hf_shape(raw, self.model_config)
                if tuple(self._info(raw)["shape"]) != want:
                    wrong.append(f"{raw}: {list(self._info(raw)['shape'])} (config implies {list(want)})")
        problems = []
        if missing:
            problems.append(f"missing tensors {_few(missing)}")
        if unexpected:
            problems.append(
                f"tensors the {HF_ARCHITECTURES[self.model_config.family]} mapping does not use {_few(unexpected)}"
            )
        if wrong:
            problems.append(f"shapes that do not match config.json: {_few(wrong)}")
        if problems:
            raise ConversionError(f"{self.path}: " + "; ".join(problems))

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor by its on-disk name (read from its shard; a copy)."""
        if name not in self._source:
            raise ConversionError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        raw, _ = self._source[name]
        file = self.weight_map[raw]
        full = _MappedFile(os.path.join(self.path, file), *self._headers[file]).tensor(raw)
        return dict(split_fused_hf(raw, full, self.model_config))[name].clone()

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(on-disk name, tensor) of ``names`` (default: all), shard by shard, each shard in file order, so the
        disk is read sequentially once. Tensors are zero-copy views of the memory-mapped shard (a fused expert
        tensor gives its experts as views of it): copy what must outlive the next shard (the map is released
        when the last view is)."""
        wanted = set(self._source) if names is None else set(names)
        raws = {self._source[n][0] for n in wanted if n in self._source}
        for file in sorted(self._headers):
            header, start = self._headers[file]
            mapped = _MappedFile(os.path.join(self.path, file), header, start)
            for raw in mapped.names_in_file_order():
                if raw in raws and self.weight_map.get(raw) == file:
                    for name, tensor in split_fused_hf(raw, mapped.tensor(raw), self.model_config):
                        if name in wanted:
                            yield name, tensor
            del mapped


def read_hf_config(path: str) -> dict[str, Any]:
    """config.json of the folder ``path`` (or the JSON file ``path``) as a dict, architecture checked."""
    if os.path.isfile(path) and path.endswith(".json"):
        cfg_file = path
    elif os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
    else:
        raise ConversionError(f"{path}: not a directory (expected a Hugging Face model folder)")
    if not os.path.isfile(cfg_file):
        raise ConversionError(f"{path}: no config.json (is it a Hugging Face model folder?)")
    try:
        with open(cfg_file, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{cfg_file}: unreadable ({exc})") from exc
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        experts = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
        what = "Mixture-of-Experts architecture" if experts else "architecture"
        moe = f" (Mixture-of-Experts: {', '.join(MOE_ARCHITECTURES)})" if experts else ""
        raise ConversionError(
            f"{cfg_file}: unsupported {what} {arch!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}{moe} (tools/README.md says what other "
            "families need)"
        )
    return cfg


def model_config_from_hf(cfg: dict[str, Any], where: str = "config.json"):
    """The ModelConfig of a supported config.json, refusing what Megatron's GPTModel cannot express."""
    from gift_megatron.megatron.model import ModelConfig

    arch = (cfg.get("architectures") or [None])[0]
    family = {v: k for k, v in HF_ARCHITECTURES.items()}.get(arch)
    if family is not None and cfg.get("model_type") != family:
        raise ConversionError(
            f"{where}: architectures {arch!r} with model_type {cfg.get('model_type')!r} (expected {family!r})"
        )
    if family in ("llama", "qwen3", "qwen3_moe", "mixtral") and cfg.get("attention_bias"):
        raise ConversionError(
            f"{where}: attention_bias=true puts a bias on o_proj too, which Megatron's add_qkv_bias does not have"
        )
    if cfg.get("mlp_bias"):
        raise ConversionError(f"{where}: mlp_bias=true is not supported (Megatron models have no MLP biases here)")
    if cfg.get("use_sliding_window") or (family == "mixtral" and cfg.get("sliding_window")):
        raise ConversionError(f"{where}: sliding-window attention is not supported (full attention only)")
    try:
        return ModelConfig.from_hf_config(cfg)
    except (ValueError, KeyError) as exc:
        raise ConversionError(f"{where}: {exc}") from exc


def _few(items: list[str], n: int = 6) -> str:
    return "[" + ", ".join(items[:n]) + (f", ... ({len(items)} in all)]" if len(items) > n else "]")


# ----------------------------------------------------------------------------------------- writing
class SafetensorsShardWriter:
    """Writes (name, tensor) pairs as Hugging Face safetensors shards of at most ``max_shard_bytes`` of
    tensor data each (a single larger tensor gets a shard of its own), in the order given.

    Each shard is written under a temporary name; :meth:`close` waits until every shard is on disk, renames
    them to ``model-0000i-of-0000N.safetensors`` (``model.safetensors`` when there is one) and writes the
    index (only for several shards, as transformers does). Tensor bytes are written straight from the
    tensor (any device, dtype, layout: it is made contiguous on the CPU first); nothing else is buffered.
    A finished shard is fsync'ed in a background thread while the next one is produced.
    """

    def __init__(self, out_dir: str, max_shard_bytes: int) -> None:
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        os.makedirs(out_dir, exist_ok=True)
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []
        self._syncs: list[Any] = []
        self._pool: Any = None
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending.append((name, tensor.detach()))
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        tmp = os.path.join(self.out_dir, f".model-shard-{len(self._written):05d}.tmp")
        write_safetensors(tmp, self._pending, fsync=False)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fsync-shard")
        self._syncs.append(self._pool.submit(_fsync_file, tmp))
        self._written.append((tmp, [n for n, _ in self._pending]))
        self._pending, self._pending_bytes = [], 0

    def close(self, metadata: dict[str, Any] | None = None) -> dict[str, str]:
        """Finish the last shard, name the shards, write the index; returns tensor name -> file name.
        Earlier model weights in ``out_dir`` (``model.safetensors``, ``model-*-of-*.safetensors``, the
        index) are removed first, so a folder converted twice holds one consistent set."""
        if self._pending:
            self._flush()
        for done in self._syncs:  # every shard on disk before any is renamed into place
            done.result()
        if self._pool is not None:
            self._pool.shutdown()
        for f in os.listdir(self.out_dir):
            if f in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.match(f):
                os.remove(os.path.join(self.out_dir, f))
        total = len(self._written)
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self._written):
            final = SINGLE_FILE if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(tmp, os.path.join(self.out_dir, final))
            weight_map.update(dict.fromkeys(names, final))
        if total > 1:
            index = {
                "metadata": {"total_size": self.total_bytes, **(metadata or {})},
                "weight_map": dict(sorted(weight_map.items())),
            }
            with open(os.path.join(self.out_dir, INDEX_FILE), "w", encoding="utf-8") as fh:
                json.dump(index, fh, indent=2)
        return weight_map


def write_safetensors(
    path: str, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None, *, fsync: bool = True
) -> None:
    """One safetensors file with ``tensors`` (names must be unique), fsync'ed unless ``fsync=False``.
    Tensors may be views of one fused tensor (q/k/v, gate/up): each is written as its own bytes."""
    from safetensors.torch import save_file

    named: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        if name in named:
            raise ValueError(f"write_safetensors: duplicate tensor name {name!r}")
        named[name] = t.detach().to("cpu").contiguous()
    save_file(named, path, metadata={"format": "pt", **(metadata or {})})
    if fsync:
        _fsync_file(path)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors_shards(
    named: Iterable[tuple[str, torch.Tensor]],
    out_dir: str,
    max_shard_bytes: int,
    metadata: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write (name, tensor) pairs as sharded safetensors + index into ``out_dir`` (see
    :class:`SafetensorsShardWriter`); returns tensor name -> file name."""
    writer = SafetensorsShardWriter(out_dir, max_shard_bytes)
    for name, tensor in named:
        writer.add(name, tensor)
    return writer.close(metadata)


def write_hf_config(directory: str, config: dict[str, Any]) -> None:
    """Write ``config`` as ``directory/config.json`` (creating the directory)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
        fh.write("\n")


# --------------------------------------------------------------------------------------- tokenizer
def has_tokenizer(directory: str | None) -> bool:
    """Whether ``directory`` holds a tokenizer (tokenizer.json, tokenizer.model or vocab.json)."""
    return bool(directory) and any(
        os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )


def tokenizer_size(directory: str) -> int | None:
    """len(tokenizer) (added tokens included) of the tokenizer in ``directory``, or None (with a warning)
    when transformers cannot load it (e.g. it needs trust_remote_code)."""
    try:
        from transformers import AutoTokenizer

        tokenizer: Any = AutoTokenizer.from_pretrained(directory)  # stubs type it Optional, per backend
        return len(tokenizer)
    except Exception as exc:  # any loader failure: the check is skipped, never the conversion
        logger.warning(
            "%s: cannot load the tokenizer to check its size against the model (%s: %s)",
            directory,
            type(exc).__name__,
            exc,
        )
        return None


def check_tokenizer_fits(directory: str, vocab_size: int, what: str = "tokenizer") -> None:
    """Raise ConversionError when the tokenizer in ``directory`` has more tokens than the model's
    ``vocab_size``: ids past the embedding would index garbage or crash."""
    n = tokenizer_size(directory)
    if n is not None and n > vocab_size:
        raise ConversionError(
            f"{what} {directory}: the tokenizer has {n} tokens but the model's vocab_size is "
            f"{vocab_size}: ids past the embedding would crash or read garbage"
        )


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files of :data:`TOKENIZER_FILES` found in ``src`` to ``dst``; returns their names."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, f)):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
            copied.append(f)
    return copied
