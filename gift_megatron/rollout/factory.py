"""The trainer's rollout engine for a config: vLLM on GPUs, transformers' generate on CPU.

The engine is built with random (or dummy) weights of the trained architecture; the trainer streams its
own weights in right away (``Trainer.sync_weights``), so engine and trainer start on the same weights.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from gift_megatron.device import compute_device, use_cuda


def resolve_engine(name: str) -> str:
    """``auto`` -> ``vllm`` with CUDA, ``hf`` without."""
    if name == "auto":
        return "vllm" if use_cuda() else "hf"
    return name


def build_engine(cfg: Any, tokenizer: Any):
    """A RolloutEngine for ``cfg`` (a TrainConfig) whose vocabulary is ``cfg.model.vocab_size``."""
    from gift_megatron.checkpoint import hf_config_dict

    kind = resolve_engine(cfg.rollout.engine)
    dtype = cfg.precision.torch_dtype
    hf_cfg = hf_config_dict(cfg.model, dtype=dtype, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                            bos_token_id=tokenizer.bos_id)
    if kind == "hf":
        import transformers

        from gift_megatron.rollout.hf_engine import HFRolloutEngine

        config = transformers.AutoConfig.for_model(**hf_cfg)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(compute_device())
        return HFRolloutEngine(model, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if kind == "vllm":
        from gift_megatron.checkpoint.convert import write_hf_config
        from gift_megatron.rollout.vllm_engine import VLLMRolloutEngine

        # vLLM builds its model from a directory holding the config. Prompts are token ids and EOS comes from
        # the config, so no tokenizer is needed there (and sentencepiece tokenizers could not be saved).
        os.makedirs(cfg.run.output_dir, exist_ok=True)
        model_dir = tempfile.mkdtemp(prefix="gift_megatron_vllm_", dir=cfg.run.output_dir)
        write_hf_config(model_dir, hf_cfg)
        r = cfg.rollout
        return VLLMRolloutEngine(model_dir, tensor_parallel_size=r.tensor_parallel_size,
                                 gpu_memory_utilization=r.gpu_memory_utilization,
                                 enable_sleep_mode=r.sleep_during_training, seed=cfg.run.seed,
                                 dtype=cfg.precision.dtype, max_model_len=cfg.model.seq_length + 1,
                                 skip_tokenizer_init=True)
    raise ValueError(f"rollout.engine: unknown engine {kind!r} (auto, hf, vllm)")
