"""Run Megatron-Core on CPU: TP, PP, DP, the distributed optimizer and dist-checkpointing over gloo.

Megatron-Core's math runs on any device, but a few of its modules hard-code CUDA. On a machine without a
GPU, :func:`enable_cpu_runtime` redirects exactly the calls that training and checkpointing reach
(megatron-core 0.16 and 0.19):

- ``torch.cuda.current_device()`` as the device of new buffers (DDP grad/param buffers, pipeline p2p
  receive buffers, the global memory buffer of core attention, RoPE frequencies, checkpoint save);
- ``torch.cuda.synchronize()`` (checkpoint save) and ``torch.cuda.current_stream()`` (grad sync, 0.19);
- tensors created with a literal ``device="cuda"`` (the schedules' token counter, the optimizers'
  loss-scale and grad-norm buffers, the default causal attention mask);
- the model-parallel RNG tracker (``tensor_parallel.random``: ``model_parallel_cuda_manual_seed``,
  ``get_cuda_rng_tracker().add()/fork()``), which saves and restores CUDA generator states: on CPU it
  tracks the CPU default generator, so TP ranks draw the same or different streams exactly as on GPU;
- ``Tensor.type() == 'torch.cuda.FloatTensor'``-style checks in the optimizers (distributed-optimizer and
  mixed-precision param sorting, gradient clipping), which a CPU tensor (``'torch.FloatTensor'``) fails;
- ``Tensor.cuda()`` on the shared embedding weight (tied embeddings with pipeline parallelism);
- Mixture-of-Experts: the router's ``current_device()`` (its weight is moved there on every forward), the
  alltoall token dispatcher's side stream and events (``torch.cuda.Stream()`` at construction, a
  device-to-host copy of the split sizes on it), ``torch.empty(device=current_device())`` in the
  sequence-parallel / expert-parallel gathers (``tensor_parallel.mappings``, the all-to-all) and in the
  sequence-parallel backward of ``tensor_parallel.layers``; and the dispatcher's split sizes, which it
  turns into numpy arrays only when they are CUDA tensors: on the CPU they stayed tensors, which
  ``all_to_all_single`` rejects as split sizes.

How: each module listed in ``_CPU_TORCH_MODULES`` gets its own view of ``torch`` (its module global
``torch`` is replaced) in which CUDA is the CPU; the real ``torch`` and every other module are untouched.
The RNG state helpers are replaced by CPU ones. Only the two ``Tensor`` methods need a global patch (a
method lives on the tensor class), confined to the duration of the few Megatron calls that use them.

When the process trains on CUDA (``gift_megatron.device.use_cuda()``) nothing is patched and Megatron-Core
runs unchanged. With ``GIFT_MEGATRON_DEVICE=cpu`` on a GPU host the patched modules also see
``torch.cuda.is_available()`` as False, so they take the same paths as on a CPU machine.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = [
    "cpu_runtime_enabled",
    "destroy_model_parallel_cpu",
    "enable_cpu_runtime",
    "initialize_model_parallel_cpu",
]

_enabled = False

# Megatron modules whose global ``torch`` becomes the CPU view: what each calls, and which versions.
_CPU_TORCH_MODULES: dict[str, str] = {
    "megatron.core.pipeline_parallel.schedules": 'total_num_tokens = zeros(device="cuda") (0.16, 0.19)',
    "megatron.core.pipeline_parallel.p2p_communication": "recv buffers on current_device() (0.16, 0.19)",
    "megatron.core.distributed.param_and_grad_buffer": (
        "grad/param buffers on current_device() (0.16, 0.19); current_stream() in grad sync (0.19)"
    ),
    "megatron.core.optimizer.optimizer": 'FP32Optimizer / found_inf scale tensors device="cuda" (0.16, 0.19)',
    "megatron.core.optimizer.clip_grads": 'grad-norm buffers device="cuda" (0.16, 0.19)',
    "megatron.core.utils": "GlobalMemoryBuffer (core attention's matmul buffer) on current_device() (0.16, 0.19)",
    "megatron.core.transformer.utils": 'get_default_causal_mask: ones(device="cuda") (0.16, 0.19)',
    "megatron.core.models.common.embeddings.rotary_pos_embedding": (
        "RoPE inv_freq moved to current_device() (0.16, 0.19)"
    ),
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "synchronize() before writing (0.16, 0.19)",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": (
        "failure flag on current_device() when finalizing a save (0.16, 0.19)"
    ),
    "megatron.core.transformer.moe.router": (
        "router weight moved to current_device() every forward; expert-bias buffers there (0.16, 0.19)"
    ),
    "megatron.core.transformer.moe.token_dispatcher": (
        "alltoall dispatcher: cuda.Stream() at construction, current_stream()/stream() around the "
        "device-to-host copy of split sizes, d2h event synchronize() (0.16, 0.19)"
    ),
    "megatron.core.tensor_parallel.mappings": (
        "sequence-parallel / expert all-gather, reduce-scatter and all-to-all outputs on current_device() (0.16, 0.19)"
    ),
    "megatron.core.tensor_parallel.layers": (
        "sequence-parallel backward all-gather buffer on current_device() (0.16, 0.19)"
    ),
}


# --------------------------------------------------------------------------------------------------
# A view of torch in which CUDA is the CPU
# --------------------------------------------------------------------------------------------------


def _is_cuda_device(device: Any) -> bool:
    """True for every way Megatron names a CUDA device: "cuda", "cuda:N", torch.device("cuda"), an int."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    # A bare int in device= is a CUDA ordinal (torch.cuda.current_device() returns one).
    return isinstance(device, int) and not isinstance(device, bool)


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a tensor factory so that a CUDA ``device=`` argument creates the tensor on the CPU."""

    @functools.wraps(factory)
    def create(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return create


class _NullEvent:
    """Stands for a CUDA event on the CPU: every op before it has already finished."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullStream:
    """Stands for a CUDA stream on the CPU, where every op is synchronous: waits and records are no-ops.

    One object stands for every stream, so a "side stream" compares equal to the current one and Megatron
    skips its cross-stream bookkeeping (record_stream) exactly as it does when it runs on one stream."""

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        # Megatron synchronizes on the returned event later (the MoE dispatcher's d2h_event).
        return event if event is not None else _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_NULL_STREAM = _NullStream()


def _null_stream(*args: Any, **kwargs: Any) -> _NullStream:
    """``torch.cuda.Stream(...)`` on the CPU runtime."""
    return _NULL_STREAM


class _CpuCuda:
    """``torch.cuda`` as seen by a patched Megatron module: device, sync, stream and RNG calls act on the CPU.

    Anything not defined here (nvtx, amp, ...) is the real ``torch.cuda`` attribute, so a CUDA call that is
    not redirected still fails loudly instead of silently doing something else.
    """

    @staticmethod
    def is_available() -> bool:
        # The CPU runtime is on: a GPU host running a CPU process (GIFT_MEGATRON_DEVICE=cpu) must not send
        # these modules down their CUDA branches.
        return False

    @staticmethod
    def current_device() -> torch.device:
        # A torch.device, not an int: Megatron passes it to device=, .to() and .cuda(), where an int means
        # a CUDA ordinal.
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass  # CPU kernels are synchronous

    @staticmethod
    def current_stream(device: Any = None) -> _NullStream:
        return _NULL_STREAM

    # The MoE dispatcher creates a side stream and events and copies split sizes to the host "on" the stream.
    Stream = staticmethod(_null_stream)
    Event = _NullEvent

    @staticmethod
    def stream(stream: Any = None) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        # The RNG tracker's "CUDA" generator on CPU is the CPU default generator.
        return torch.get_rng_state()

    @staticmethod
    def manual_seed(seed: int) -> None:
        # Megatron seeds the CUDA generator with the same seed its training loop gives torch.manual_seed.
        torch.manual_seed(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchOnCpu:
    """``torch`` as seen by a patched Megatron module: ``torch.cuda`` is :class:`_CpuCuda` and tensor
    factories given a CUDA device create on the CPU. Everything else is the real ``torch`` attribute."""

    _FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange")

    def __init__(self) -> None:
        self.cuda = _CpuCuda()
        for name in self._FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_TORCH_ON_CPU = _TorchOnCpu()


# --------------------------------------------------------------------------------------------------
# Tensor methods: .type() checks and .cuda() moves
# --------------------------------------------------------------------------------------------------


class _ScopedTensorMethod:
    """Replaces one ``torch.Tensor`` method, but only while a wrapped Megatron call runs.

    Why global: a method called on a tensor cannot be redirected per module. The replacement is installed
    on entering the first wrapped call and the real method restored on leaving it (re-entrant, locked), so
    code outside those calls never sees it; another thread running during such a call would.
    """

    def __init__(self, name: str, replacement: Callable[..., Any]) -> None:
        self.name = name
        self.replacement = replacement
        self.real = getattr(torch.Tensor, name)
        self._lock = threading.RLock()
        self._depth = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                setattr(torch.Tensor, self.name, self.replacement)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    setattr(torch.Tensor, self.name, self.real)

    def around(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` run with the replacement active; marked so that the same patch never wraps it twice."""
        if self in getattr(fn, "__gift_cpu_runtime__", ()):
            return fn

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self.active():
                return fn(*args, **kwargs)

        call.__gift_cpu_runtime__ = (*getattr(fn, "__gift_cpu_runtime__", ()), self)  # type: ignore[attr-defined]
        return call


_real_tensor_type = torch.Tensor.type


def _type_named_as_cuda(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    """``Tensor.type()`` naming a CPU tensor like its CUDA twin ('torch.FloatTensor' -> 'torch.cuda.FloatTensor');
    a conversion (``dtype`` given) is the real method."""
    if dtype is not None or kwargs:
        return _real_tensor_type(self, dtype, non_blocking, **kwargs)
    name = _real_tensor_type(self)
    if self.device.type == "cpu" and not name.startswith("torch.cuda."):
        return "torch.cuda." + name[len("torch.") :]
    return name


def _cuda_stays_on_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``Tensor.cuda()`` on the CPU runtime: the tensor is already where CUDA tensors live, on the CPU."""
    return self


_CPU_TENSORS_NAMED_AS_CUDA = _ScopedTensorMethod("type", _type_named_as_cuda)
_CUDA_MOVES_STAY_ON_CPU = _ScopedTensorMethod("cuda", _cuda_stays_on_cpu)


# --------------------------------------------------------------------------------------------------
# Model-parallel RNG tracker
# --------------------------------------------------------------------------------------------------


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Replacement for ``tensor_parallel.random._get_cuda_rng_state``: the CPU default generator's state
    (a fresh tensor, so ``clone`` is implied; ``graph_safe`` concerns CUDA graphs only)."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """Replacement for ``tensor_parallel.random._set_cuda_rng_state``: set the CPU default generator."""
    torch.set_rng_state(new_state)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def cpu_runtime_enabled() -> bool:
    """Whether :func:`enable_cpu_runtime` has patched Megatron-Core in this process."""
    return _enabled


def enable_cpu_runtime() -> None:
    """Redirect Megatron-Core's hard-coded CUDA calls to the CPU (see the module docstring for the list).

    Idempotent. A no-op when CUDA is available. Imports the patched Megatron-Core modules; call it before
    building models, optimizers or DDP wrappers (they create their buffers on ``current_device()``).
    """
    global _enabled
    from gift_megatron.device import use_cuda

    if _enabled or use_cuda():
        return
    _patch_module_torch()
    _patch_rng_tracker()
    _patch_tensor_methods()
    _patch_moe_split_sizes()
    _enabled = True


def _patch_module_torch() -> None:
    for module_name in _CPU_TORCH_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # not every listed module exists in every supported megatron-core version
        module.torch = _TORCH_ON_CPU  # type: ignore[attr-defined]


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    # add() and model_parallel_cuda_manual_seed() call torch.cuda.get_rng_state / manual_seed; unpatched,
    # manual_seed is silently queued until CUDA initializes, i.e. dropped on CPU (0.16, 0.19).
    mp_random.torch = _TORCH_ON_CPU  # pyrefly: ignore[bad-assignment]  (a stand-in with torch's interface)
    # fork() and activation checkpointing save/restore states through these two helpers (0.16, 0.19).
    mp_random._get_cuda_rng_state = _get_cpu_rng_state
    mp_random._set_cuda_rng_state = _set_cpu_rng_state
    # fork() warns when the CPU generator moved inside it; on CPU the forked generator IS the CPU one, so
    # every dropout draw would warn (0.16, 0.19).
    logging.getLogger(mp_random.__name__).addFilter(_drop_cpu_rng_changed_warning)


def _drop_cpu_rng_changed_warning(record: logging.LogRecord) -> bool:
    """Logging filter: False (drop) for fork()'s 'CPU RNG state changed within GPU RNG context'."""
    return not str(record.msg).startswith("CPU RNG state changed within GPU RNG context")


def _patch_tensor_methods() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    # `assert param.grad.type() == 'torch.cuda.FloatTensor'` when clipping (clip_grad > 0) (0.16, 0.19).
    # Modules that imported the function by name hold their own reference: rebind all of them.
    clip = clip_grads.clip_grad_by_total_norm_fp32
    _rebind_everywhere(clip, _CPU_TENSORS_NAMED_AS_CUDA.around(clip))
    # fp32 / fp16 / bf16 param sorting by type() name when building the shards, and main_param setup
    # (0.16, 0.19; __init__ is the only caller of _build_model_and_main_param_groups).
    _wrap_method(distrib_optimizer.DistributedOptimizer, "__init__", _CPU_TENSORS_NAMED_AS_CUDA)
    # The same sorting in the non-distributed mixed-precision optimizer (bf16/fp16 params) (0.16, 0.19).
    _wrap_method(optimizer.Float16OptimizerWithFloat16Params, "__init__", _CPU_TENSORS_NAMED_AS_CUDA)
    # Tied embeddings with PP > 1: `weight.data = weight.data.cuda()` before the first/last-stage
    # all-reduce of the shared weight (0.16, 0.19).
    _wrap_method(LanguageModule, "setup_embeddings_and_output_layer", _CUDA_MOVES_STAY_ON_CPU)


def _patch_moe_split_sizes() -> None:
    """The alltoall dispatcher's split sizes as host numpy arrays on the CPU too (0.16, 0.19).

    Megatron turns them into numpy arrays in ``maybe_move_tensor_to_cpu(..., as_numpy=True)``, but only for a
    CUDA tensor; a CPU tensor comes back as a tensor, and ``all_to_all_single`` refuses a tensor as split
    sizes. The replacement converts CPU tensors too (a copy, as the device-to-host copy is on a GPU)."""
    try:
        from megatron.core.transformer.moe import moe_utils, token_dispatcher
    except ImportError:
        return
    original = moe_utils.maybe_move_tensor_to_cpu
    if getattr(original, "__gift_cpu_runtime__", False):
        return

    @functools.wraps(original)
    def to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy().copy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    to_host.__gift_cpu_runtime__ = True  # type: ignore[attr-defined]
    moe_utils.maybe_move_tensor_to_cpu = to_host
    token_dispatcher.maybe_move_tensor_to_cpu = to_host


def _wrap_method(cls: type, name: str, patch: _ScopedTensorMethod) -> None:
    """Run ``cls.<name>`` with ``patch`` active (subclasses reach it through inheritance or super())."""
    setattr(cls, name, patch.around(getattr(cls, name)))


def _rebind_everywhere(original: Callable[..., Any], replacement: Callable[..., Any]) -> None:
    """Point every loaded ``megatron.core`` module attribute that is ``original`` at ``replacement``."""
    if replacement is original:
        return
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "megatron.core" or name.startswith("megatron.core.")):
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                setattr(module, attr, replacement)


def initialize_model_parallel_cpu(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    seed: int = 1234,
    **kwargs: Any,
) -> None:
    """Set up Megatron-Core's parallel state on the already initialized (gloo) default process group.

    Calls :func:`enable_cpu_runtime`, then ``parallel_state.initialize_model_parallel`` with these sizes
    and ``kwargs``, then Megatron's ``model_parallel_cuda_manual_seed(seed)``, which (redirected to the CPU)
    seeds the CPU default generator with ``seed`` and the tracker's tensor-parallel stream with
    ``seed + 2718 + tp_rank``, as on GPU (the data-parallel stream: ``seed``; expert: ``seed + 1024 +
    100 * ep_rank + etp_rank``). Megatron's own training loop first offsets the seed by ``100 * pp_rank``;
    pass such an offset in ``seed`` if you want it. With CUDA available the same calls run unpatched.
    Undo with :func:`destroy_model_parallel_cpu`.
    """
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            "initialize_model_parallel_cpu needs torch.distributed initialized first "
            '(e.g. torch.distributed.init_process_group("gloo"))'
        )
    enable_cpu_runtime()
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        **kwargs,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel_cpu() -> None:
    """Tear down what :func:`initialize_model_parallel_cpu` set up (the default process group stays)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
