"""The rollout engine interface: generate responses with per-token sampling log-probs, take new weights.

Every engine (vLLM on GPUs, the transformers-based CPU engine) implements :class:`RolloutEngine`; the
trainer only talks to this interface, and weights arrive as an iterable of (Hugging Face name, full
tensor), which is what the streaming export of a sharded Megatron model produces.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """n responses per prompt; temperature 0 means greedy; top_p in (0, 1]; max_tokens new tokens at most.

    Reported log-probs are log softmax(logits / temperature) of the chosen token (log softmax(logits) when
    greedy), before top-p truncation: the same quantity the trainer computes with
    ``vocab_parallel_logprobs(..., temperature=...)``, so old and new policies are compared on equal terms.

    seed: makes one ``generate`` call reproducible; every response of the call is drawn independently
    (no two prompts share a random stream, so repeated prompts get different samples).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Rollout:
    """One response: prompt and response token ids, and the sampling log-prob of each response token.

    prompt_ids: [P] int64; response_ids: [R] int64 (ends with EOS when the model stopped by itself);
    logprobs: [R] fp32; finished: whether EOS was produced before max_tokens. Tensors are on the host.
    """

    prompt_index: int
    prompt_ids: torch.Tensor
    response_ids: torch.Tensor
    logprobs: torch.Tensor
    finished: bool


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Rollout]:
        """n rollouts per prompt, grouped by prompt (prompt_index), in prompt order."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights given as (Hugging Face parameter name, full tensor) pairs."""

    def sleep(self) -> None:
        """Release accelerator memory while the trainer runs (no-op where unsupported)."""

    def wake(self) -> None:
        """Reacquire what sleep released."""
