"""Distributed checkpoints (gift_megatron/megatron/checkpoint/) on CPU over gloo.

The story the tests pin, with the tiny GPT of tests/tiny_gpt.py, Adam and a cosine LR schedule:

- uninterrupted: 4 steps at TP=2 with dropout (so every step draws from the torch and tracker RNGs);
- killed: the same job saves after steps 1 and 2, and is SIGKILLed while writing the step-3 checkpoint
  (its shards half written): ``latest`` still names step 2;
- resumed: a fresh job loads ``latest_checkpoint`` and runs steps 3-4 with the uninterrupted losses; a
  weights-only resume does not (Adam's moments, its step and the LR schedule matter); then a save that
  fails after writing its shards leaves ``latest`` at the previous checkpoint, which loads, and the next
  save cleans up;
- resharding: TP=2 weights give the same logits at TP=1 and PP=2; the non-distributed optimizer state
  continues training at TP=1 and PP=2 with the TP=2 losses; the distributed optimizer's state resumes
  exactly in its own layout and across DP, and is refused, clearly, across TP/PP;
- bad input: missing, incomplete, truncated, mismatched checkpoints fail with the path and the problem,
  before the model changes.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pickle
import random
import shutil
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.multiproc import run_ranks
from tests.tiny_gpt import (
    Layout,
    TinyGPT,
    Trainer,
    _child_processes_allowed,
    global_batch,
    micro_batches,
    setup_parallel,
    teardown_parallel,
    transformer_config,
)

SPEC = TinyGPT(seq_length=16)
BATCH = 8  # sequences per step
MICRO_BATCHES = 2  # per DP rank
DROPOUT = 0.1
EXTRA = {"objective": "sft", "lr": 1e-2}
# Deadlines. One multi-rank job takes 5-10 s here; RANKS_TIMEOUT turns a hung collective into a failure.
# Module-scoped fixtures run inside the first test that needs them, and pytest-timeout counts fixture
# setup, so a test's deadline covers its whole fixture chain (at most 6 jobs, about 40 s on 2 cores).
RANKS_TIMEOUT = 150
CHAIN_TIMEOUT = 240


# --------------------------------------------------------------------------------------------------
# The training job the workers run
# --------------------------------------------------------------------------------------------------


def build(spec: TinyGPT, layout: Layout, dropout: float = 0.0):
    """tests.tiny_gpt.build_model with dropout (the RNG streams then matter for the losses)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config(spec, layout)
    config.hidden_dropout = dropout
    config.attention_dropout = dropout
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="rope",
    )


class Job:
    """Model + Megatron DDP/Adam (tests.tiny_gpt.Trainer) + OptimizerParamScheduler + the data position."""

    def __init__(self, layout: Layout, dropout: float = 0.0, spec: TinyGPT = SPEC) -> None:
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.trainer = Trainer(build(spec, layout, dropout), spec, layout, lr=1e-2, clip_grad=1.0)
        # tiny_gpt's Trainer leaves OptimizerConfig.min_lr unset, so its param groups carry min_lr=None,
        # which the scheduler would use: give them the schedule's bounds, as a config with min_lr would.
        for group in self.trainer.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = 1e-2, 1e-3
        # Warmup then cosine decay: a scheduler that was not restored gives another LR at steps 3-4.
        self.scheduler = OptimizerParamScheduler(
            self.trainer.optimizer,
            init_lr=2e-3,
            max_lr=1e-2,
            min_lr=1e-3,
            lr_warmup_steps=1,
            lr_decay_steps=6,
            lr_decay_style="cosine",
            start_wd=0.01,
            end_wd=0.01,
            wd_incr_steps=6,
            wd_incr_style="constant",
        )
        self.consumed = 0

    def step(self) -> float:
        """One optimizer step on the next batch; the 'sampler' also advances python's and numpy's RNGs."""
        from megatron.core import parallel_state as ps

        random.random(), np.random.rand()  # a shuffling sampler would: their states must resume too
        batch = global_batch(SPEC, BATCH, seed=1000 + self.consumed // BATCH)
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        loss, _ = self.trainer.step(micro_batches(batch, MICRO_BATCHES, dp_rank, dp))
        self.scheduler.step(increment=1)
        self.consumed += BATCH
        return loss

    def save(self, root: str, step: int, **kwargs):
        from gift_megatron.megatron.checkpoint import save_checkpoint

        with _child_processes_allowed():  # Megatron's writer starts processes; run_ranks' ranks are daemons
            return save_checkpoint(
                root,
                step,
                [self.trainer.model],
                self.trainer.optimizer,
                self.scheduler,
                data_state={"consumed_samples": self.consumed},
                extra=EXTRA,
                **kwargs,
            )

    def load(self, path: str, *, optimizer: bool = True) -> dict:
        from gift_megatron.megatron.checkpoint import load_checkpoint

        info = load_checkpoint(
            path,
            [self.trainer.model],
            self.trainer.optimizer if optimizer else None,
            self.scheduler if optimizer else None,
        )
        self.consumed = info["data_state"]["consumed_samples"]
        return info


def seed_host_rngs(rank: int) -> None:
    """Per-rank python / numpy seeds: the checkpoint keeps every rank's own states."""
    random.seed(100 + rank)
    np.random.seed(200 + rank)


def rng_fingerprint() -> tuple:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    return (
        pickle.dumps(random.getstate()),
        pickle.dumps(np.random.get_state()),
        torch.get_rng_state().clone(),
        {name: state.clone() for name, state in tracker.items()},
    )


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in getattr(model, "module", model).named_parameters()}


def listing(root: str) -> dict:
    with open(os.path.join(root, "latest")) as f:
        latest = f.read().strip()
    return {"latest": latest, "entries": sorted(os.listdir(root))}


def truncate_own_shards(ckpt_dir: str, rank: int) -> None:
    for shard in glob.glob(os.path.join(ckpt_dir, f"__{rank}_*.distcp")):
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)


def sigkill_self() -> None:
    """Die like a job killed by the scheduler, after killing the processes this rank started (Megatron's
    result-queue manager), which would otherwise outlive it."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        child.kill()
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------


def uninterrupted_worker(rank, world, root):
    """4 steps at TP=2; the RNG fingerprint after step 2; a step-4 checkpoint and its logits."""
    setup_parallel(Layout(tp=2), seed=7)
    seed_host_rngs(rank)
    try:
        job = Job(Layout(tp=2), DROPOUT)
        losses, fingerprint = [], None
        for step in range(1, 5):
            losses.append(job.step())
            if step == 2:
                fingerprint = rng_fingerprint()
        job.save(root, 4)
        return {"losses": losses, "rng_after_2": fingerprint, "logits": gathered_logits(job.trainer.model.module)}
    finally:
        teardown_parallel()


def killed_worker(rank, world, root):
    """Saves after steps 1 and 2, then is SIGKILLed while the step-3 checkpoint's shards are written."""
    from megatron.core import dist_checkpointing

    setup_parallel(Layout(tp=2), seed=7)
    seed_host_rngs(rank)
    job = Job(Layout(tp=2), DROPOUT)
    for step in (1, 2):
        job.step()
        job.save(root, step, keep_last=3)
    job.step()
    real_save = dist_checkpointing.save

    def killed_while_saving(state, ckpt_dir, *args, **kwargs):
        real_save(state, ckpt_dir, *args, **kwargs)
        truncate_own_shards(ckpt_dir, rank)  # as if the kill came mid-write
        sigkill_self()

    dist_checkpointing.save = killed_while_saving
    job.save(root, 3, keep_last=3)
    raise AssertionError("unreachable: the rank was killed while saving")


def resume_worker(rank, world, root):
    """A fresh job: resume from latest (step 2) and run steps 3-4; a failing save; weights-only resume;
    and, for the resharding tests, the losses of steps 3-4 without dropout from the step-2 checkpoint."""
    from megatron.core import dist_checkpointing

    from gift_megatron.megatron.checkpoint import latest_checkpoint, load_checkpoint

    setup_parallel(Layout(tp=2), seed=12345)  # another seed: everything must come from the checkpoint
    random.seed(5), np.random.seed(5)
    out = {}
    try:
        step2 = latest_checkpoint(root)
        out["resumed_from"] = os.path.basename(step2)

        reference = Job(Layout(tp=2), dropout=0.0)
        reference.load(step2)
        out["no_dropout_losses"] = [reference.step(), reference.step()]

        job = Job(Layout(tp=2), DROPOUT)
        info = job.load(step2)
        out["info"] = {k: info[k] for k in ("step", "data_state", "extra", "rng_restored")}
        out["rng_after_load"] = rng_fingerprint()
        out["scheduler_steps"] = job.scheduler.num_steps
        losses = [job.step()]
        job.save(root, 3, keep_last=3)  # also removes the temp dir the killed job left
        out["after_save_3"] = listing(root)
        after_3 = weights(job.trainer.model)
        losses.append(job.step())
        out["losses"] = losses

        real_save = dist_checkpointing.save

        def failing_save(state, ckpt_dir, *args, **kwargs):
            real_save(state, ckpt_dir, *args, **kwargs)
            truncate_own_shards(ckpt_dir, rank)
            raise OSError("No space left on device (simulated)")

        dist_checkpointing.save = failing_save
        try:
            job.save(root, 4, keep_last=3)
            out["failed_save_error"] = None
        except OSError as exc:
            out["failed_save_error"] = str(exc)
        finally:
            dist_checkpointing.save = real_save
        out["after_failed_save"] = listing(root)
        # The previous checkpoint is intact: it loads and holds the weights after step 3.
        check = Job(Layout(tp=2), DROPOUT)
        out["loaded_after_failure"] = load_checkpoint(latest_checkpoint(root), [check.trainer.model])["step"]
        got = weights(check.trainer.model)
        out["weights_after_failure_equal"] = all(torch.equal(got[k], after_3[k]) for k in after_3)
        job.save(root, 4, keep_last=3)
        out["after_retry"] = listing(root)

        weights_only = Job(Layout(tp=2), DROPOUT)
        weights_only.load(step2, optimizer=False)  # restores the RNG, not Adam's moments or the schedule
        out["weights_only_losses"] = [weights_only.step(), weights_only.step()]
        return out
    finally:
        teardown_parallel()


def gathered_logits(model) -> torch.Tensor | None:
    """Logits of a fixed batch, gathered over TP, on the last pipeline stage (PP=2: stage 0 sends its
    hidden states to stage 1 by hand). None on other stages."""
    from megatron.core import parallel_state as ps

    model.eval()
    batch = global_batch(SPEC, 3, seed=77)
    tokens = batch["tokens"]
    pos = torch.arange(SPEC.seq_length)[None].expand_as(tokens)
    with torch.no_grad():
        if ps.get_pipeline_model_parallel_world_size() > 1:
            hidden_shape = (SPEC.seq_length, tokens.shape[0], SPEC.hidden_size)
            if not ps.is_pipeline_first_stage():
                received = torch.empty(hidden_shape)
                dist.recv(received, src=ps.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(received)
            out = model(tokens, pos, None)
            if not ps.is_pipeline_last_stage():
                dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
                return None
        else:
            out = model(tokens, pos, None)
    tp = ps.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(out) for _ in range(tp)]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def distributed_optimizer_worker(rank, world, root):
    """DP=2 with the distributed optimizer: save at steps 0 and 1, then steps 2-3; a fresh DP=2 job
    resumed from step 1 (same layout) and one resumed with the weights only, each running steps 2-3."""
    from gift_megatron.megatron.checkpoint import list_checkpoints

    setup_parallel(Layout(distributed_optimizer=True), seed=7)
    seed_host_rngs(rank)
    try:
        job = Job(Layout(distributed_optimizer=True))
        job.save(root, 0)  # before the first step: torch's Adam has no state yet
        job.step()
        path = job.save(root, 1)
        out = {"path": path, "losses": [job.step(), job.step()], "saved": [s for s, _ in list_checkpoints(root)]}
        resumed = Job(Layout(distributed_optimizer=True))
        resumed.load(path)
        out["resumed_losses"] = [resumed.step(), resumed.step()]
        weights_only = Job(Layout(distributed_optimizer=True))
        weights_only.load(path, optimizer=False)
        # The distributed optimizer keeps fp32 main params of its shard: they must follow the new weights.
        weights_only.trainer.optimizer.reload_model_params()
        out["weights_only_losses"] = [weights_only.step(), weights_only.step()]
        return out
    finally:
        teardown_parallel()


def single_rank_worker(rank, world, final_tp2, step2_tp2, distopt_dp2, scratch):
    """TP=1, one rank: logits of the TP=2 weights; Adam state resharded TP=2 -> 1; the distributed
    optimizer's state DP=2 -> 1; strict and non-strict key matching; every load error, each checked to
    leave the model unchanged."""
    from gift_megatron.megatron.checkpoint import load_checkpoint, save_checkpoint

    setup_parallel(Layout(), seed=3)
    out = {}
    try:
        model = build(SPEC, Layout())
        out["rng_restored"] = load_checkpoint(final_tp2, [model])["rng_restored"]
        out["logits"] = gathered_logits(model)

        job = Job(Layout())
        job.load(step2_tp2)
        out["no_dropout_losses"] = [job.step(), job.step()]

        job = Job(Layout(distributed_optimizer=True))
        job.load(distopt_dp2)
        out["distopt_losses"] = [job.step(), job.step()]

        wider = build(TinyGPT(seq_length=16, hidden_size=96, ffn_hidden_size=192), Layout())
        out["shape_error"], out["shape_unchanged"] = _load_error(wider, final_tp2)
        plain = Job(Layout())
        out["kind_error"], out["kind_unchanged"] = _load_error(
            plain.trainer.model, distopt_dp2, optimizer=plain.trainer.optimizer
        )
        out["missing_error"], _ = _load_error(model, os.path.join(scratch, "step_00000042"))
        truncated = os.path.join(scratch, "truncated")
        shutil.copytree(final_tp2, truncated)
        truncate_own_shards(truncated, 1)
        out["truncated_error"], out["truncated_unchanged"] = _load_error(model, truncated)
        with _child_processes_allowed():
            weights_only = save_checkpoint(os.path.join(scratch, "weights_only"), 0, [model])
        out["no_optimizer_error"], _ = _load_error(plain.trainer.model, weights_only, optimizer=plain.trainer.optimizer)
        out["no_scheduler_error"], _ = _load_error(plain.trainer.model, weights_only, scheduler=plain.scheduler)
        # Tied embeddings: the model has no output_layer.weight, the checkpoint has one.
        tied = build(TinyGPT(seq_length=16, tie_embeddings=True), Layout())
        out["strict_error"], out["strict_unchanged"] = _load_error(tied, final_tp2)
        load_checkpoint(final_tp2, [tied], strict=False)
        out["non_strict_embedding_equal"] = torch.equal(
            tied.embedding.word_embeddings.weight, model.embedding.word_embeddings.weight
        )
        return out
    finally:
        teardown_parallel()


def pipeline_worker(rank, world, final_tp2, step2_tp2, distopt_dp2):
    """PP=2: logits of the TP=2 weights; Adam state resharded TP=2 -> PP=2; the distributed optimizer's
    dp_reshardable state refused at PP=2. Then DP=2: Adam state resharded TP=2 -> DP=2."""
    setup_parallel(Layout(pp=2), seed=3)
    out = {}
    try:
        from gift_megatron.megatron.checkpoint import load_checkpoint

        model = build(SPEC, Layout(pp=2))
        load_checkpoint(final_tp2, [model])
        out["logits"] = gathered_logits(model)

        job = Job(Layout(pp=2))
        job.load(step2_tp2)
        out["no_dropout_losses"] = [job.step(), job.step()]

        job = Job(Layout(pp=2, distributed_optimizer=True))
        out["distopt_error"], out["distopt_unchanged"] = _load_error(
            job.trainer.model, distopt_dp2, optimizer=job.trainer.optimizer
        )

        # The same two ranks as DP=2: Adam's state from TP=2 continues there too.
        teardown_parallel()
        setup_parallel(Layout(), seed=3)
        job = Job(Layout())
        job.load(step2_tp2)
        out["dp2_no_dropout_losses"] = [job.step(), job.step()]
        return out
    finally:
        teardown_parallel()


def _load_error(model, path, **kwargs) -> tuple[str | None, bool]:
    """(the CheckpointError message or None, whether the model's weights are unchanged)."""
    from gift_megatron.megatron.checkpoint import CheckpointError, load_checkpoint

    before = weights(model)
    try:
        load_checkpoint(path, [model], **kwargs)
        message = None
    except CheckpointError as exc:
        message = str(exc)
    after = weights(model)
    return message, all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------------------------------
# Fixtures: each job runs once per module
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoint_runs")


@pytest.fixture(scope="module")
def uninterrupted(runs):
    return run_ranks(uninterrupted_worker, 2, str(runs / "uninterrupted"), timeout=RANKS_TIMEOUT)


@pytest.fixture(scope="module")
def killed(runs):
    root = str(runs / "resumable")
    with pytest.raises(RuntimeError, match="exited with code -9"):
        run_ranks(killed_worker, 2, root, timeout=RANKS_TIMEOUT)
    return root, listing(root)


@pytest.fixture(scope="module")
def resumed(killed):
    root, _ = killed
    return run_ranks(resume_worker, 2, root, timeout=RANKS_TIMEOUT)


@pytest.fixture(scope="module")
def distributed_optimizer(runs):
    return run_ranks(distributed_optimizer_worker, 2, str(runs / "distopt"), timeout=RANKS_TIMEOUT)[0]


@pytest.fixture(scope="module")
def resharded(runs, uninterrupted, resumed, distributed_optimizer):
    """Results at TP=1 (one rank) and PP=2 (two ranks) from the TP=2 and DP=2 checkpoints."""
    final_tp2 = str(runs / "uninterrupted" / "step_00000004")
    step2_tp2 = str(runs / "resumable" / "step_00000002")
    args = (final_tp2, step2_tp2, distributed_optimizer["path"])
    scratch = str(runs / "scratch")
    single = run_ranks(single_rank_worker, 1, *args, scratch, timeout=RANKS_TIMEOUT)[0]
    pipeline = run_ranks(pipeline_worker, 2, *args, timeout=RANKS_TIMEOUT)
    return single, pipeline


# --------------------------------------------------------------------------------------------------
# Kill, resume, crash mid-save
# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_killed_job_resumes_with_the_uninterrupted_losses(uninterrupted, resumed):
    full = uninterrupted[0]["losses"]
    for rank in range(2):
        r = resumed[rank]
        assert r["resumed_from"] == "step_00000002"
        assert r["info"] == {
            "step": 2,
            "data_state": {"consumed_samples": 2 * BATCH},
            "extra": EXTRA,
            "rng_restored": True,
        }
        assert r["scheduler_steps"] == 2
        assert r["losses"] == pytest.approx(full[2:], rel=1e-5), (r["losses"], full)
        # Without Adam's moments/step and the LR schedule, step 4 differs (step 3's loss is computed
        # before the first update, with the restored RNG, so it still agrees).
        assert r["weights_only_losses"][0] == pytest.approx(full[2], rel=1e-5)
        assert abs(r["weights_only_losses"][1] - full[3]) > 1e-3 * abs(full[3]), (r["weights_only_losses"], full)


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_every_rank_resumes_its_own_rng_states(uninterrupted, resumed):
    for rank in range(2):
        saved, loaded = uninterrupted[rank]["rng_after_2"], resumed[rank]["rng_after_load"]
        assert saved[0] == loaded[0] and saved[1] == loaded[1]  # python, numpy
        assert torch.equal(saved[2], loaded[2])  # torch CPU
        assert saved[3].keys() == loaded[3].keys()  # Megatron's tracker (dropout in TP regions)
        assert all(torch.equal(saved[3][k], loaded[3][k]) for k in saved[3])
    # The two TP ranks' states differ (tracker seeds, host seeds): per-rank storage is needed.
    assert uninterrupted[0]["rng_after_2"][0] != uninterrupted[1]["rng_after_2"][0]


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_kill_mid_save_leaves_latest_at_the_previous_checkpoint(killed):
    root, after_kill = killed
    assert after_kill["latest"] == "step_00000002"
    entries = after_kill["entries"]
    assert [e for e in entries if e.startswith("step_")] == ["step_00000001", "step_00000002"]
    stale = [e for e in entries if e.startswith(".tmp_step_00000003_")]
    assert len(stale) == 1, entries
    assert not os.path.exists(os.path.join(root, stale[0], "gift_checkpoint.json"))


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_failed_save_keeps_latest_loadable_and_the_next_save_cleans_up(resumed):
    r = resumed[0]
    # The save after step 3 removed the killed job's temp dir; keep_last=3 kept steps 1-3.
    assert r["after_save_3"] == {
        "latest": "step_00000003",
        "entries": ["latest", "step_00000001", "step_00000002", "step_00000003"],
    }
    for rank in range(2):
        assert resumed[rank]["failed_save_error"] == "No space left on device (simulated)"
    failed = r["after_failed_save"]
    assert failed["latest"] == "step_00000003"
    assert "step_00000004" not in failed["entries"]
    assert any(e.startswith(".tmp_step_00000004_") for e in failed["entries"]), failed
    assert r["loaded_after_failure"] == 3 and r["weights_after_failure_equal"]
    # The retry succeeded, removed the failed attempt's temp dir and, keeping 3, step 1.
    assert r["after_retry"] == {
        "latest": "step_00000004",
        "entries": ["latest", "step_00000002", "step_00000003", "step_00000004"],
    }


# --------------------------------------------------------------------------------------------------
# Resharding
# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_tp2_weights_give_the_same_logits_at_tp1_and_pp2(uninterrupted, resharded):
    single, pipeline = resharded
    expected = uninterrupted[0]["logits"]
    assert expected.shape == (3, SPEC.seq_length, SPEC.vocab_size)
    torch.testing.assert_close(single["logits"], expected, rtol=1e-5, atol=1e-5)
    assert pipeline[0]["logits"] is None  # first stage
    torch.testing.assert_close(pipeline[1]["logits"], expected, rtol=1e-5, atol=1e-5)
    assert single["rng_restored"] is False  # another layout: RNG states are not meaningful there


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_adam_state_reshards_from_tp2_to_tp1_pp2_and_dp2(resumed, resharded):
    single, pipeline = resharded
    expected = resumed[0]["no_dropout_losses"]  # TP=2, resumed from the same step-2 checkpoint
    assert single["no_dropout_losses"] == pytest.approx(expected, rel=1e-5)
    for rank in range(2):
        assert pipeline[rank]["no_dropout_losses"] == pytest.approx(expected, rel=1e-5)
        assert pipeline[rank]["dp2_no_dropout_losses"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_distributed_optimizer_resumes_and_reshards_across_dp_but_refuses_tp_pp_changes(
    distributed_optimizer, resharded
):
    single, pipeline = resharded
    assert distributed_optimizer["saved"] == [0, 1]  # a step-0 checkpoint works too
    # Same layout (DP=2): a fresh job continues exactly; without the optimizer state it does not.
    full = distributed_optimizer["losses"]
    assert distributed_optimizer["resumed_losses"] == pytest.approx(full, rel=1e-5)
    weights_only = distributed_optimizer["weights_only_losses"]
    assert weights_only[0] == pytest.approx(full[0], rel=1e-5)  # computed before the first update
    assert abs(weights_only[1] - full[1]) > 1e-3 * abs(full[1]), (weights_only, full)
    # DP=2 -> DP=1: steps 2-3 continue exactly.
    assert single["distopt_losses"] == pytest.approx(distributed_optimizer["losses"], rel=1e-5)
    # PP change: refused before the model is touched, naming the format and both layouts.
    for rank in range(2):
        message = pipeline[rank]["distopt_error"]
        assert message is not None and distributed_optimizer["path"] in message
        assert "'dp_reshardable' format at TP=1, PP=1" in message and "this run is TP=1, PP=2" in message
        assert pipeline[rank]["distopt_unchanged"]


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_mismatched_model_fails_before_loading(resharded, runs):
    single, _ = resharded
    message = single["shape_error"]
    assert message is not None and str(runs / "uninterrupted" / "step_00000004") in message
    assert "another global shape than in the checkpoint" in message
    assert "decoder.final_layernorm.weight: checkpoint [64], model [96]" in message
    assert single["shape_unchanged"]


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_wrong_optimizer_kind_fails_before_loading(resharded):
    single, _ = resharded
    assert "from a distributed optimizer, this optimizer is non-distributed" in single["kind_error"]
    assert single["kind_unchanged"]


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_missing_or_truncated_checkpoint_fails_before_loading(resharded, runs):
    single, _ = resharded
    missing = str(runs / "scratch" / "step_00000042")
    assert single["missing_error"] == f"cannot load checkpoint {missing}:\n  - the checkpoint directory does not exist"
    assert str(runs / "scratch" / "truncated") in single["truncated_error"]
    assert "file '__1_0.distcp' has" in single["truncated_error"] and "(truncated)" in single["truncated_error"]
    assert single["truncated_unchanged"]


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_state_that_was_not_saved_is_an_error(resharded):
    single, _ = resharded
    assert "the checkpoint has no optimizer state (saved with optimizer=None)" in single["no_optimizer_error"]
    assert "the checkpoint has no scheduler state (saved with scheduler=None)" in single["no_scheduler_error"]


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_strict_and_non_strict_key_matching(resharded):
    single, _ = resharded
    assert (
        "1 model tensor(s) of the checkpoint are not in the model (strict): output_layer.weight"
        in single["strict_error"]
    )
    assert single["strict_unchanged"]
    assert single["non_strict_embedding_equal"]  # strict=False loads what both have


@pytest.fixture()
def good_checkpoint(uninterrupted, runs, tmp_path):
    """A copy of the uninterrupted run's step-4 checkpoint, free to damage."""
    copy = tmp_path / "step_00000004"
    shutil.copytree(runs / "uninterrupted" / "step_00000004", copy)
    return str(copy)


def _error(path) -> str:
    """verify_checkpoint's error for ``path`` (the file checks load_checkpoint runs first, no model needed)."""
    from gift_megatron.megatron.checkpoint import CheckpointError, verify_checkpoint

    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(path)
    return str(info.value)


@pytest.mark.timeout(CHAIN_TIMEOUT)
@pytest.mark.parametrize("victim", ["metadata.json", ".metadata"])
def test_missing_metadata_file(good_checkpoint, victim):
    os.remove(os.path.join(good_checkpoint, victim))
    message = _error(good_checkpoint)
    assert good_checkpoint in message and f"file '{victim}' is missing (incomplete checkpoint)" in message


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_intact_checkpoint_verifies(good_checkpoint):
    from gift_megatron.megatron.checkpoint import verify_checkpoint

    manifest = verify_checkpoint(good_checkpoint)
    assert manifest["step"] == 4 and manifest["layout"]["tp"] == 2
    assert {"metadata.json", ".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(manifest["files"])


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_truncated_shard(good_checkpoint):
    shard = os.path.join(good_checkpoint, "__1_0.distcp")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    assert f"file '__1_0.distcp' has {size - 100} bytes, {size} were written (truncated)" in _error(good_checkpoint)


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_interrupted_save_and_corrupt_manifest(good_checkpoint, tmp_path):
    manifest = os.path.join(good_checkpoint, "gift_checkpoint.json")
    with open(manifest, "w") as f:
        f.write('{"format": 1, "step"')  # a manifest is written atomically, but a disk can still fail
    assert "gift_checkpoint.json is unreadable" in _error(good_checkpoint)
    os.remove(manifest)
    assert "no gift_checkpoint.json: not a complete checkpoint written by save_checkpoint" in _error(good_checkpoint)


@pytest.mark.timeout(CHAIN_TIMEOUT)
def test_checkpoint_root_instead_of_a_checkpoint(uninterrupted, runs):
    root = str(runs / "uninterrupted")
    assert f"pass latest_checkpoint('{root}')" in _error(root)


def test_latest_checkpoint_finds_only_complete_checkpoints(tmp_path, caplog):
    from gift_megatron.megatron.checkpoint import latest_checkpoint, list_checkpoints

    root = tmp_path / "run"
    assert latest_checkpoint(root) is None  # no directory yet: a fresh start
    os.makedirs(root / ".tmp_step_00000001_abc")
    os.makedirs(root / "step_00000002")  # no manifest: not complete
    assert latest_checkpoint(root) is None
    for step in (1, 3):
        os.makedirs(root / f"step_{step:08d}", exist_ok=True)
        (root / f"step_{step:08d}" / "gift_checkpoint.json").write_text(json.dumps({"format": 1}))
    (root / "latest").write_text("step_00000001\n")
    assert latest_checkpoint(root) == str(root / "step_00000001")  # `latest` wins over the newest
    assert [s for s, _ in list_checkpoints(root)] == [1, 3]
    (root / "latest").write_text("step_00000002\n")  # names an incomplete one: fall back, and say so
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(root) == str(root / "step_00000003")
    assert "not a complete checkpoint" in caplog.text
    (root / "latest").write_text("../elsewhere\n")
    assert latest_checkpoint(root) == str(root / "step_00000003")


def test_save_rejects_bad_arguments_before_writing(tmp_path):
    from gift_megatron.megatron.checkpoint import save_checkpoint

    with pytest.raises(ValueError, match="step must be a non-negative int"):
        save_checkpoint(tmp_path, -1, [])
    with pytest.raises(ValueError, match="keep_last must be None or an int >= 1"):
        save_checkpoint(tmp_path, 1, [], keep_last=0)
    with pytest.raises(ValueError, match="data_state must be picklable"):
        save_checkpoint(tmp_path, 1, [], data_state={"f": lambda: 0})
    assert os.listdir(tmp_path) == []


def test_publish_replaces_a_checkpoint_of_the_same_step(tmp_path):
    """A run restarted from step 2 saves step 3 again: the new step_3 replaces the old one, atomically."""
    from gift_megatron.megatron.checkpoint import latest_checkpoint
    from gift_megatron.megatron.checkpoint.publish import clean_up, publish

    root = tmp_path / "run"
    for name, marker in (("step_00000003", "old"), (".tmp_step_00000003_new", "new")):
        os.makedirs(root / name)
        (root / name / "gift_checkpoint.json").write_text(json.dumps({"format": 1, "marker": marker}))
    (root / "latest").write_text("step_00000002\n")
    publish(str(root), str(root / ".tmp_step_00000003_new"), str(root / "step_00000003"))
    clean_up(str(root), str(root / "step_00000003"), keep_last=None)
    assert latest_checkpoint(root) == str(root / "step_00000003")
    assert json.loads((root / "step_00000003" / "gift_checkpoint.json").read_text())["marker"] == "new"
    assert sorted(os.listdir(root)) == ["latest", "step_00000003"]
