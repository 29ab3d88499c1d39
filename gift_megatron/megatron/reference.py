"""The frozen reference policy for GIFT's ``reference: frozen`` (and GRPO's KL term).

A second set of model chunks built like the policy, loaded with the policy's weights at the start of
training, never trained. Forward-only, so it carries no gradients, optimizer state or DDP buffers. On a GPU
its weights can live in host memory between uses (:meth:`FrozenReference.offload`), so it costs GPU
memory only during its forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class FrozenReference(list):
    """A list of frozen model chunks (usable wherever Megatron expects ``model: list[Module]``).

    Args:
        policy: the policy's model chunks (DDP-wrapped or not), whose current weights are copied.
        build_chunk: builds one unwrapped chunk with the policy's architecture and layout, given its index
            (the same builder the policy was made with: the shapes must match exactly).
    """

    def __init__(self, policy: Sequence[torch.nn.Module], build_chunk: Callable[[int], torch.nn.Module]) -> None:
        from megatron.core.utils import unwrap_model

        chunks = []
        for i, src in enumerate(policy):
            chunk = build_chunk(i)
            missing = chunk.load_state_dict(unwrap_model(src).state_dict(), strict=True)
            del missing
            chunk.requires_grad_(False)
            chunk.eval()
            chunks.append(chunk)
        super().__init__(chunks)
        self._device = next(chunks[0].parameters()).device

    def offload(self) -> None:
        """Move the weights to host memory (a no-op on CPU). Call after the reference pass."""
        if self._device.type != "cpu":
            for chunk in self:
                chunk.to("cpu", non_blocking=True)

    def onload(self) -> None:
        """Bring the weights back to their device before a reference pass (a no-op on CPU)."""
        if self._device.type != "cpu":
            for chunk in self:
                chunk.to(self._device, non_blocking=True)
