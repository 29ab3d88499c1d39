"""The weight stream as plain data, for vLLM workers in another process: buckets of (name, tensor) pairs packed
into msgpack-safe lists (:func:`pack_bucket`) and rebuilt in the worker (:func:`unpack_bucket`).

Three transports: CUDA IPC handles (the worker maps the sender's GPU memory), one file per bucket in a tmpfs
(:data:`SEGMENT_DIR`, /dev/shm) that every worker maps, and bytes inside the RPC message as the fallback.
Bucket files left by a killed process are removed by :func:`remove_stale_segments`.

Why a module of its own: it is the part of a weight update that runs on both sides of the process boundary
(the trainer's engine packs, vLLM's worker unpacks), and it needs neither vLLM nor a model.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from collections.abc import Sequence

import torch

__all__ = ["SEGMENT_DIR", "pack_bucket", "remove_stale_segments", "unpack_bucket"]

#: Where buckets for another process are written: tmpfs, so the tensors are copied once into memory that every
#: worker maps, instead of being serialized into the RPC message (measured on 2 CPU cores, 1.26 GB: 7.3 s
#: as bytes in the message, see benchmarks/weight_sync.py).
SEGMENT_DIR: str | None = "/dev/shm"
_ALIGN = 64  # every tensor starts on a 64-byte boundary: any dtype can be viewed in place
_warned_no_room: list[bool] = []
log = logging.getLogger("gift_megatron.rollout")


_SEGMENT_PREFIX = "gift_megatron_weights_"


def remove_stale_segments(directory: str | None = None) -> list[str]:
    """Delete bucket files left in ``directory`` (default :data:`SEGMENT_DIR`) by processes that no longer
    exist (a trainer killed during a weight update): tmpfs holds their memory until someone deletes them.
    The file name carries the writer's pid. Returns the deleted paths."""
    directory = SEGMENT_DIR if directory is None else directory
    removed: list[str] = []
    if not directory or not os.path.isdir(directory):
        return removed
    for entry in os.listdir(directory):
        pid = entry[len(_SEGMENT_PREFIX) :].split("_", 1)[0]
        if not entry.startswith(_SEGMENT_PREFIX) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or another user's process: not ours to judge)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(directory, entry))
            removed.append(os.path.join(directory, entry))
        except FileNotFoundError:
            pass
    return removed


def _segment_room(directory: str | None, nbytes: int) -> bool:
    if not directory or not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        return False
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize >= nbytes + (64 << 20)  # tmpfs past its size is SIGBUS, not an error


def pack_bucket(
    bucket: Sequence[tuple[str, torch.Tensor]], cuda_ipc: bool, segment_dir: str | None = None
) -> tuple[list[list], str | None]:
    """(name, tensor) pairs as msgpack-safe lists, for a vLLM worker in another process.

    - CUDA tensors when ``cuda_ipc``: ``[name, "ipc", pickled CUDA IPC handle]`` (the receiver maps the
      sender's memory: no copy).
    - Other tensors, when ``segment_dir`` has room: all written into one new file there (a tmpfs such as
      /dev/shm), ``[name, "shm", path, offset, dtype, shape]``; every worker maps that file. One copy in all,
      against three or more for bytes in the message (msgpack and ZeroMQ copy them; vLLM's own zero-copy
      tensor transport does not survive its untyped decoding of RPC arguments).
    - Otherwise: ``[name, "host", dtype, shape, bytes]``.

    Returns (payload, path of the file or None). The caller deletes the file once the RPC has returned;
    workers that still hold tensors from it keep their mapping (vLLM's layerwise reload buffers a layer's
    tensors until the layer is complete, possibly across buckets).
    """
    out: list[list] = []
    offsets, total = [], 0
    for _, t in bucket:
        offsets.append(total)
        if not (cuda_ipc and t.is_cuda):
            total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    path = None
    segment: torch.Tensor | None = None
    if total and segment_dir:
        if _segment_room(segment_dir, total):
            fd, path = tempfile.mkstemp(prefix=f"{_SEGMENT_PREFIX}{os.getpid()}_", dir=segment_dir)
            try:
                os.ftruncate(fd, total)
            finally:
                os.close(fd)
            segment = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        elif not _warned_no_room:
            _warned_no_room.append(True)
            log.warning(
                "%s is missing or has less than %.2f GB free: weight buckets go to the vLLM workers as "
                "bytes inside the RPC message, several times slower (a container's /dev/shm is often "
                "64 MB: raise it, e.g. docker --shm-size)",
                segment_dir,
                (total + (64 << 20)) / 1e9,
            )
    for (name, tensor), off in zip(bucket, offsets):
        if cuda_ipc and tensor.is_cuda:
            from torch.multiprocessing.reductions import reduce_tensor

            out.append([name, "ipc", pickle.dumps(reduce_tensor(tensor.contiguous()))])
        elif segment is not None:  # set together with path
            n = tensor.numel() * tensor.element_size()
            segment[off : off + n].view(tensor.dtype).view(tensor.shape).copy_(tensor.detach())
            out.append([name, "shm", path, off, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)])
        else:
            t = tensor.detach().to("cpu").contiguous()
            out.append(
                [
                    name,
                    "host",
                    str(t.dtype).removeprefix("torch."),
                    list(t.shape),
                    t.reshape(-1).view(torch.uint8).numpy().tobytes(),
                ]
            )
    return out, path


def unpack_bucket(payload: Sequence[Sequence]) -> list[tuple[str, torch.Tensor]]:
    """Inverse of :func:`pack_bucket`, in the worker: tensors from "shm" items are views of the mapped file."""
    out = []
    segments: dict[str, torch.Tensor] = {}
    for item in payload:
        name, kind = item[0], item[1]
        if kind == "ipc":
            rebuild, args = pickle.loads(item[2])  # written by pack_bucket in the trainer's process
            args = list(args)
            args[6] = torch.cuda.current_device()  # the sender's device index, in this process's numbering
            out.append((name, rebuild(*args)))
        elif kind == "shm":
            path, off, dtype, shape = item[2], item[3], getattr(torch, item[4]), item[5]
            if path not in segments:
                if not os.path.exists(path):
                    raise FileNotFoundError(
                        f"weight segment {path} for {name!r} is gone: the vLLM worker must "
                        "run on the trainer's machine and see its /dev/shm"
                    )
                segments[path] = torch.from_file(path, shared=True, size=os.path.getsize(path), dtype=torch.uint8)
            n = dtype.itemsize * int(torch.Size(shape).numel())
            out.append((name, segments[path][off : off + n].view(dtype).view(shape)))
        elif kind == "host":
            dtype, shape, data = getattr(torch, item[2]), item[3], item[4]
            raw = bytearray(data)
            # On the host (frombuffer always is); vLLM's load_weights copies each tensor to its device.
            flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8, device="cpu")
            out.append((name, flat.view(dtype).reshape(shape)))
        else:
            raise ValueError(f"unknown weight payload kind {kind!r} for {name!r}")
    return out
