"""Which device this process computes on, decided in one place.

Everything in the package that would otherwise ask ``torch.cuda.is_available()`` asks :func:`use_cuda`
instead, so a process is either wholly on CUDA (NCCL, the GPU model, batches moved to it) or wholly on the
CPU (gloo, the CPU runtime that redirects Megatron-Core's CUDA calls). A mix is what breaks: a CUDA model fed
CPU batches, or CPU tensors handed to NCCL.

``GIFT_MEGATRON_DEVICE`` chooses: ``auto`` (default: CUDA when a GPU is visible), ``cpu`` (CPU even on a GPU
host: the CPU test suite, the conversion tools) or ``cuda`` (an error when no GPU is visible). Spawned ranks
inherit it through the environment.

Transformer Engine is optional: :func:`has_transformer_engine` is true only on CUDA with TE importable. TE
is imported lazily and never on the CPU path, because installing it on a CPU machine makes
``import megatron.core`` fail.
"""

from __future__ import annotations

import functools
import os

import torch

ENV = "GIFT_MEGATRON_DEVICE"
CHOICES = ("auto", "cpu", "cuda")


def requested() -> str:
    """The value of ``GIFT_MEGATRON_DEVICE`` (``auto`` when unset); ValueError naming the variable if bad."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def use_cuda() -> bool:
    """True when this process trains on CUDA (NCCL, GPU model), False for the CPU runtime (gloo)."""
    want = requested()
    if want == "cpu":
        return False
    available = torch.cuda.is_available()
    if want == "cuda" and not available:
        raise RuntimeError(f"{ENV}=cuda but no CUDA GPU is visible to this process")
    return available


def compute_device() -> torch.device:
    """The device of this process's model: the current CUDA device, or the CPU."""
    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend() -> str:
    """torch.distributed backend for the default process group: nccl on CUDA, gloo on the CPU."""
    return "nccl" if use_cuda() else "gloo"


@functools.cache
def _te_importable() -> bool:
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises RuntimeError (not ImportError) when its CUDA libraries are missing
        return False
    return True


def has_transformer_engine() -> bool:
    """True when this process runs on CUDA and Transformer Engine imports (never imported on the CPU)."""
    return use_cuda() and _te_importable()


def describe() -> str:
    """One line for logs: the device and whether Transformer Engine is used."""
    if not use_cuda():
        return "cpu (gloo)"
    name = torch.cuda.get_device_name(torch.cuda.current_device())
    te = "Transformer Engine" if has_transformer_engine() else "no Transformer Engine (local spec)"
    return f"cuda:{torch.cuda.current_device()} {name} (nccl, {te})"


def to_host_floats(values: dict) -> dict[str, float]:
    """{name: scalar tensor or number} -> {name: float} with ONE device-to-host copy for all of them,
    instead of one synchronizing ``float(t)`` per metric. Tensors may live on any single device."""
    if not values:
        return {}
    keys = list(values)
    tensors = [v for v in values.values() if isinstance(v, torch.Tensor)]
    dev = tensors[0].device if tensors else torch.device("cpu")
    stacked = torch.stack(
        [
            (
                v.detach().reshape(()).to(device=dev, dtype=torch.float64)
                if isinstance(v, torch.Tensor)
                else torch.tensor(float(v), dtype=torch.float64, device=dev)
            )
            for v in values.values()
        ]
    )
    return dict(zip(keys, stacked.tolist()))


def move_to(batch: dict, device: torch.device) -> dict:
    """A copy of the dict ``batch`` with every tensor on ``device`` (a tensor already there is not copied);
    other values unchanged. Host tensors in pinned memory are copied asynchronously."""
    return {
        k: (v.to(device, non_blocking=v.is_pinned()) if isinstance(v, torch.Tensor) and v.device != device else v)
        for k, v in batch.items()
    }
