"""Megatron-Core trains on CPU over gloo, and every parallel layout trains the same model the same way.

A tiny GPTModel (RoPE, RMSNorm, SwiGLU, GQA; with untied or tied embeddings) is written once at TP=1 as a
Megatron distributed checkpoint and loaded in each layout (so dist-checkpointing's resharding is under test
too). Each layout then runs 3 Adam steps with Megatron-Core's own DDP wrapper, optimizer (gradient clipping
active) and forward/backward schedule (1F1B with PP) over the same global batch, and must reproduce the
single-process run: per-step losses, clipped gradient norms and the final weights (written back through a
distributed checkpoint and loaded at TP=1). Every rank also checks that it never touched CUDA.
"""

from __future__ import annotations

import logging
import os
import traceback
from typing import Any

import pytest
import torch

from tests.multiproc import run_ranks
from tests.tiny_gpt import (
    Layout,
    TinyGPT,
    Trainer,
    build_model,
    full_state_dict,
    global_batch,
    load_weights,
    micro_batches,
    save_weights,
    setup_parallel,
    teardown_parallel,
)

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="tests the CPU runtime; with CUDA Megatron-Core runs unpatched"
)

MODELS = {"untied": TinyGPT(), "tied": TinyGPT(tie_embeddings=True)}
SEED = 1234
STEPS = 3
GLOBAL_BATCH = 4  # sequences per step, in every layout
MICRO_BATCHES = 2  # per DP rank per step
CASES = {  # name: (layout on 2 ranks, model)
    "tp2": (Layout(tp=2), "untied"),
    "dp2-distopt": (Layout(distributed_optimizer=True), "untied"),
    "pp2": (Layout(pp=2), "untied"),
    "pp2-tied": (Layout(pp=2), "tied"),  # the last stage keeps a synchronized copy of the embeddings
}
# fp32 round-off: the layouts sum the same numbers in different orders.
LOSS_TOL = dict(rtol=1e-6, atol=0.0)  # measured: 1e-7 relative
GRAD_NORM_TOL = dict(rtol=1e-5, atol=0.0)  # measured: 4e-6 relative (after 2 Adam steps, see below)
# Adam scales each update to about lr (1e-2) whatever the gradient's size, so a weight whose gradients are
# all near zero (round-off dominated) can differ by more than round-off after 3 steps: a few elements by
# ~1e-5 were measured. Every element must agree within WEIGHT_MAX_DIFF and the mean difference must stay
# at round-off level; a wrong gradient moves many weights by ~lr.
WEIGHT_MAX_DIFF = 1e-4
WEIGHT_MEAN_DIFF = 1e-7  # measured 2e-9 to 2e-8


# --------------------------------------------------------------------------------------------------
# Checks that run inside the ranks
# --------------------------------------------------------------------------------------------------


class CudaCallRecorder:
    """Records every CUDA call made after :meth:`install`.

    CUDA work either initializes CUDA first (``torch.cuda._lazy_init``, which CUDA tensor creation, device
    queries, streams and synchronize go through; on a CPU machine it raises, but a caller might swallow
    that) or, before initialization, is queued for later (``_queued_calls``, ``torch.cuda.manual_seed``'s
    seed tracker): on a CPU machine such a call is silently dropped, which is why it is recorded here.
    """

    def install(self) -> None:
        self.init_attempts: list[str] = []
        self._real_lazy_init = torch.cuda._lazy_init
        self._queued_before = len(torch.cuda._queued_calls)
        self._seed_cb_before = torch.cuda._lazy_seed_tracker.manual_seed_cb

        def recording_lazy_init() -> None:
            self.init_attempts.append("".join(traceback.format_stack(limit=12)))
            self._real_lazy_init()

        torch.cuda._lazy_init = recording_lazy_init

    def report(self) -> dict[str, Any]:
        queued = torch.cuda._queued_calls[self._queued_before :]
        return {
            "init_attempts": self.init_attempts,
            "queued_calls": ["".join(stack[-4:]) for _, stack in queued],
            "cuda_manual_seed_called": torch.cuda._lazy_seed_tracker.manual_seed_cb is not self._seed_cb_before,
            "cuda_initialized": torch.cuda.is_initialized(),
        }


def rng_draws(seed: int) -> dict[str, Any]:
    """Draws from the default stream and from the tracker's tensor-parallel stream, with what they must be
    (as on GPU: default stream seeded with ``seed`` on every rank, TP stream with ``seed + 2718 + tp_rank``,
    and drawing inside ``fork()`` leaves the default stream where it was). Also records whether ``fork()``
    logged its 'CPU RNG state changed' warning."""
    from megatron.core import parallel_state, tensor_parallel

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(tensor_parallel.random.__name__)
    logger.addHandler(handler)
    try:
        first = torch.rand(4)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            forked = torch.rand(4)
        second = torch.rand(4)
    finally:
        logger.removeHandler(handler)
    expected_default = torch.rand(8, generator=torch.Generator().manual_seed(seed))
    tp_seed = seed + 2718 + parallel_state.get_tensor_model_parallel_rank()
    return {
        "got": torch.cat([first, second]),
        "expected": expected_default,
        "forked": forked,
        "expected_forked": torch.rand(4, generator=torch.Generator().manual_seed(tp_seed)),
        "warnings": [r.getMessage() for r in records],
    }


# What enable_cpu_runtime replaces (Megatron attributes) and what it must leave alone (torch itself).
PATCHED = (
    "schedules.torch",
    "random._get_cuda_rng_state",
    "random.filters",
    "clip_grads.clip",
    "optimizer.clip",
    "DistributedOptimizer.__init__",
    "LanguageModule.setup_embeddings_and_output_layer",
    "moe.router.torch",  # Mixture-of-Experts: the router, the alltoall dispatcher and its split sizes, and
    "moe.token_dispatcher.torch",  # the sequence-/expert-parallel gathers (tests/test_moe_layout.py trains them)
    "moe.token_dispatcher.split_sizes",
    "tensor_parallel.mappings.torch",
    "tensor_parallel.layers.torch",
)
UNTOUCHED = ("torch.cuda.current_device", "torch.cuda.synchronize", "torch.zeros", "Tensor.type", "Tensor.cuda")


def runtime_snapshot() -> dict[str, Any]:
    """Identities of the PATCHED and UNTOUCHED objects (and the RNG logger's filter count)."""
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import layers, mappings
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import router, token_dispatcher

    return {
        "schedules.torch": id(schedules.torch),
        "random._get_cuda_rng_state": id(mp_random._get_cuda_rng_state),
        "clip_grads.clip": id(clip_grads.clip_grad_by_total_norm_fp32),
        "optimizer.clip": id(optimizer.clip_grad_by_total_norm_fp32),
        "DistributedOptimizer.__init__": id(distrib_optimizer.DistributedOptimizer.__init__),
        "LanguageModule.setup_embeddings_and_output_layer": id(LanguageModule.setup_embeddings_and_output_layer),
        "torch.cuda.current_device": id(torch.cuda.current_device),
        "torch.cuda.synchronize": id(torch.cuda.synchronize),
        "torch.zeros": id(torch.zeros),
        "Tensor.type": id(torch.Tensor.type),
        "Tensor.cuda": id(torch.Tensor.cuda),
        "random.filters": len(logging.getLogger(mp_random.__name__).filters),
        "moe.router.torch": id(router.torch),
        "moe.token_dispatcher.torch": id(token_dispatcher.torch),
        "moe.token_dispatcher.split_sizes": id(token_dispatcher.maybe_move_tensor_to_cpu),
        "tensor_parallel.mappings.torch": id(mappings.torch),
        "tensor_parallel.layers.torch": id(layers.torch),
    }


def train(layout: Layout, init_dir: str, spec: TinyGPT) -> tuple[Any, dict[str, list[float]]]:
    """Build this rank's model, load the initial checkpoint, train STEPS steps over the same global batches
    in every layout. Returns the trained (DDP-wrapped) model and the per-step loss / grad norm."""
    from megatron.core import parallel_state

    model = build_model(spec, layout)
    load_weights(model, init_dir)
    trainer = Trainer(model, spec, layout)
    history: dict[str, list[float]] = {"loss": [], "grad_norm": []}
    for step in range(STEPS):
        batch = global_batch(spec, GLOBAL_BATCH, seed=100 + step)
        mine = micro_batches(
            batch,
            MICRO_BATCHES,
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
        )
        loss, grad_norm = trainer.step(mine)
        history["loss"].append(loss)
        history["grad_norm"].append(grad_norm)
    return trainer.model, history


# --------------------------------------------------------------------------------------------------
# Rank entry points (module level: run_ranks pickles them by reference)
# --------------------------------------------------------------------------------------------------


def reference_rank(rank: int, world_size: int, ckpt_root: str) -> dict[str, Any]:
    """TP=1/PP=1/DP=1: for each model, write the initial checkpoint and train; report the CPU-runtime
    checks."""
    from gift_megatron.parallel.cpu_runtime import cpu_runtime_enabled, enable_cpu_runtime

    recorder = CudaCallRecorder()
    recorder.install()
    before = runtime_snapshot()
    layout = Layout()
    setup_parallel(layout, seed=SEED)  # enables the CPU runtime
    rng = rng_draws(SEED)
    patched = runtime_snapshot()
    enable_cpu_runtime()  # a second time: must change nothing
    again = runtime_snapshot()

    models = {}
    for name, spec in MODELS.items():
        init_dir = os.path.join(ckpt_root, name)
        save_weights(build_model(spec, layout), init_dir)
        model, history = train(layout, init_dir, spec)
        models[name] = {"init_dir": init_dir, "history": history, "weights": full_state_dict(model)}
    # bf16 params with fp32 main params (Megatron's Float16 optimizer), from the same initial weights.
    _, history_bf16 = train(layout, models["untied"]["init_dir"], TinyGPT(bf16=True))
    teardown_parallel()
    return {
        "models": models,
        "history_bf16": history_bf16,
        "rng": rng,
        "enabled": cpu_runtime_enabled(),
        "before": before,
        "patched": patched,
        "again": again,
        "tensor_type_after": torch.zeros(1).type(),
        "cuda": recorder.report(),
    }


def layout_rank(
    rank: int, world_size: int, layout: Layout, spec: TinyGPT, init_dir: str, final_dir: str
) -> dict[str, Any]:
    """Train in ``layout`` from the initial checkpoint, then write the final weights as a distributed
    checkpoint and read them back at TP=1/PP=1 (all ranks DP) to return the whole model from rank 0."""
    recorder = CudaCallRecorder()
    recorder.install()
    setup_parallel(layout, seed=SEED)
    rng = rng_draws(SEED)
    model, history = train(layout, init_dir, spec)
    save_weights(model, final_dir)
    teardown_parallel()

    setup_parallel(Layout(), seed=SEED)
    whole = build_model(spec, Layout())
    load_weights(whole, final_dir)
    teardown_parallel()
    return {
        "history": history,
        "weights": full_state_dict(whole) if rank == 0 else None,
        "rng": rng,
        "cuda": recorder.report(),
    }


def cuda_available_rank(rank: int, world_size: int, device: str) -> dict[str, Any]:
    """With CUDA reported available: under GIFT_MEGATRON_DEVICE=auto the process trains on CUDA and
    enable_cpu_runtime must patch nothing (and import no Megatron); under =cpu (the CPU tests on a GPU host)
    it must patch, and the patched modules must see no CUDA."""
    import os
    import sys

    from gift_megatron.parallel import cpu_runtime

    os.environ["GIFT_MEGATRON_DEVICE"] = device
    torch.cuda.is_available = lambda: True
    cpu_runtime.enable_cpu_runtime()
    patched_sees_cuda = None
    if cpu_runtime.cpu_runtime_enabled():
        from megatron.core.pipeline_parallel import schedules

        patched_sees_cuda = schedules.torch.cuda.is_available()
    return {
        "enabled": cpu_runtime.cpu_runtime_enabled(),
        "megatron_imported": any(m.startswith("megatron") for m in sys.modules),
        "patched_sees_cuda": patched_sees_cuda,
    }


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    (result,) = run_ranks(reference_rank, 1, str(tmp_path_factory.mktemp("cpu_runtime")), timeout=120)
    return result


def assert_no_cuda_calls(report: dict[str, Any]) -> None:
    assert report["init_attempts"] == [], "CUDA initialization attempted:\n" + "\n".join(report["init_attempts"])
    assert report["queued_calls"] == [], "CUDA calls queued (silently dropped on CPU):\n" + "\n".join(
        report["queued_calls"]
    )
    assert not report["cuda_manual_seed_called"], "torch.cuda.manual_seed was called"
    assert not report["cuda_initialized"]


def assert_rng_as_on_gpu(rng: dict[str, Any]) -> None:
    torch.testing.assert_close(rng["got"], rng["expected"], rtol=0, atol=0)
    torch.testing.assert_close(rng["forked"], rng["expected_forked"], rtol=0, atol=0)
    assert rng["warnings"] == []


@pytest.mark.timeout(170)
def test_reference_run_makes_no_cuda_call_and_seeds_like_gpu(reference: dict[str, Any]) -> None:
    assert reference["enabled"]
    assert_no_cuda_calls(reference["cuda"])
    assert_rng_as_on_gpu(reference["rng"])
    for model in reference["models"].values():
        losses = model["history"]["loss"]
        assert all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < losses[0], "3 Adam steps on a fixed distribution should lower the loss"
        # Gradient clipping is active (clip_grad 0.5), so the norm Megatron computed enters the updates.
        assert min(model["history"]["grad_norm"]) > 0.5


@pytest.mark.timeout(170)
def test_enable_cpu_runtime_is_idempotent_and_leaves_torch_alone(reference: dict[str, Any]) -> None:
    before, patched, again = reference["before"], reference["patched"], reference["again"]
    assert [key for key in PATCHED if patched[key] == before[key]] == []
    assert {key: patched[key] for key in UNTOUCHED} == {key: before[key] for key in UNTOUCHED}
    assert again == patched  # a second call rebinds and wraps nothing
    # Outside the few wrapped Megatron calls, torch behaves as always.
    assert reference["tensor_type_after"] == "torch.FloatTensor"


def test_scoped_tensor_method_patches_apply_only_inside_the_wrapped_call() -> None:
    from gift_megatron.parallel.cpu_runtime import _CPU_TENSORS_NAMED_AS_CUDA, _CUDA_MOVES_STAY_ON_CPU

    t = torch.zeros(2)
    wrapped = _CPU_TENSORS_NAMED_AS_CUDA.around(lambda x: (x.type(), x.bfloat16().type()))
    assert _CPU_TENSORS_NAMED_AS_CUDA.around(wrapped) is wrapped  # never wrapped twice
    with _CPU_TENSORS_NAMED_AS_CUDA.active():  # re-entrant: wrapped Megatron calls can nest
        assert wrapped(t) == ("torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor")
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float64).dtype == torch.float64  # a conversion is the real method
    assert t.type() == "torch.FloatTensor"
    with _CUDA_MOVES_STAY_ON_CPU.active():
        assert t.cuda() is t
    assert torch.Tensor.cuda is _CUDA_MOVES_STAY_ON_CPU.real


@pytest.mark.timeout(170)
def test_bf16_mixed_precision_trains_on_cpu(reference: dict[str, Any]) -> None:
    fp32 = torch.tensor(reference["models"]["untied"]["history"]["loss"])
    bf16 = torch.tensor(reference["history_bf16"]["loss"])
    # bf16 weights and activations: close to fp32, not equal.
    torch.testing.assert_close(bf16, fp32, rtol=5e-3, atol=0)
    assert not torch.equal(bf16, fp32)


@pytest.mark.timeout(60)
def test_enable_cpu_runtime_is_a_no_op_with_cuda() -> None:
    (result,) = run_ranks(cuda_available_rank, 1, "auto", timeout=50, fresh_interpreter=True)
    assert result == {"enabled": False, "megatron_imported": False, "patched_sees_cuda": None}


def test_cpu_runtime_on_a_gpu_host_when_the_process_is_told_cpu() -> None:
    (result,) = run_ranks(cuda_available_rank, 1, "cpu", timeout=50)
    assert result == {"enabled": True, "megatron_imported": True, "patched_sees_cuda": False}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(CASES))
def test_layout_trains_like_single_process(case: str, reference: dict[str, Any], tmp_path: Any) -> None:
    layout, model = CASES[case]
    expected = reference["models"][model]
    results = run_ranks(
        layout_rank, 2, layout, MODELS[model], expected["init_dir"], str(tmp_path / "final"), timeout=150
    )
    ref = expected["history"]
    for rank, result in enumerate(results):
        assert_no_cuda_calls(result["cuda"])
        assert_rng_as_on_gpu(result["rng"])
        torch.testing.assert_close(torch.tensor(result["history"]["loss"]), torch.tensor(ref["loss"]), **LOSS_TOL)
        torch.testing.assert_close(
            torch.tensor(result["history"]["grad_norm"]), torch.tensor(ref["grad_norm"]), **GRAD_NORM_TOL
        )
    weights, ref_weights = results[0]["weights"], expected["weights"]
    assert weights.keys() == ref_weights.keys()
    diffs = {key: (weights[key] - ref_weights[key]).abs() for key in ref_weights}
    worst = max(diffs, key=lambda key: diffs[key].max())
    assert diffs[worst].max() <= WEIGHT_MAX_DIFF, f"{worst} differs by {diffs[worst].max():.3g}"
    mean = torch.cat([d.flatten() for d in diffs.values()]).mean()
    assert mean <= WEIGHT_MEAN_DIFF, f"mean weight difference {mean:.3g}"
