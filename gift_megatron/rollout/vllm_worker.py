"""The worker extension that vLLM mixes into its worker class: the receiving end of a weight update.

The engine starts vLLM with ``worker_extension_cls`` = :data:`EXTENSION`, the dotted path of
:class:`WeightSyncWorkerExtension`, which vLLM imports in each worker process; the engine then calls its
methods by name through ``LLM.collective_rpc`` (``gift_begin_update``, ``gift_load_weights``,
``gift_finish_update``), so only method names and plain data cross process boundaries.

Why a module of its own: it runs inside vLLM's worker processes, not in the trainer, and is imported there by
its dotted path; it needs only the weight transport and the version shims.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from gift_megatron.rollout.vllm_compat import layerwise_reload_helpers, unwrap_moe_post_load, wrap_moe_post_load
from gift_megatron.rollout.weight_transport import unpack_bucket

__all__ = ["EXTENSION", "WeightSyncWorkerExtension"]


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); called through ``LLM.collective_rpc``."""

    # Attributes of vLLM's worker class this is mixed into (annotations only: nothing is set here).
    model_runner: Any
    model_config: Any
    _gift_moe_wrapped: list[Any]

    def _gift_model(self) -> Any:
        return self.get_model() if hasattr(self, "get_model") else self.model_runner.model

    def _gift_context(self) -> contextlib.AbstractContextManager[Any]:
        try:
            from vllm.config import set_current_vllm_config
        except ImportError:
            return contextlib.nullcontext()
        config = getattr(self, "vllm_config", None)
        return set_current_vllm_config(config) if config is not None else contextlib.nullcontext()

    def gift_begin_update(self) -> bool:
        """Start an update: vLLM's layerwise reload where it exists (returns whether it does)."""
        helpers = layerwise_reload_helpers()
        if helpers:
            with self._gift_context():
                helpers[0](self._gift_model())
                self._gift_moe_wrapped = wrap_moe_post_load(self._gift_model())
        return helpers is not None

    @torch.no_grad()
    def gift_load_weights(self, weights: Sequence[Any]) -> int:
        """``weights``: (name, tensor) pairs (same process) or :func:`pack_bucket`'s lists (another process)."""
        weights = list(weights)
        ipc = False
        if weights and isinstance(weights[0][1], str):
            ipc = any(item[1] == "ipc" for item in weights)
            weights = unpack_bucket(weights)
        with self._gift_context():
            self._gift_model().load_weights(weights=iter(weights))
        if ipc:  # the sender may reuse its memory once this returns
            torch.cuda.synchronize()
        n = len(weights)
        del weights
        return n

    def gift_finish_update(self) -> None:
        """End an update: finish the layerwise reload (the backend's post-load processing)."""
        helpers = layerwise_reload_helpers()
        if helpers:
            try:
                with self._gift_context():
                    helpers[1](self._gift_model(), self.model_config)
            finally:
                unwrap_moe_post_load(getattr(self, "_gift_moe_wrapped", []))
                self._gift_moe_wrapped = []


#: The dotted path vLLM imports the extension by, in each worker process (``worker_extension_cls``).
EXTENSION = f"{WeightSyncWorkerExtension.__module__}.{WeightSyncWorkerExtension.__qualname__}"
