"""Training state out of GPU memory while the colocated rollout engine is awake.

While vLLM generates and takes new weights, the trainer needs only its bf16 weights on the GPU (they are the
source of the weight sync). Its fp32 gradient buffers and the optimizer's fp32 main weights and Adam moments
(for 7B at TP 2 x DP 4 with the distributed optimizer: 14.2 + 10.6 GiB of an H100's 79.6) are idle until the
next training pass, so :class:`TrainingStateOffloader` moves them to host memory before the engine wakes and
back after it sleeps, as verl and NeMo-RL do for their colocated engines.

How. Everything works on tensor *storages*: a storage's bytes are copied to a host buffer, then the storage
is resized to zero bytes, which returns the memory to PyTorch's caching allocator (and, after
``torch.cuda.empty_cache()``, to the driver, where another process, the vLLM engine, can have it). Onload
resizes the storage back and copies the bytes in. The tensor objects, and every view of the storage
(Megatron's ``param.main_grad`` and bucket views into the grad buffer, the optimizer's references to its main
weights), are never replaced, so nothing in Megatron has to be told. Megatron-Core 0.19's own
``DistributedDataParallel.offload_grad_buffers`` uses the same storage resize for the grad buffers; its
``MegatronOptimizer.offload_to_cpu`` instead rebinds ``param.data``, which breaks the aliasing of main weights
that are views of model weights (fp32 training) and is a no-op for non-CUDA tensors, hence not used here.

What moves:

* Megatron DDP gradient buffers (``grad_data`` of every param-and-grad buffer): released, not copied, and
  zero-filled on onload. They hold nothing between steps: ``ObjectiveStep`` zeroes them before every
  forward/backward (``copy_grads=True`` keeps their content instead).
* Every tensor the optimizer holds: its parameters (Megatron's fp32 main weights, in the inner
  ``torch.optim`` param groups) and the optimizer state (Adam ``exp_avg``, ``exp_avg_sq``...), copied, for
  plain and distributed optimizers and ``ChainedOptimizer``; the parameters' ``.grad`` (views of the grad
  buffer, or copies Megatron refills before every step) released like the grad buffers. Storages shared with the model's own weights
  (fp32 training, where the main weights *are* the model weights) stay: the weight sync reads them.
* Only storages on ``device`` (default: CUDA when present) move; host tensors such as Adam's step counter stay.

``device`` can be ``"cpu"``: then CPU storages are "offloaded" to separate CPU buffers and the CPU memory of
the originals is really released. That is how the tests run this exact code path on a CPU-only machine.

The choreography with the engine (:meth:`before_engine_wakes`, :meth:`after_engine_sleeps`,
:meth:`onloaded`) adds the barrier over the data-parallel replica that the engine's GPUs require: with
rollout TP > 1 the engine also uses the GPUs of the replica's other ranks, so those must have freed their
memory before the owner wakes the engine, and must not refill it before the owner has put it to sleep.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

log = logging.getLogger("gift_megatron.offload")


def _default_device() -> str:
    from gift_megatron.device import use_cuda

    return "cuda" if use_cuda() else "cpu"


def _byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over all of ``storage`` (a view: writes go to the storage)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


def optimizer_tensors(optimizer: Any, with_grads: bool = True) -> Iterator[torch.Tensor]:
    """Every tensor a Megatron optimizer (plain, distributed, ``ChainedOptimizer``) or a ``torch.optim``
    optimizer holds: parameters of its inner param groups (Megatron's fp32 main weights), their grads
    (``with_grads``), state."""
    for p, is_grad in _optimizer_tensors(optimizer):
        if with_grads or not is_grad:
            yield p


def _optimizer_tensors(optimizer: Any) -> Iterator[tuple[torch.Tensor, bool]]:
    """(tensor, is a gradient) pairs of :func:`optimizer_tensors`."""
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", opt)  # MegatronOptimizer wraps a torch.optim optimizer
        if inner is None or not hasattr(inner, "param_groups"):
            continue  # a stub optimizer of a rank without parameters
        for group in inner.param_groups:
            for p in group["params"]:
                yield p, False
                if p.grad is not None:
                    yield p.grad, True
        for state in inner.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    yield value, False


def _ddp_buffers(chunk: torch.nn.Module) -> list:
    """Megatron DDP's param-and-grad buffers of a chunk ([] for a module that is not DDP-wrapped: there
    ``buffers`` is nn.Module's method)."""
    out = []
    for name in ("buffers", "expert_parallel_buffers"):
        value = getattr(chunk, name, None)
        if isinstance(value, (list, tuple)):
            out += list(value)
    return out


def grad_buffers(model_chunks: Iterable[torch.nn.Module]) -> Iterator[torch.Tensor]:
    """The ``grad_data`` tensors of Megatron DDP's param-and-grad buffers (dense and expert-parallel)."""
    for chunk in model_chunks:
        for buffer in _ddp_buffers(chunk):
            if getattr(buffer, "grad_data", None) is not None:
                yield buffer.grad_data


def weight_tensors(model_chunks: Iterable[torch.nn.Module]) -> Iterator[torch.Tensor]:
    """The model's weights and Megatron DDP's param buffers: these never move (the weight sync reads them)."""
    for chunk in model_chunks:
        yield from chunk.parameters()
        for buffer in _ddp_buffers(chunk):
            if getattr(buffer, "param_data", None) is not None:
                yield buffer.param_data


class TrainingStateOffloader:
    """Moves gradient buffers and optimizer state between ``device`` memory and host memory.

    Args:
        model_chunks: the Megatron DDP-wrapped model chunks (``Trainer.model``).
        optimizer: the Megatron optimizer.
        enabled: False makes :meth:`offload` / :meth:`onload` no-ops (the engine choreography still empties
            the CUDA cache and synchronizes the replica).
        device: the memory to free: ``"cuda"`` (default when CUDA is present) or ``"cpu"`` (tests).
        group: the process group of the data-parallel replica (None: a replica of one rank).
        copy_grads: keep the gradient buffers' content instead of zero-filling them on onload.
        pin_memory: page-locked host buffers for CUDA storages (fast, asynchronous copies); default: on CUDA.

    Host buffers are allocated on the first offload and reused by later ones.
    """

    def __init__(
        self,
        model_chunks: Iterable[torch.nn.Module],
        optimizer: Any,
        *,
        enabled: bool = True,
        device: str | torch.device | None = None,
        group: Any = None,
        copy_grads: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        self.model_chunks = list(model_chunks)
        self.optimizer = optimizer
        self.enabled = enabled
        self.device = torch.device(device if device is not None else _default_device())
        self.group = group
        self.copy_grads = copy_grads
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else pin_memory
        # (storage, bytes, host copy or None for a released-and-zeroed buffer) of what is offloaded now.
        self._moved: list[tuple[torch.UntypedStorage, int, torch.Tensor | None]] = []
        self._host: dict[int, torch.Tensor] = {}  # storage identity -> reusable host buffer
        # Set by every enabled offload, even one with nothing to move: all ranks of a replica take the same
        # branches below (and meet at the same barriers).
        self._offloaded = False
        self.offloaded_bytes = 0

    @property
    def offloaded(self) -> bool:
        return self._offloaded

    def _on_device(self, t: torch.Tensor) -> bool:
        d = t.device
        return d.type == self.device.type and (self.device.index is None or d.index == self.device.index)

    def _targets(self) -> list[tuple[torch.UntypedStorage, bool]]:
        """(storage, keep its content) of everything to move, each storage once; weights excluded."""
        keep_out = {t.untyped_storage()._cdata for t in weight_tensors(self.model_chunks)}
        seen: dict[int, tuple[torch.UntypedStorage, bool]] = {}
        # Gradients are dead between steps: Megatron refills the main weights' .grad (views of the grad buffer,
        # or copies of it) from the grad buffer before every optimizer step, and the buffer is zeroed first.
        tensors = [(t, self.copy_grads) for t in grad_buffers(self.model_chunks)]
        tensors += [(t, self.copy_grads or not is_grad) for t, is_grad in _optimizer_tensors(self.optimizer)]
        for t, keep in tensors:
            if not self._on_device(t):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in keep_out or storage.nbytes() == 0:
                continue
            # A storage reached twice keeps its content if either holder needs it.
            previous = seen.get(key)
            seen[key] = (storage, keep or (previous[1] if previous else False))
        return list(seen.values())

    def offload(self) -> int:
        """Copy the states to host memory and release their ``device`` memory; returns the bytes released.
        Idempotent: a second call while offloaded does nothing."""
        if not self.enabled or self._offloaded:
            return 0
        targets = self._targets()
        moved, live = [], set()
        for storage, keep in targets:
            n = storage.nbytes()
            host = None
            if keep:
                key = storage._cdata
                live.add(key)
                host = self._host.get(key)
                if host is None or host.numel() != n:
                    host = torch.empty(n, dtype=torch.uint8, device="cpu", pin_memory=self.pin_memory)
                    self._host[key] = host
                host.copy_(_byte_view(storage), non_blocking=self.pin_memory)
            moved.append((storage, n, host))
        for key in [k for k in self._host if k not in live]:  # storages that no longer exist or stay put
            del self._host[key]
        if moved and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies are complete before the memory is released
        for storage, _, _ in moved:
            storage.resize_(0)
        self._moved, self._offloaded = moved, True
        self.offloaded_bytes = sum(n for _, n, _ in moved)
        log.debug(
            "offloaded %d storages, %.2f GiB released (%.2f GiB copied to the host)",
            len(moved),
            self.offloaded_bytes / 2**30,
            sum(n for _, n, h in moved if h is not None) / 2**30,
        )
        return self.offloaded_bytes

    def onload(self) -> int:
        """Reallocate the states on ``device`` and copy them back (grad buffers come back zeroed unless
        ``copy_grads``); returns the bytes restored. A no-op when nothing is offloaded."""
        moved, self._moved, self._offloaded = self._moved, [], False
        for storage, n, host in moved:
            storage.resize_(n)
            view = _byte_view(storage)
            if host is None:
                view.zero_()
            else:
                view.copy_(host, non_blocking=self.pin_memory)
        if moved and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the host buffers may be written by the next offload
        restored = sum(n for _, n, _ in moved)
        self.offloaded_bytes = 0
        return restored

    # -- with a colocated rollout engine ---------------------------------------------------------------------

    def _barrier(self) -> None:
        if self.group is not None:
            from gift_megatron.comm import barrier

            barrier(self.group)

    def before_engine_wakes(self) -> None:
        """Every rank of the replica: offload (when enabled), return the freed memory to the driver, and wait
        until the whole replica has done so (the engine may use all of the replica's GPUs)."""
        self.offload()
        if _default_device() == "cuda":
            torch.cuda.empty_cache()  # the engine is another process: cached blocks are invisible to it
        self._barrier()

    def after_engine_sleeps(self) -> None:
        """Every rank of the replica, after the owner put its engine to sleep: wait for that, then onload."""
        if self._offloaded:
            self._barrier()
            self.onload()

    @contextlib.contextmanager
    def onloaded(self, engine: Any = None):
        """The states on ``device`` for the duration (a checkpoint save reads them there), offloaded again
        after. If they were offloaded, ``engine`` (the owner's; None elsewhere) sleeps at level 1 meanwhile so
        that engine and states are never on the GPU together, and keeps its weights for the wake after."""
        if not self._offloaded:
            yield
            return
        # Only an awake engine with sleep mode gives memory back (the CPU engine has none to give).
        sleeps = engine is not None and getattr(engine, "sleep_mode", False) and not getattr(engine, "asleep", True)
        if sleeps:
            engine.sleep(level=1)
        self._barrier()
        self.onload()
        try:
            yield
        finally:
            self.before_engine_wakes()
            if sleeps:
                engine.wake()
