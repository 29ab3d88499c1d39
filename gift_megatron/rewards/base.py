"""The reward interface: a callable over a batch of (prompt, response, answer, row) samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class RewardInput:
    """prompt: the prompt text; response: the decoded response (the text before EOS, special tokens
    removed); answer: the row's reference answer (None when the dataset has none); example: the dataset
    row (a PromptExample; None when a caller scores free text)."""

    prompt: str
    response: str
    answer: str | None
    example: Any = None

    @property
    def where(self) -> str:
        """``file:line`` of the row when known, else ''."""
        ex = self.example
        return f"{ex.source}:{ex.line}" if ex is not None and getattr(ex, "source", "") else ""


@runtime_checkable
class RewardFunction(Protocol):
    """Scores a batch: one float per sample, in order. Batches let model-based rewards run batched."""

    def __call__(self, samples: Sequence[RewardInput]) -> list[float]: ...


class RewardError(ValueError):
    """A reward function failed or returned something unusable; the message shows the offending sample."""


def show_sample(sample: RewardInput, limit: int = 300) -> str:
    """The sample as one line for error messages: prompt and response truncated to ``limit`` characters."""

    def cut(text: str) -> str:
        return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"

    where = f" ({sample.where})" if sample.where else ""
    return f"prompt={cut(sample.prompt)!r}{where} response={cut(sample.response)!r} answer={sample.answer!r}"


def require_answer(sample: RewardInput, reward: str) -> str:
    """The sample's answer; a RewardError naming the row when the dataset gave none."""
    if sample.answer is None:
        raise RewardError(f"reward {reward} needs an 'answer' in every row: {show_sample(sample)}")
    return sample.answer


def check_rewards(values: Any, samples: Sequence[RewardInput], *, reward: str | None = None) -> list[float]:
    """``values`` as floats, one per sample. A wrong count, a non-number or a NaN/inf is a RewardError that
    names the reward (when given) and shows the offending sample (prompt, response, answer, value)."""
    name = f"reward {reward}: " if reward else ""
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"{name}the reward function returned {type(values).__name__}, not a list of floats") from None
    if len(values) != len(samples):
        raise RewardError(f"{name}the reward function returned {len(values)} values for {len(samples)} samples")
    out = []
    for i, (v, s) in enumerate(zip(values, samples)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"{name}reward {i} is {v!r}, not a number: {show_sample(s)}") from None
        if not math.isfinite(f):
            raise RewardError(f"{name}reward {i} is {f} (non-finite): {show_sample(s)} value={f}")
        out.append(f)
    return out
