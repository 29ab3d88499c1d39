"""The training loop: one obvious entry point, ``train(cfg)``.

Per step (the README, "Training"):

    prompts -> rollout n responses per prompt -> rewards -> (GFT) expert and teacher members join each group
    -> reference / old log-prob passes -> group statistics -> optimizer step(s) on mini-batches of whole groups
    -> weights streamed to the rollout engine -> metrics -> periodic checkpoint

Who does what. Every data-parallel replica (the TP x PP x CP ranks that hold one copy of the model) draws
its own share of the step's prompts. The replica's first rank (TP, PP and CP rank 0) owns the replica's
rollout engine: it generates, scores, and sends the members to the rest of its replica. Every rank then
trains on its replica's members through ``ObjectiveStep``, which makes the group statistics exact across
replicas. After the update the replica streams its weights, gathered over TP and PP, into its engine.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import random
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from gift_megatron import comm
from gift_megatron.config import TrainConfig, check_world_size, save_config
from gift_megatron.device import use_cuda
from gift_megatron.errors import StartupError
from gift_megatron.megatron.mpu import parallel_state
from gift_megatron.parallel.packing import pad_multiple
from gift_megatron.trainer.batch import Member, StepBatch, step_batch
from gift_megatron.trainer.members import assemble_members, score_members
from gift_megatron.trainer.metrics import DegenerateGroupsWatch, MetricsLogger, first_eval_record, plot_run
from gift_megatron.trainer.processes import init_distributed, is_rollout_owner, replica_groups
from gift_megatron.trainer.run_dir import lock_run_dir, watch_launcher
from gift_megatron.trainer.step_metrics import kl_to_reference, rollout_gap, rollout_totals, step_record

if TYPE_CHECKING:
    from gift_megatron.data.prompts import PromptExample
    from gift_megatron.rollout.base import RolloutEngine

log = logging.getLogger("gift_megatron.train")


def _fmt(value: float | None) -> str:
    return "none (no eval set)" if value is None else f"{value:.3f}"


# ------------------------------------------------------------------------------------------ the trainer
class Trainer:
    """Holds the run's state; ``run()`` trains ``cfg.train.steps`` steps (from the resumed step)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.started = time.monotonic()
        watch_launcher()  # under torchrun: exit when it dies (run_dir.py; no-op when the CLI started it)
        init_distributed(cfg)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # Before anything heavy: a clear error (with CUDA also when a replica's engine would not fit its GPUs).
        gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) if use_cuda() else None
        self.dp = check_world_size(cfg, self.world, gpus_per_node=gpus_per_node or None)
        # One writer per run directory, taken before anything is written there (run_dir.py).
        self.run_lock = lock_run_dir(cfg.run.output_dir, self.rank)
        ps = parallel_state()
        self.dp_rank = ps.get_data_parallel_rank()
        self.replica_group, self.owner_rank = replica_groups()
        self.owner = is_rollout_owner()
        self.run_dir = cfg.run.output_dir
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")

        from gift_megatron.objectives import build_objective

        self.objective = build_objective(cfg.objective.name, **cfg.objective.options)
        self.n_expert, self.n_teacher, self.n_rollout = cfg.group_composition()
        self.group_size = self.n_expert + self.n_teacher + self.n_rollout
        self._load_data()
        self._check_resume_target()
        self._build_model()
        self.step = 0
        self.consumed = 0
        self._resume()
        from gift_megatron.config import offload_enabled
        from gift_megatron.megatron.offload import TrainingStateOffloader

        # Gradient buffers and optimizer state live in host memory while the engine is awake (it measures the
        # free memory when it starts, so they go before it is built).
        self.states = TrainingStateOffloader(
            self.model, self.optimizer, enabled=offload_enabled(cfg), group=self.replica_group
        )
        self.states.before_engine_wakes()
        self.engine = self._build_engine() if self.owner else None
        self.sync_weights()
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        self.logger = MetricsLogger(
            self.run_dir,
            enabled=self.rank == 0,
            resume_step=self.step if self.resumed else None,
            tensorboard=cfg.run.tensorboard,
            wandb_project=cfg.run.wandb_project,
            config=dataclasses.asdict(cfg),
            total_steps=cfg.train.steps,
            initial_step=self.step,
            progress=cfg.run.progress,
            demo_members=self.n_expert + self.n_teacher > 0,
        )

    # ----------------------------------------------------------------------------------------- data
    def _load_data(self) -> None:
        from gift_megatron.data import Tokenizer, check_vocab, load_prompts
        from gift_megatron.rewards import build_reward

        d = self.cfg.data
        if not d.train_files:
            raise StartupError("data.train_files: no prompt file given")
        if d.tokenizer is None:
            if self.cfg.init.hf_config is None:
                raise StartupError("data.tokenizer: no tokenizer given (and no init.hf_config dir to take it from)")
            d.tokenizer = self.cfg.init.hf_config
        try:  # the tokenizer's own errors name data.tokenizer / data.use_chat_template / model.vocab_size
            self.tokenizer = Tokenizer.load(
                d.tokenizer, use_chat_template=d.use_chat_template, chat_template_kwargs=d.chat_template_kwargs
            )
            check_vocab(self.tokenizer, self.cfg.model.vocab_size)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
        self.train_set, _ = load_prompts(d.train_files, max_skipped_fraction=d.max_skipped_fraction, fields=d.fields)
        self.eval_set = (
            load_prompts(d.eval_files, max_skipped_fraction=d.max_skipped_fraction, fields=d.fields)[0]
            if d.eval_files
            else []
        )
        for example in self.train_set:
            self._check_example(example)
        try:
            self.reward_fn = build_reward(self.cfg.reward.name, **self.cfg.reward.options)
        except ValueError as exc:
            raise StartupError(f"reward.name / reward.options: {exc}") from exc

    def _check_example(self, ex: PromptExample) -> None:
        """Every row can form a full group and fits the sequence length (checked before any compute)."""
        where = f"{ex.source}:{ex.line}"
        n = len(self.tokenizer.prompt_ids(ex))
        if n > self.cfg.data.max_prompt_tokens:
            raise StartupError(
                f"{where}: prompt has {n} tokens, more than data.max_prompt_tokens ({self.cfg.data.max_prompt_tokens})"
            )
        if self.n_expert and not ex.expert:
            raise StartupError(
                f"{where}: objective {self.objective.name} adds {self.n_expert} expert member(s) per "
                "group but the row has no 'expert' field (set groups.n_expert=0 to train without)"
            )
        if self.n_teacher and len(ex.teachers) < self.n_teacher:
            raise StartupError(
                f"{where}: groups.n_teacher={self.n_teacher} but the row has {len(ex.teachers)} teacher response(s)"
            )

    def _step_prompts(self, step: int) -> list[tuple[int, Any]]:
        """This replica's (global prompt index within the step, example) pairs for ``step``: a seeded
        permutation per epoch, so a resumed run draws exactly what the uninterrupted run would have."""
        per_step = self.cfg.train.prompts_per_step
        share = per_step // self.dp
        out = []
        for k in range(self.dp_rank * share, (self.dp_rank + 1) * share):
            epoch, offset = divmod(step * per_step + k, len(self.train_set))
            out.append((k, self.train_set[self._epoch_order(epoch)[offset]]))
        return out

    def _epoch_order(self, epoch: int) -> list[int]:
        """The dataset order of ``epoch``, built once per epoch (not once per drawn prompt)."""
        if getattr(self, "_order_epoch", None) != epoch:
            order = list(range(len(self.train_set)))
            if self.cfg.data.shuffle:
                random.Random(self.cfg.run.seed * 1_000_003 + epoch).shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    # ---------------------------------------------------------------------------------------- model
    def _build_model(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from gift_megatron.megatron import FrozenReference, ObjectiveStep, build_model

        cfg, o = self.cfg, self.cfg.optimizer
        module = build_model(cfg.model, cfg.parallel, cfg.precision)
        if cfg.init.checkpoint:
            from gift_megatron.hf.convert import resolve_checkpoint
            from gift_megatron.megatron import load_checkpoint

            # Weights only, in this run's layout (Megatron reshards); a converted root or a step dir.
            load_checkpoint(resolve_checkpoint(cfg.init.checkpoint), [module], restore_rng=False)
        distributed = o.use_distributed_optimizer and self.dp > 1
        self.model: list[Any] = [  # Megatron's optimizer and schedules take the DDP-wrapped chunks
            DistributedDataParallel(
                config=module.config,
                module=module,
                ddp_config=DistributedDataParallelConfig(
                    grad_reduce_in_fp32=True, use_distributed_optimizer=distributed
                ),
            )
        ]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.clip_grad,
                bf16=cfg.precision.dtype == "bf16",
                fp16=cfg.precision.dtype == "fp16",
                params_dtype=cfg.precision.torch_dtype,
                use_distributed_optimizer=distributed,
            ),
            self.model,
        )
        steps = cfg.train.steps * cfg.train.updates_per_step
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if o.warmup_steps else o.lr,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=max(steps, o.warmup_steps + 1),
            lr_decay_style=o.lr_decay_style,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=max(steps, 1),
            wd_incr_style="constant",
        )
        # The frozen reference is the initial policy: built before any resume, so a resumed run compares
        # against the same weights as the uninterrupted one.
        self.reference = None
        if "ref_logp" in self.objective.uses:
            self.reference = FrozenReference(self.model, lambda i: build_model(cfg.model, cfg.parallel, cfg.precision))
        self.train_step = ObjectiveStep(
            self.objective,
            self.model,
            self.optimizer,
            reference=self.reference,
            temperature=self._logprob_temperature(),
            logprob_chunk_size=cfg.train.logprob_chunk_size,
            vocab_size=cfg.model.vocab_size,
        )

    def _logprob_temperature(self) -> float:
        t = self.cfg.rollout.temperature
        return t if t > 0 else 1.0

    # ---------------------------------------------------------------------------------------- resume
    def _check_resume_target(self) -> None:
        from gift_megatron.megatron import latest_checkpoint

        r = self.cfg.run.resume
        if r == "none" and latest_checkpoint(self.ckpt_dir) is not None:
            raise StartupError(
                f"run.output_dir {self.run_dir} already holds checkpoints: pass run.resume=auto to "
                "continue that run, or choose another run.output_dir"
            )

    def _resume(self) -> None:
        from gift_megatron.megatron import latest_checkpoint, load_checkpoint

        r = self.cfg.run.resume
        path = latest_checkpoint(self.ckpt_dir) if r == "auto" else (None if r == "none" else r)
        self.resumed = path is not None
        if path is None:
            return
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.step = int(state["step"])
        self.consumed = int((state.get("data_state") or {}).get("consumed", self.step))
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def save(self) -> None:
        from gift_megatron.megatron import save_checkpoint

        with self.states.onloaded(self.engine):  # the save reads the optimizer state on the GPU
            save_checkpoint(
                self.ckpt_dir,
                self.step,
                self.model,
                self.optimizer,
                self.scheduler,
                data_state={"consumed": self.consumed},
                keep_last=self.cfg.run.keep_last,
            )

    # --------------------------------------------------------------------------------------- rollout
    def _build_engine(self) -> RolloutEngine:
        from gift_megatron.rollout import build_engine

        # The replica's ranks, this (owner) rank first: the engine runs on their GPUs.
        ranks = dist.get_process_group_ranks(self.replica_group) if self.replica_group is not None else [self.rank]
        return build_engine(self.cfg, self.tokenizer, replica_ranks=[self.rank] + [r for r in ranks if r != self.rank])

    def _engine(self) -> RolloutEngine:
        """The replica's rollout engine; only its owner rank holds one."""
        if self.engine is None:
            raise RuntimeError(f"rank {self.rank} is not its replica's rollout owner: it has no engine")
        return self.engine

    def sync_weights(self) -> None:
        """Stream the replica's current weights (full HF tensors, gathered over TP and PP) into its engine.
        Collective over the replica; only the owner receives tensors."""
        from gift_megatron.hf import iter_hf_weights

        self.states.before_engine_wakes()  # offload, empty the CUDA cache, the replica in step
        buckets = iter_hf_weights(
            self.model, self.cfg.model, bucket_bytes=self.cfg.rollout.sync_bucket_mb << 20, dst_rank=self.owner_rank
        )
        if self.engine is None:
            for _ in buckets:
                pass
            return
        self.engine.wake()
        self.engine.update_weights(t for bucket in buckets for t in bucket)

    def _score(self, members: list[Member], examples: dict[int, Any]) -> None:
        score_members(self.reward_fn, members, examples)

    def rollout(self, step: int) -> list[Member]:
        """The replica's members for ``step`` (owner generates and scores; the replica receives)."""
        payload: list[Any] = [None]
        if self.owner:
            from gift_megatron.rollout import SamplingParams

            r = self.cfg.rollout
            drawn = self._step_prompts(step)
            examples = {k: ex for k, ex in drawn}
            prompts = [self.tokenizer.prompt_ids(ex) for _, ex in drawn]
            seed = (self.cfg.run.seed * 7919 + step * 104729 + self.dp_rank) % (2**31)
            rollouts = self._engine().generate(
                prompts,
                SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=seed),
            )
            members = assemble_members(
                drawn,
                prompts,
                rollouts,
                self.tokenizer,
                n_expert=self.n_expert,
                n_teacher=self.n_teacher,
                n_rollout=r.n,
            )
            self._score(members, examples)
            payload = [members]
        comm.broadcast_objects(payload, src=self.owner_rank, group=self.replica_group)
        return payload[0]

    # ------------------------------------------------------------------------------------------ step
    def _global_sum(self, values: list[float], every_rank: tuple[float, ...] = ()) -> list[float]:
        """Sum over data-parallel replicas of per-replica ``values`` (every rank of a replica holds the same;
        the owner's count), followed by the sums of ``every_rank`` (values only some ranks hold, each counted
        where it is): one reduction, one host copy."""
        return comm.all_reduce_host((list(values) if self.owner else [0.0] * len(values)) + list(every_rank), "sum")

    def train_one_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        all_members = self.rollout(self.step)
        t_rollout = time.perf_counter() - t0
        # Objectives that do not train on rollouts (trains_on_rollouts) score them for the reward metrics only.
        members = [m for m in all_members if m.kind != "rollout" or self.n_rollout]
        if self.engine is not None and cfg.rollout.sleep_during_training:
            self.engine.sleep()
        self.states.after_engine_sleeps()  # states back on the GPU once the owner's engine is asleep

        batch = self._step_batch(members)
        # Moved to the model's device once, with reference and old-policy log-probs computed once for the
        # whole rollout batch, before any update of it; the updates below train on slices of it.
        mbs = self.train_step.prepare(batch.micro_batches)
        kl, gap = self.rollout_metrics(mbs, batch.engine)
        per_update = len(mbs) // cfg.train.updates_per_step
        results = []
        t1 = time.perf_counter()
        for u in range(cfg.train.updates_per_step):
            results.append(self.train_step(mbs[u * per_update : (u + 1) * per_update], prepared=True))
            self.scheduler.step(increment=1)
        t_train = time.perf_counter() - t1
        after = self._post_update_metrics(mbs, self.step + 1)  # before the engine wakes for the sync
        t2 = time.perf_counter()
        self.sync_weights()
        t_sync = time.perf_counter() - t2

        self.step += 1
        self.consumed += cfg.train.prompts_per_step
        rollouts = [m for m in all_members if m.kind == "rollout"]
        # The owner's per-replica totals, plus the KL shares of the ranks that hold reference log-probs (the
        # last pipeline stage, which is not the owner when PP > 1): one reduction, one host copy.
        sums = self._global_sum(rollout_totals(rollouts, batch), kl)
        timings = {"rollout": t_rollout, "train": t_train, "sync": t_sync, "step": time.perf_counter() - t0}
        metrics = dict(results[-1].metrics)
        metrics["loss"] = sum(r.loss for r in results) / len(results)
        metrics["optim/lr"] = self.scheduler.get_lr(self.optimizer.param_groups[0])
        metrics.update(step_record(sums[:-2], sums[-2:], gap, timings))
        metrics.update(after)
        if results[-1].grad_norm is not None:
            metrics["optim/grad_norm"] = results[-1].grad_norm
        return metrics

    def rollout_metrics(
        self, mbs: list[dict[str, Any]], engine: list[torch.Tensor]
    ) -> tuple[tuple[float, float], float | None]:
        """(this rank's KL-to-reference (sum, count) share, the job's rollout log-prob gap or None), before any
        update of the step (gift_megatron/trainer/step_metrics.py)."""
        return kl_to_reference(mbs, engine), rollout_gap(mbs, engine, self.train_step.device)

    def _step_batch(self, members: list[Member]) -> StepBatch:
        """This rank's micro-batches: padded rows of its replica's members, or, under a token budget, packed
        rows of every replica's members balanced over data-parallel ranks (gathered here, in rank order)."""
        cfg, ps = self.cfg, parallel_state()
        t, p = cfg.train, cfg.parallel
        if t.micro_batch_tokens is not None and self.dp > 1:
            parts = comm.all_gather_objects(members, group=ps.get_data_parallel_group())
            members = [m for part in parts for m in part]
        return step_batch(
            members,
            seq_length=cfg.model.seq_length,
            pad_id=self.tokenizer.pad_id,
            micro_batch_size=t.micro_batch_size,
            micro_batch_tokens=t.micro_batch_tokens,
            dp_size=self.dp,
            dp_rank=self.dp_rank,
            multiple=pad_multiple(p.tensor_model_parallel_size, p.context_parallel_size, p.sequence_parallel),
            fixed_rows=p.pipeline_model_parallel_size > 1,
            bins_multiple=t.updates_per_step,
        )

    def _post_update_metrics(self, mbs: list[dict[str, Any]], step: int) -> dict[str, float]:
        """GIFT ``reference: rollout``: beta(x) and the implicit-reward spread of the updated policy against
        the rollout policy, on steps that get logged (one forward-only pass; see gift_megatron/trainer/implicit_metrics.py).
        At the step's first update u is 0, so the values the update itself reports are null."""
        from gift_megatron.trainer.implicit_metrics import post_update_implicit_metrics, wants_post_update_metrics

        cfg = self.cfg
        if not wants_post_update_metrics(self.objective):
            return {}
        if step % cfg.run.log_interval and step != cfg.train.steps:
            return {}
        return post_update_implicit_metrics(
            self.objective,
            self.model,
            mbs,
            temperature=self._logprob_temperature(),
            chunk_size=cfg.train.logprob_chunk_size,
            vocab_size=cfg.model.vocab_size,
        )

    # ------------------------------------------------------------------------------------------ eval
    def evaluate(self) -> float | None:
        """Mean reward of greedy responses to the first ``train.eval_prompts`` eval prompts (None without
        an eval set). Prompts are split over replicas; the result is global."""
        if not self.eval_set:
            return None
        total = min(self.cfg.train.eval_prompts, len(self.eval_set))
        share = [ex for i, ex in enumerate(self.eval_set[:total]) if i % self.dp == self.dp_rank]
        s = n = 0.0
        if self.owner and share:
            from gift_megatron.rollout import SamplingParams

            outs = self._engine().generate(
                [self.tokenizer.prompt_ids(ex) for ex in share],
                SamplingParams(n=1, temperature=0.0, max_tokens=self.cfg.rollout.max_tokens),
            )
            members = []
            for i, ro in enumerate(outs):
                ids = [t for t in ro.response_ids.tolist() if t != self.tokenizer.eos_id]
                members.append(
                    Member(i, [], ro.response_ids.tolist(), "rollout", response_text=self.tokenizer.decode(ids))
                )
            self._score(members, dict(enumerate(share)))
            s, n = sum(m.reward for m in members), len(members)
        s, n = self._global_sum([s, n])
        return s / max(n, 1)

    # ------------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        first_eval = self.evaluate()
        if first_eval is not None and not self.resumed:
            self.logger.log(self.step, {"eval/reward": first_eval})
        self.logger.write(f"start: step {self.step}/{cfg.train.steps}, eval reward {_fmt(first_eval)}")
        start_step, history = self.step, []
        degenerate = DegenerateGroupsWatch(cfg.run.warn_degenerate_steps)
        while self.step < cfg.train.steps:
            metrics: dict[str, float | None] = dict(self.train_one_step())
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0 and self.step < cfg.train.steps:
                metrics["eval/reward"] = self.evaluate()
            if self.step == cfg.train.steps:
                metrics["eval/reward"] = self.evaluate()
            record = {k: v for k, v in metrics.items() if v is not None}
            history.append(record)
            if self.step % cfg.run.log_interval == 0 or self.step == cfg.train.steps:
                self.logger.log(self.step, record)
            warning = degenerate.update(self.step, record)  # every step, not only logged ones
            if warning:
                self.logger.write(warning)
            if (cfg.run.save_interval and self.step % cfg.run.save_interval == 0) or self.step == cfg.train.steps:
                self.save()
        last_eval = self.evaluate() if not history else history[-1].get("eval/reward")
        plots = []
        if self.rank == 0 and cfg.run.plots:
            plots = plot_run(self.run_dir)
            self.logger.write("plots: " + ", ".join(plots))
        if self.rank == 0:
            self.logger.write(self._summary(start_step, first_eval, last_eval))
        self.logger.close()
        return {"first_eval": first_eval, "last_eval": last_eval, "history": history, "plots": plots}

    def _summary(self, start_step: int, first_eval: float | None, last_eval: float | None) -> str:
        """Where the run is and what it did: output dir, last checkpoint, steps, time, and the eval reward
        from the run's real start (step 0, read back from metrics.jsonl after a resume) to its end."""
        from gift_megatron.megatron import latest_checkpoint

        ckpt = latest_checkpoint(self.ckpt_dir)
        begin = first_eval_record(self.run_dir) or (start_step, first_eval)
        resumed = f", resumed at step {start_step}" if start_step else ""
        elapsed = datetime.timedelta(seconds=round(time.monotonic() - self.started))
        eval_line = (
            f"{_fmt(begin[1])} at step {begin[0]} -> {_fmt(last_eval)} at step {self.step}"
            if last_eval is not None
            else _fmt(None)
        )
        return "\n".join(
            [
                f"done: step {self.step}/{self.cfg.train.steps} ({self.step - start_step} steps this job{resumed}) "
                f"in {elapsed}",
                f"  output dir:      {os.path.abspath(self.run_dir)}",
                f"  last checkpoint: {os.path.abspath(ckpt) if ckpt else 'none'}",
                f"  eval reward:     {eval_line}",
            ]
        )

    def close(self) -> None:
        from gift_megatron.parallel import destroy_model_parallel_cpu

        lock = getattr(self, "run_lock", None)
        if lock is not None:
            lock.release()

        if use_cuda():
            parallel_state().destroy_model_parallel()
        else:
            destroy_model_parallel_cpu()
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train with ``cfg`` (under torchrun for several ranks); returns {first_eval, last_eval, history, plots}."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
