"""The trainer's rollout engine for a config: vLLM on GPUs, transformers' generate on CPU.

The engine is built with random (or dummy) weights of the trained architecture; the trainer streams its
own weights in right away (``Trainer.sync_weights``), so engine and trainer start on the same weights.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from gift_megatron.device import compute_device, use_cuda


def resolve_engine(name: str) -> str:
    """``auto`` -> ``vllm`` with CUDA, ``hf`` without."""
    if name == "auto":
        return "vllm" if use_cuda() else "hf"
    return name


def engine_cuda_devices(cfg: Any, replica_ranks: Sequence[int] | None = None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` entries for this rank's vLLM engine: its data-parallel replica's GPUs on this
    node (:mod:`gift_megatron.rollout.placement`), or None without CUDA (the CPU backend places nothing).

    ``replica_ranks``: global ranks of the replica, this rank (its owner) first; default: Megatron's default
    rank order for ``cfg.parallel`` on the torch.distributed world (a world of one without it).
    """
    from gift_megatron.rollout.placement import megatron_replica_ranks, replica_engine_devices

    if not use_cuda():
        return None
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if replica_ranks is None:
        p = cfg.parallel
        replica_ranks = megatron_replica_ranks(
            rank, world, p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
        )
    # torchrun's variables; without them (a world of one), this process's GPU among those it sees.
    local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
    local_world = (
        int(os.environ["LOCAL_WORLD_SIZE"])
        if "LOCAL_WORLD_SIZE" in os.environ
        else min(world, torch.cuda.device_count())
    )
    return replica_engine_devices(
        replica_ranks,
        rank,
        local_rank,
        local_world,
        cfg.rollout.tensor_parallel_size,
        os.environ.get("CUDA_VISIBLE_DEVICES"),
    )


def build_engine(cfg: Any, tokenizer: Any, replica_ranks: Sequence[int] | None = None):
    """A RolloutEngine for ``cfg`` (a TrainConfig) whose vocabulary is ``cfg.model.vocab_size``.

    ``replica_ranks``: the global ranks of this rank's data-parallel replica, this rank first (the vLLM engine
    runs on their GPUs; see :func:`engine_cuda_devices`)."""
    from gift_megatron.hf import hf_config_dict

    kind = resolve_engine(cfg.rollout.engine)
    dtype = cfg.precision.torch_dtype
    hf_cfg = hf_config_dict(
        cfg.model,
        dtype=dtype,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
    )
    if kind == "hf":
        import transformers

        from gift_megatron.rollout.hf_engine import HFRolloutEngine

        config = transformers.AutoConfig.for_model(**hf_cfg)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(compute_device())
        return HFRolloutEngine(model, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if kind == "vllm":
        from gift_megatron.hf.convert import write_hf_config
        from gift_megatron.rollout.vllm_engine import VLLMRolloutEngine

        devices = engine_cuda_devices(cfg, replica_ranks)  # a rollout TP that does not fit: error before vLLM

        # vLLM builds its model from a directory holding the config. Prompts are token ids and EOS comes from
        # the config, so no tokenizer is needed there (and sentencepiece tokenizers could not be saved).
        os.makedirs(cfg.run.output_dir, exist_ok=True)
        model_dir = tempfile.mkdtemp(prefix="gift_megatron_vllm_", dir=cfg.run.output_dir)
        write_hf_config(model_dir, hf_cfg)
        r = cfg.rollout
        return VLLMRolloutEngine(
            model_dir,
            tensor_parallel_size=r.tensor_parallel_size,
            gpu_memory_utilization=r.gpu_memory_utilization,
            enable_sleep_mode=r.sleep_during_training,
            sleep_level=r.sleep_level,
            seed=cfg.run.seed,
            dtype=cfg.precision.dtype,
            max_model_len=cfg.model.seq_length + 1,
            kv_cache_memory_bytes=r.kv_cache_bytes,
            enforce_eager=r.enforce_eager,
            cuda_devices=devices,
            skip_tokenizer_init=True,
        )
    raise ValueError(f"rollout.engine: unknown engine {kind!r} (auto, hf, vllm)")
