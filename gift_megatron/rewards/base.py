"""The reward interface: a callable over a batch of (prompt, response, answer, row) samples."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence


@dataclass(frozen=True)
class RewardInput:
    """prompt: the prompt text; response: the decoded response (special tokens removed); answer: the row's
    reference answer (None when the dataset has none); example: the dataset row (PromptExample)."""

    prompt: str
    response: str
    answer: str | None
    example: Any = None


class RewardFunction(Protocol):
    def __call__(self, samples: Sequence[RewardInput]) -> list[float]:
        """One float per sample, in order."""


class RewardError(ValueError):
    """A reward function returned something unusable; the message shows the offending sample."""


def _show(sample: RewardInput, limit: int = 300) -> str:
    resp = sample.response if len(sample.response) <= limit else sample.response[:limit] + "..."
    where = ""
    if sample.example is not None and getattr(sample.example, "source", ""):
        where = f" ({sample.example.source}:{sample.example.line})"
    return f"prompt={sample.prompt[:limit]!r}{where} response={resp!r} answer={sample.answer!r}"


def check_rewards(values: Any, samples: Sequence[RewardInput]) -> list[float]:
    """``values`` as floats, one per sample; a wrong count, a non-number or a NaN/inf is a RewardError
    that shows the sample."""
    values = list(values)
    if len(values) != len(samples):
        raise RewardError(f"the reward function returned {len(values)} values for {len(samples)} samples")
    out = []
    for i, (v, s) in enumerate(zip(values, samples)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"reward {i} is {v!r}, not a number: {_show(s)}") from None
        if not math.isfinite(f):
            raise RewardError(f"reward {i} is {f} (non-finite): {_show(s)}")
        out.append(f)
    return out
