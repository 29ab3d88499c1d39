"""Rule-based rewards: math answers through ``math-verify``, exact match, and the toy task's reward."""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

from gift_megatron.rewards.base import RewardError, RewardInput, require_answer, show_sample

# An optionally signed integer, decimal or fraction, as it appears in free text ("-3", "0.5", "3/4", "1,234").
_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def first_number(text: str) -> str | None:
    """The first number in ``text`` with thousands separators removed ("1,234" -> "1234"), or None."""
    m = _NUMBER.search(text)
    return m.group(0).replace(",", "").lstrip("+") if m else None


class MathVerify:
    """1.0 when the response's final answer equals the row's answer mathematically, else 0.0.

    math-verify extracts the answer from the response (``\\boxed{...}`` first, then a "the answer is ..."
    phrase, then the last LaTeX or plain expression in the text) and compares with sympy: ``\\boxed{1/2}`` == ``0.5`` ==
    ``\\frac{1}{2}``. The row's answer is parsed the same way; a bare answer like ``0.5`` or ``\\frac12`` is
    wrapped in ``$...$`` so that LaTeX answers parse too.

    Timeouts: math-verify bounds parsing and comparison with ``signal.alarm``, which Python only allows in
    the main thread of the main interpreter. The trainer scores in its main thread, so the timeout
    (``timeout_seconds``, whole seconds) applies there. Called from another thread, the timeout is turned off
    (math-verify would otherwise raise); ``off_main_thread: error`` makes that case an error instead, for
    callers who would rather fail than risk a pathological input running unbounded.
    """

    def __init__(
        self, timeout_seconds: int = 5, correct: float = 1.0, wrong: float = 0.0, off_main_thread: str = "no_timeout"
    ) -> None:
        try:
            import math_verify  # noqa: F401
        except ImportError as exc:
            raise ImportError("reward math_verify needs the math-verify package (pip install math-verify)") from exc
        if not isinstance(timeout_seconds, int) or timeout_seconds < 0:
            raise ValueError(
                f"reward math_verify: timeout_seconds must be a whole number >= 0 (0: no timeout), "
                f"got {timeout_seconds!r}"
            )
        if off_main_thread not in ("no_timeout", "error"):
            raise ValueError(
                f"reward math_verify: off_main_thread must be 'no_timeout' or 'error', got {off_main_thread!r}"
            )
        self.timeout, self.correct, self.wrong = timeout_seconds or None, float(correct), float(wrong)
        self.off_main_thread = off_main_thread
        self._gold_cache: dict[tuple[str, int | None], Any] = {}
        self._lock = threading.Lock()  # the cache may be shared by threads (off_main_thread: no_timeout)

    def _timeout(self) -> int | None:
        if self.timeout is None or threading.current_thread() is threading.main_thread():
            return self.timeout
        if self.off_main_thread == "error":
            raise RuntimeError(
                "reward math_verify: called outside the main thread, where math-verify's "
                "signal-based timeout cannot work (off_main_thread: error)"
            )
        return None

    def _gold(self, answer: str, timeout: int | None) -> Any:
        # A group's members share one answer: parse it once. Failed parses (e.g. a timeout under load) are
        # not cached, so one slow moment does not mark every later response to that answer wrong.
        key = (answer, timeout)
        with self._lock:
            if key in self._gold_cache:
                return self._gold_cache[key]
        from math_verify import parse

        wrapped = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
        gold = parse(wrapped, parsing_timeout=timeout)  # pyrefly: ignore[bad-argument-type]  (None: no limit)
        if gold:
            with self._lock:
                if len(self._gold_cache) >= 4096:
                    self._gold_cache.pop(next(iter(self._gold_cache)))  # oldest first: dicts keep insertion order
                self._gold_cache[key] = gold
        return gold

    def score(self, response: str, answer: str, timeout: int | None = None) -> float:
        """The reward of one response against one reference answer."""
        from math_verify import parse, verify

        gold = self._gold(answer, timeout)
        pred = parse(response, parsing_timeout=timeout)  # pyrefly: ignore[bad-argument-type]  (None: no limit)
        if not gold or not pred:
            return self.wrong
        return self.correct if verify(gold, pred, timeout_seconds=timeout) else self.wrong

    def __call__(self, samples: Sequence[RewardInput]) -> list[float]:
        timeout = self._timeout()
        return [self.score(s.response, require_answer(s, "math_verify"), timeout) for s in samples]


class ExactMatch:
    """1.0 when the response equals the answer after normalization, else 0.0.

    Normalization: surrounding whitespace stripped and inner runs of whitespace collapsed to one space
    (``normalize_whitespace``), lower-cased (``ignore_case``). ``first_number``: compare only the first
    number in the response ("42, because 6*7" matches "42"; thousands separators removed on both sides).
    """

    def __init__(self, ignore_case: bool = True, normalize_whitespace: bool = True, first_number: bool = False) -> None:
        self.ignore_case, self.normalize_whitespace = ignore_case, normalize_whitespace
        self.first_number = first_number

    def _norm(self, text: str) -> str:
        text = " ".join(text.split()) if self.normalize_whitespace else text
        return text.lower() if self.ignore_case else text

    def score(self, response: str, answer: str) -> float:
        if self.first_number:
            got = first_number(response)
            want = answer.strip().replace(",", "").lstrip("+")
            return 1.0 if got is not None and got == want else 0.0
        return 1.0 if self._norm(response) == self._norm(answer) else 0.0

    def __call__(self, samples: Sequence[RewardInput]) -> list[float]:
        return [self.score(s.response, require_answer(s, "exact_match")) for s in samples]


class ToyReward:
    """The toy task's reward (gift_megatron.data.toy). n = the integer the response starts with (leading
    spaces allowed, the rest of the response ignored); no leading integer scores 0.0.

    mode ``graded`` (default): ``max(0, 1 - |n - answer| / scale)``, so 1.0 for the exact answer and partial
    credit for near misses; mode ``exact``: 1.0 when ``n == answer``. ``max_digits``: read at most this
    many digits of n (default: all), e.g. 1 for ``add_mod10`` so that only the first character counts and a
    random policy finds the answer about once in ten tries instead of having to also stop after one digit.
    """

    def __init__(self, scale: float = 10.0, mode: str = "graded", max_digits: int | None = None) -> None:
        if scale <= 0:
            raise ValueError(f"reward toy: scale must be > 0, got {scale}")
        if mode not in ("graded", "exact"):
            raise ValueError(f"reward toy: mode must be 'graded' or 'exact', got {mode!r}")
        if max_digits is not None and (not isinstance(max_digits, int) or max_digits < 1):
            raise ValueError(f"reward toy: max_digits must be a whole number >= 1 or null, got {max_digits!r}")
        self.scale, self.mode, self.max_digits = float(scale), mode, max_digits
        self._leading = re.compile(r"\s*(-?\d" + ("+" if max_digits is None else f"{{1,{max_digits}}}") + ")")

    def score(self, response: str, answer: str) -> float:
        m = self._leading.match(response)
        if not m:
            return 0.0
        miss = abs(int(m.group(1)) - int(answer))
        if self.mode == "exact":
            return 1.0 if miss == 0 else 0.0
        return max(0.0, 1.0 - miss / self.scale)

    def __call__(self, samples: Sequence[RewardInput]) -> list[float]:
        out = []
        for s in samples:
            answer = require_answer(s, "toy")
            if not re.fullmatch(r"\s*-?\d+\s*", answer):
                raise RewardError(f"reward toy: the answer must be an integer: {show_sample(s)}")
            out.append(self.score(s.response, answer))
        return out
