"""Layer 5: rewards. ``build_reward(name, **options)`` for a config's ``reward`` section:

- ``math_verify``: final-answer equivalence through math-verify (boxed answers, fractions, decimals);
- ``exact_match``: normalized string equality (option ``first_number``);
- ``toy``: the CPU demo's toy task;
- ``reward_model:PATH``: a Hugging Face sequence-classification reward model;
- ``package.module:function``: any user function. It receives the list of RewardInput of a batch and
  returns one float per sample; with option ``per_sample: true`` it is called as ``fn(prompt, response,
  answer)`` once per sample instead.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

from gift_megatron.rewards.base import RewardError, RewardFunction, RewardInput, check_rewards
from gift_megatron.rewards.verifiers import ExactMatch, MathVerify, ToyReward

BUILTIN = {"math_verify": MathVerify, "exact_match": ExactMatch, "toy": ToyReward}


class _UserFunction:
    def __init__(self, fn: Callable, spec: str, per_sample: bool, options: dict) -> None:
        self.fn, self.spec, self.per_sample, self.options = fn, spec, per_sample, options

    def __call__(self, samples: Sequence[RewardInput]) -> list[float]:
        if self.per_sample:
            return [self.fn(s.prompt, s.response, s.answer, **self.options) for s in samples]
        return list(self.fn(list(samples), **self.options))


def build_reward(name: str, **options: Any) -> RewardFunction:
    """The reward function ``name`` with ``options``; errors name the reward and list the choices."""
    if name in BUILTIN:
        try:
            return BUILTIN[name](**options)
        except TypeError as exc:
            raise ValueError(f"reward {name}: bad options {options}: {exc}") from exc
    if name.startswith("reward_model:"):
        from gift_megatron.rewards.reward_model import RewardModel

        return RewardModel(name.split(":", 1)[1], **options)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            raise ValueError(f"reward {name}: cannot import module {module!r}: {exc}") from exc
        except AttributeError:
            raise ValueError(f"reward {name}: module {module!r} has no attribute {attr!r}") from None
        if not callable(fn):
            raise ValueError(f"reward {name}: {attr!r} is not callable")
        per_sample = bool(options.pop("per_sample", False))
        return _UserFunction(fn, name, per_sample, options)
    raise ValueError(f"reward: unknown reward {name!r}; choose one of {sorted(BUILTIN)}, reward_model:PATH or "
                     "package.module:function")


__all__ = ["RewardError", "RewardFunction", "RewardInput", "check_rewards", "build_reward", "ExactMatch",
           "MathVerify", "ToyReward"]
