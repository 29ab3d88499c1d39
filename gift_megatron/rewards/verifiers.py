"""Rule-based rewards: math answers through ``math-verify``, exact match, and the toy task's reward."""

from __future__ import annotations

import re
import threading
from typing import Sequence

from gift_megatron.rewards.base import RewardInput

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


class MathVerify:
    """1.0 when the response's final answer (``\\boxed{...}`` or the last number / expression) equals the
    row's answer mathematically (math-verify's parse + verify: 0.5 == 1/2, \\frac{1}{2} == 0.5), else 0.0.

    math-verify's own timeouts use signal alarms, which only work in a process's main thread; the trainer
    calls rewards from the main thread, elsewhere the timeout is turned off (``parsing_timeout=None``).
    """

    def __init__(self, timeout_seconds: int = 5, correct: float = 1.0, wrong: float = 0.0) -> None:
        try:
            import math_verify  # noqa: F401
        except ImportError as exc:
            raise ImportError("reward math_verify needs the math-verify package (pip install math-verify)") from exc
        self.timeout, self.correct, self.wrong = timeout_seconds, correct, wrong

    def score(self, response: str, answer: str | None) -> float:
        from math_verify import parse, verify

        if answer is None:
            raise ValueError("reward math_verify needs an 'answer' in every row")
        main = threading.current_thread() is threading.main_thread()
        t = self.timeout if main else None
        gold = parse(answer if "$" in answer or "\\boxed" in answer else f"${answer}$", parsing_timeout=t)
        pred = parse(response, parsing_timeout=t)
        if not gold or not pred:
            return self.wrong
        return self.correct if verify(gold, pred, timeout_seconds=t) else self.wrong

    def __call__(self, samples: Sequence[RewardInput]) -> list[float]:
        return [self.score(s.response, s.answer) for s in samples]


class ExactMatch:
    """1.0 when the normalized response equals the normalized answer. Options: ``ignore_case``,
    ``first_number`` (compare the first number of the response, e.g. ``"42 because ..."``)."""

    def __init__(self, ignore_case: bool = True, first_number: bool = False) -> None:
        self.ignore_case, self.first_number = ignore_case, first_number

    def _norm(self, text: str) -> str:
        text = " ".join(text.split())
        return text.lower() if self.ignore_case else text

    def __call__(self, samples: Sequence[RewardInput]) -> list[float]:
        out = []
        for s in samples:
            if s.answer is None:
                raise ValueError("reward exact_match needs an 'answer' in every row")
            got = s.response
            if self.first_number:
                m = _NUMBER.search(got)
                got = m.group(0) if m else ""
            out.append(1.0 if self._norm(got) == self._norm(s.answer) else 0.0)
        return out


class ToyReward:
    """The toy task's reward (gift_megatron.data.toy): ``max(0, 1 - |n - answer| / scale)`` where n is the
    number the response starts with (0.0 without one). ``scale`` = 10 by default; exact answers get 1.0."""

    _LEADING = re.compile(r"\s*(-?\d+)")

    def __init__(self, scale: float = 10.0) -> None:
        if scale <= 0:
            raise ValueError(f"reward toy: scale must be > 0, got {scale}")
        self.scale = scale

    def __call__(self, samples: Sequence[RewardInput]) -> list[float]:
        out = []
        for s in samples:
            if s.answer is None:
                raise ValueError("reward toy needs an 'answer' in every row")
            m = self._LEADING.match(s.response)
            out.append(max(0.0, 1.0 - abs(int(m.group(1)) - int(s.answer)) / self.scale) if m else 0.0)
        return out
