"""Layer 5: rewards. ``build_reward(spec, **options)`` for a config's ``reward`` section:

- ``math_verify``: final-answer equivalence through math-verify (boxed answers, fractions, decimals);
- ``exact_match``: normalized string equality (option ``first_number``);
- ``toy``: the CPU demo's toy task (graded or exact);
- ``reward_model:PATH``: a Hugging Face sequence-classification reward model;
- ``package.module:function`` or ``path/to/file.py:function``: any user function. It receives the list of
  RewardInput of a batch and returns one float per sample; with option ``per_sample: true`` it is called
  as ``fn(prompt, response, answer)`` once per sample instead.

Every reward function is ``fn(samples: list[RewardInput]) -> list[float]``; ``check_rewards`` validates
what one returned (count, numbers, finiteness) and shows the offending sample.
"""

from gift_megatron.rewards.base import RewardError, RewardFunction, RewardInput, check_rewards, show_sample
from gift_megatron.rewards.registry import BUILTIN, UserFunction, build_reward, check_reward
from gift_megatron.rewards.verifiers import ExactMatch, MathVerify, ToyReward, first_number

__all__ = [
    "BUILTIN",
    "ExactMatch",
    "MathVerify",
    "RewardError",
    "RewardFunction",
    "RewardInput",
    "ToyReward",
    "UserFunction",
    "build_reward",
    "check_reward",
    "check_rewards",
    "first_number",
    "show_sample",
]
