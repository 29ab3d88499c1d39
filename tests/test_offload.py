"""Training state offloaded while the rollout engine is awake (gift_megatron/megatron/offload.py).

On a CPU-only machine the offloader runs with ``device="cpu"``: the same code path as on CUDA (storage copied
to a host buffer, storage resized to zero bytes, resized back and refilled), with CPU storages as the memory
being freed. The tests check that the memory is really released, that onload refills it from the host copy,
and that Megatron training interleaved with offload/onload is bit-identical to training without it, at 2
ranks with the plain and the distributed optimizer.
"""

from __future__ import annotations

import pytest
import torch

from gift_megatron.megatron.offload import TrainingStateOffloader, grad_buffers, optimizer_tensors
from tests.multiproc import run_ranks


def _main_param_setup():
    """A tiny 'mixed precision' set-up without Megatron: model weights, separate fp32 main weights in an Adam
    optimizer (as Megatron's optimizers hold them), one step taken so the Adam moments exist."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    main = [p.detach().clone().float().requires_grad_() for p in model.parameters()]
    opt = torch.optim.Adam(main, lr=0.1)
    for p in main:
        p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


def test_offload_releases_the_memory_and_onload_refills_it_from_the_host_copy():
    model, opt = _main_param_setup()
    before = [t.clone() for t in optimizer_tensors(opt, with_grads=False)]
    grads = [p.grad for p in opt.param_groups[0]["params"]]
    weights = [p.detach().clone() for p in model.parameters()]
    off = TrainingStateOffloader([model], opt, device="cpu")
    with torch.device("meta"):  # device discipline: every tensor the offloader makes names its device
        released = off.offload()
    tensors = list(optimizer_tensors(opt, with_grads=False))
    # main weights (2), exp_avg, exp_avg_sq and step (6) copied; their grads (2) released, not copied
    assert released == sum(t.numel() * t.element_size() for t in before + grads)
    assert sum(h.numel() for h in off._host.values()) == sum(t.numel() * t.element_size() for t in before)
    assert all(g.untyped_storage().nbytes() == 0 for g in grads)
    assert all(t.untyped_storage().nbytes() == 0 for t in tensors)
    assert all(p.untyped_storage().nbytes() > 0 for p in model.parameters())  # weights stay: the sync reads them
    assert off.offload() == 0 and off.offloaded  # idempotent
    with torch.device("meta"):
        off.onload()
    assert not off.offloaded
    assert all(torch.equal(a, b) for a, b in zip(before, tensors))
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
    assert all(torch.count_nonzero(g) == 0 for g in grads)  # gradients come back zeroed

    # The restored bytes come from the host buffer, not from memory that happened to keep them.
    off.offload()
    for host in off._host.values():
        host.fill_(0)
    off.onload()
    assert all(torch.count_nonzero(t) == 0 for t in optimizer_tensors(opt, with_grads=False))


def test_disabled_offloader_moves_nothing():
    model, opt = _main_param_setup()
    off = TrainingStateOffloader([model], opt, device="cpu", enabled=False)
    assert off.offload() == 0 and not off.offloaded
    assert all(t.untyped_storage().nbytes() > 0 for t in optimizer_tensors(opt))


def test_other_devices_are_left_alone():
    """Only storages on the offloader's device move (on CUDA: Adam's host step counter stays put)."""
    model, opt = _main_param_setup()
    off = TrainingStateOffloader([model], opt, device="cuda")
    assert off.offload() == 0
    assert all(t.untyped_storage().nbytes() > 0 for t in optimizer_tensors(opt))


def _train_worker(rank, world, distributed, bf16, steps):
    """Two identical models trained side by side on this rank: A plainly, B with offload after every step and
    onload before the next (as the trainer does around the engine's wake and sleep), plus a state read inside
    ``onloaded()`` (the checkpoint save) at step 1. Returns what must be bit-identical, and what offload freed."""
    from tests.tiny_gpt import (
        Layout,
        TinyGPT,
        Trainer,
        build_model,
        global_batch,
        micro_batches,
        setup_parallel,
        teardown_parallel,
    )

    spec, layout = TinyGPT(bf16=bf16), Layout(distributed_optimizer=distributed)
    setup_parallel(layout)
    try:
        model_a = build_model(spec, layout)
        init = {k: v.clone() for k, v in model_a.state_dict().items() if torch.is_tensor(v)}
        model_b = build_model(spec, layout)
        model_b.load_state_dict(init, strict=False)
        a, b = Trainer(model_a, spec, layout), Trainer(model_b, spec, layout)
        off = TrainingStateOffloader([b.model], b.optimizer, device="cpu", group=torch.distributed.group.WORLD)
        out = {"a": [], "b": [], "released": [], "weights_kept": True, "freed_all": True}
        for step in range(steps):
            mbs = micro_batches(global_batch(spec, 4, seed=step), 2, rank, world)
            out["a"].append(a.step(mbs))
            off.after_engine_sleeps()
            out["b"].append(b.step(mbs))
            off.before_engine_wakes()
            out["released"].append(off.offloaded_bytes)
            out["copied"] = sum(h.numel() for h in off._host.values())
            out["grad_bytes"] = sum(t.numel() * t.element_size() for t in grad_buffers([b.model]))
            out["freed_all"] &= all(t.untyped_storage().nbytes() == 0 for t in grad_buffers([b.model]))
            out["freed_all"] &= all(
                t.untyped_storage().nbytes() == 0
                for t in optimizer_tensors(b.optimizer)
                if t.device.type == "cpu"
                and t.numel() > 1
                and t.untyped_storage()._cdata not in {p.untyped_storage()._cdata for p in b.model.parameters()}
            )
            out["weights_kept"] &= all(p.untyped_storage().nbytes() > 0 for p in b.model.parameters())
            if step == 1:
                with off.onloaded():
                    out["state_b"] = [t.clone() for t in optimizer_tensors(b.optimizer, with_grads=False)]
                out["state_a"] = [t.clone() for t in optimizer_tensors(a.optimizer, with_grads=False)]
                assert off.offloaded  # offloaded again after the block
        off.after_engine_sleeps()
        out["weights_a"] = [p.detach().clone() for p in a.model.parameters()]
        out["weights_b"] = [p.detach().clone() for p in b.model.parameters()]
        out["state_a_end"] = [t.clone() for t in optimizer_tensors(a.optimizer, with_grads=False)]
        out["state_b_end"] = [t.clone() for t in optimizer_tensors(b.optimizer, with_grads=False)]
        return out
    finally:
        teardown_parallel()


def _same(xs, ys):
    return len(xs) == len(ys) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(xs, ys))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "distributed, bf16",
    [(False, True), (True, True), (True, False)],
    ids=["plain-bf16", "distributed-bf16", "distributed-fp32"],
)
def test_training_with_offload_is_bit_identical(distributed, bf16):
    results = run_ranks(_train_worker, 2, distributed, bf16, 3, timeout=240)
    for rank, r in enumerate(results):
        assert r["a"] == r["b"], (rank, r["a"], r["b"])  # losses and grad norms, exactly
        assert _same(r["weights_a"], r["weights_b"]), rank
        assert _same(r["state_a"], r["state_b"]), rank  # what a checkpoint save inside onloaded() reads
        assert _same(r["state_a_end"], r["state_b_end"]), rank
        assert r["weights_kept"] and r["freed_all"], rank
        # grad buffer + main weights (bf16) + Adam moments: at least the fp32 grads and two moments
        n_params = sum(w.numel() for w in r["weights_a"])
        shard = n_params // 2 if distributed else n_params
        assert min(r["released"][1:]) >= 4 * n_params + 2 * 4 * shard, (r["released"], n_params)
        # gradients are released, not copied to the host (they are dead between steps)
        assert r["copied"] <= r["released"][-1] - r["grad_bytes"], (r["copied"], r["released"], r["grad_bytes"])


@pytest.mark.timeout(900)
def test_trainer_with_offload_gives_the_same_losses_and_a_complete_checkpoint(tmp_path):
    """The trainer's own wiring on 2 CPU ranks (TP 2, the CPU engine): offload before every weight sync, onload
    after the engine sleeps, the checkpoint saved from inside ``onloaded()``. Losses equal the run without
    offload exactly, and a run resumed from the checkpoint written while the states were offloaded continues
    with the same loss."""
    import os

    from gift_megatron.data.toy import write_toy_task
    from tests.test_train_e2e import data_overrides, losses, run_job

    task = str(tmp_path / "toy")
    write_toy_task(task, num_train=200, num_eval=20, seed=0)
    common = data_overrides(task) + [
        "train.steps=3",
        "run.save_interval=2",
        "train.eval_interval=0",
        "train.eval_prompts=4",
        "run.plots=false",
    ]
    plain, offloaded, resumed = (str(tmp_path / n) for n in ("plain", "offloaded", "resumed"))
    run_job(common + [f"run.output_dir={plain}", "rollout.offload_training_states=false"], timeout=400)
    run_job(common + [f"run.output_dir={offloaded}", "rollout.offload_training_states=true"], timeout=400)
    expected = losses(plain)
    assert sorted(expected) == [1, 2, 3]
    assert losses(offloaded) == expected  # exactly
    step2 = os.path.join(offloaded, "checkpoints", "step_00000002")
    run_job(
        common + [f"run.output_dir={resumed}", f"run.resume={step2}", "rollout.offload_training_states=true"],
        timeout=400,
    )
    assert losses(resumed)[3] == expected[3]


@pytest.mark.gpu
def test_cuda_memory_is_returned_and_restored():
    """On CUDA: the states' memory leaves the allocator (memory_allocated drops by at least their size) and
    comes back bit-identical from pinned host buffers."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024, device="cuda")
    main = [p.detach().clone().float().requires_grad_() for p in model.parameters()]
    opt = torch.optim.Adam(main, lr=0.1)
    for p in main:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [t.clone() for t in optimizer_tensors(opt, with_grads=False) if t.is_cuda]
    off = TrainingStateOffloader([model], opt, device="cuda")
    allocated = torch.cuda.memory_allocated()
    off.before_engine_wakes()
    assert off.offloaded_bytes >= 4 * 4 * 1024 * 1024  # main weight, its grad, two Adam moments (fp32)
    assert allocated - torch.cuda.memory_allocated() >= off.offloaded_bytes  # (the allocator rounds sizes up)
    assert all(h.is_pinned() for h in off._host.values())
    off.after_engine_sleeps()
    assert _same(before, [t for t in optimizer_tensors(opt, with_grads=False) if t.is_cuda])
