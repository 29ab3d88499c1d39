"""Layer 5: rollout engines (generate with sampling log-probs, take streamed weights)."""

from gift_megatron.rollout.base import Rollout, RolloutEngine, SamplingParams
from gift_megatron.rollout.factory import build_engine, resolve_engine
from gift_megatron.rollout.hf_engine import HFRolloutEngine

__all__ = ["HFRolloutEngine", "Rollout", "RolloutEngine", "SamplingParams", "build_engine", "resolve_engine"]
