"""One training step of any registered objective inside Megatron-Core's own schedules.

:class:`ObjectiveStep` strings the pieces together: log-prob passes (:mod:`~gift_megatron.megatron.forward`),
exact group statistics, forward/backward, optimizer step, metrics. Its input is a list of micro-batches
(:mod:`~gift_megatron.megatron.batching` builds and checks them); each piece is usable on its own from an
existing Megatron training script.

Normalization. Megatron-Core with ``calculate_per_token_loss=True`` sums gradients over data-parallel and
context-parallel ranks (no 1/dp) and divides them by the sum of the ``count`` every micro-batch returned.
Our objectives already produce each micro-batch's share of the globally normalized loss (token-level
objectives divide by every counted token of the step, GIFT by every member), so the loss function returns
``share * D`` with ``count`` = the micro-batch's members, D being their global sum (members x cp): Megatron's
division then gives back exactly the share, whatever the micro-batch size and the DP/CP layout.

Group statistics (docs/objectives.md, "Group statistics"), chosen per step and reported as ``stats_source``:
- ``data``: the objective's statistics need only rewards and counts (GFT, GRPO, DAPO, GSPO, SFT, DFT), so
  they are computed from the batch before any forward pass;
- ``in_place``: GIFT, and every micro-batch of every DP rank holds whole groups: each micro-batch computes
  its groups' implicit-reward statistics from its own forward pass (no extra pass);
- ``policy_pass``: GIFT with groups split across micro-batches or DP ranks: a no-grad pass at the current
  parameters gives every member's implicit reward first, reduced over DP x CP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gift_megatron.comm import all_gather_rows, broadcast_objects, group_rank
from gift_megatron.device import move_to, to_host_floats
from gift_megatron.megatron.batching import validate_micro_batches
from gift_megatron.megatron.forward import (
    DONE_PASSES,
    LossContext,
    batch_layout,
    cp_local_positions,
    forward_logprobs,
    has_logprobs,
    make_forward_step,
    member_rows,
    model_device,
    split_for_context_parallel,
    token_batch,
)
from gift_megatron.megatron.moe import MoEStepMonitor
from gift_megatron.megatron.mpu import parallel_state
from gift_megatron.objectives import BatchLayout, LossOutput, Members, Objective
from gift_megatron.objectives.base import count_totals


# ------------------------------------------------------------------------------------- statistics
def data_members(objective: Objective, micro_batches: Sequence[dict[str, Any]]) -> Members:
    """Members of this rank's micro-batches from the data alone (rewards, group ids, counted tokens)."""
    parts = []
    for mb in micro_batches:
        mb = split_for_context_parallel(mb)
        parts.append(
            Members(
                token_counts=(member_rows(mb, mb["loss_mask"]) > 0).float().sum(dim=1),
                rewards=None if mb.get("rewards") is None else mb["rewards"].float(),
                group_ids=None if mb.get("group_ids") is None else mb["group_ids"].to(torch.int64),
            )
        )
    return Members.cat(parts)


def groups_whole_per_micro_batch(micro_batches: Sequence[dict[str, Any]], layout: BatchLayout) -> bool:
    """True when every group of the step lies in a single micro-batch of a single DP rank (all ranks agree)."""
    dp_rank = group_rank(layout.dp_group)
    rows = [
        torch.stack(
            [
                mb["group_ids"].to(torch.float64),
                torch.full_like(mb["group_ids"], dp_rank, dtype=torch.float64),
                torch.full_like(mb["group_ids"], i, dtype=torch.float64),
            ],
            dim=1,
        )
        for i, mb in enumerate(micro_batches)
    ]
    table = all_gather_rows(torch.cat(rows), layout.dp_group)
    places = torch.unique(table, dim=0)  # unique (group, rank, micro-batch) triples
    return places.shape[0] == torch.unique(table[:, 0]).numel()


@dataclass
class StepResult:
    """loss: the global loss of the step; metrics: global metrics (fp32 scalars as floats); identical on
    every rank of every pipeline stage. stats_source: data | in_place | policy_pass."""

    loss: float
    metrics: dict[str, float]
    stats_source: str
    grad_norm: float | None = None


class ObjectiveStep:
    """One optimizer step of ``objective`` on Megatron-Core.

    Args:
        objective: a registered objective (``gift_megatron.objectives.build_objective``).
        model: the policy, a list of model chunks wrapped in Megatron's DistributedDataParallel.
        optimizer: Megatron's optimizer for ``model``.
        reference: a forward-only model holding the frozen reference policy (GIFT ``reference: frozen``,
            GRPO with kl_coef > 0), or None when micro-batches already carry ``ref_logp``.
        temperature: the rollout sampling temperature (log-probs are of logits / temperature).
        logprob_chunk_size: bound on fp32 temporaries of the log-prob computation (tokens per block).
        vocab_size: the tokenizer's (unpadded) vocabulary: Megatron's padded rows are left out of every
            softmax, so the trainer's distribution is the rollout engine's. None: the padded vocabulary.
    """

    def __init__(
        self,
        objective: Objective,
        model: list,
        optimizer,
        *,
        reference=None,
        temperature: float = 1.0,
        logprob_chunk_size: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.objective = objective
        self.model = model if isinstance(model, list) else [model]
        self.optimizer = optimizer
        self.reference = reference
        self.temperature = temperature
        self.chunk_size = logprob_chunk_size
        self.vocab_size = vocab_size
        config = self.model[0].config
        if not getattr(config, "calculate_per_token_loss", False):
            raise ValueError(
                "model config: calculate_per_token_loss must be True for ObjectiveStep "
                "(the objectives normalize globally; see gift_megatron/megatron/step.py)"
            )
        if config.finalize_model_grads_func is None:
            from megatron.core.distributed import finalize_model_grads

            config.finalize_model_grads_func = finalize_model_grads
        if config.no_sync_func is None and hasattr(self.model[0], "no_sync"):
            config.no_sync_func = self.model[0].no_sync
        if getattr(config, "grad_scale_func", None) is None and hasattr(optimizer, "scale_loss"):
            config.grad_scale_func = optimizer.scale_loss
        self.moe = MoEStepMonitor.for_model(self.model)  # None for a dense model (gift_megatron/megatron/moe.py)

    @property
    def device(self) -> torch.device:
        """The device of the policy's parameters: where every micro-batch tensor goes."""
        return model_device(self.model)

    def prepare(self, micro_batches: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The step's micro-batches ready to train on, each tensor moved to the model's device once.

        Validates them (clear errors before any compute), then adds the ``ref_logp`` / ``old_logp`` the
        objective needs and the micro-batches lack (forward-only passes of the reference model / the
        current policy). Preparing a rollout batch once and training several updates on slices of it runs
        each pass once; calling the step on prepared micro-batches moves and recomputes nothing.
        """
        ps = parallel_state()
        # Validated before the move, on host tensors when the caller built them there (the trainer does):
        # the label range is then checked without a device sync, and the forward passes skip it.
        validate_micro_batches(
            self.objective,
            micro_batches,
            ps.get_context_parallel_world_size(),
            vocab_size=self._label_bound(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
        )
        if self.moe is not None:  # expert parallelism: equal micro-batch counts, checked before any forward pass
            self.moe.check_micro_batches(micro_batches)
        micro_batches = [move_to(mb, self.device) for mb in micro_batches]
        self.fill_reference_logprobs(micro_batches)
        return micro_batches

    def _label_bound(self) -> int:
        """Labels must be real rows of the output layer: the padded vocabulary of the model (TP x shard)."""
        from megatron.core.utils import unwrap_model

        padded = getattr(unwrap_model(self.model[0]), "vocab_size", None)
        return padded if padded is not None else (self.vocab_size or 2**62)

    def fill_reference_logprobs(self, micro_batches: list[dict[str, Any]]) -> None:
        """Add ref_logp / old_logp the objective needs and the micro-batches lack (forward-only passes)."""
        uses = self.objective.uses
        if "ref_logp" in uses and not has_logprobs(micro_batches[0], "ref_logp"):
            if self.reference is None:
                raise ValueError(
                    f"objective {self.objective.name} needs ref_logp: give micro-batches a "
                    "'ref_logp' or ObjectiveStep a reference model"
                )
            if hasattr(self.reference, "onload"):
                self.reference.onload()
            self._attach(micro_batches, "ref_logp", self._logprobs(self.reference, micro_batches))
            if hasattr(self.reference, "offload"):
                self.reference.offload()
        if "old_logp" in uses and not has_logprobs(micro_batches[0], "old_logp"):
            # The policy before this step is the rollout policy when each rollout feeds one step.
            self._attach(micro_batches, "old_logp", self._logprobs(self.model, micro_batches))

    def _logprobs(self, model: Any, micro_batches: list[dict[str, Any]]) -> list[torch.Tensor] | None:
        """A forward-only pass of ``model`` (the policy or the reference) with this step's log-prob settings;
        labels were checked when the micro-batches were prepared."""
        return forward_logprobs(
            model,
            micro_batches,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            vocab_size=self.vocab_size,
            check_labels=False,
        )

    @staticmethod
    def _attach(micro_batches: list[dict[str, Any]], key: str, logps: list[torch.Tensor] | None) -> None:
        """Store CP-local log-probs back at full-sequence positions (the step splits every tensor again)."""
        ps = parallel_state()
        for mb in micro_batches:
            mb[DONE_PASSES] = set(mb.get(DONE_PASSES, ())) | {key}
        if logps is None:  # not the last pipeline stage: nothing reads it there
            return
        cp, rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        for mb, lp in zip(micro_batches, logps):
            if cp == 1:
                mb[key] = lp
                continue
            full = torch.zeros(mb["labels"].shape, dtype=lp.dtype, device=lp.device)
            full[:, cp_local_positions(mb, cp, rank, lp.device)] = lp
            mb[key] = full

    def statistics(self, micro_batches: list[dict[str, Any]], layout: BatchLayout) -> tuple[LossContext, str]:
        """(LossContext for the step, stats_source)."""
        obj = self.objective
        members = data_members(obj, micro_batches)
        n_members, n_tokens = count_totals(members, layout)
        scale = float(n_members) * layout.cp_size
        if not obj.policy_statistics:
            return LossContext(obj, layout, obj.statistics(members, layout), scale), "data"
        if groups_whole_per_micro_batch(micro_batches, layout):
            return LossContext(obj, layout, None, scale, totals=(n_members, n_tokens)), "in_place"
        logps = self._logprobs(self.model, micro_batches)
        stats = None
        if logps is not None:
            parts = [
                obj.members(token_batch(split_for_context_parallel(mb), lp), layout)
                for mb, lp in zip(micro_batches, logps)
            ]
            stats = obj.statistics(Members.cat(parts), layout)
        return LossContext(obj, layout, stats, scale), "policy_pass"

    def __call__(self, micro_batches: list[dict[str, Any]], *, prepared: bool = False) -> StepResult:
        """One optimizer step on this rank's ``micro_batches`` (host or device tensors). ``prepared=True``:
        they come from :meth:`prepare` (or slices of its result), so validation, the move and the
        reference / old-policy passes are not repeated."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not prepared:
            micro_batches = self.prepare(micro_batches)
        elif self.moe is not None:
            self.moe.check_micro_batches(micro_batches)
        layout = batch_layout()
        ctx, source = self.statistics(micro_batches, layout)
        if self.moe is not None:
            self.moe.start(ctx.scale)  # router-loss scale D / T, tracker cleared

        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        store = get_forward_backward_func()(
            forward_step_func=make_forward_step(
                ctx,
                temperature=self.temperature,
                chunk_size=self.chunk_size,
                vocab_size=self.vocab_size,
                check_labels=False,
            ),
            data_iterator=iter(micro_batches),
            model=self.model,
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0]["tokens"].shape[1],
            micro_batch_size=micro_batches[0]["tokens"].shape[0],
            forward_only=False,
        )
        ok, grad_norm, _ = self.optimizer.step()  # Megatron returns grad_norm as a host float
        if not ok:
            raise RuntimeError("Megatron optimizer skipped the update (non-finite gradients)")
        metrics = self._metrics(store, ctx, layout)
        metrics["stats_source/" + source] = 1.0
        if self.moe is not None:
            metrics.update(self.moe.finish())  # moe/aux_loss, moe/z_loss, moe/load_balance_*
        return StepResult(
            loss=metrics["loss"],
            metrics=metrics,
            stats_source=source,
            grad_norm=None if grad_norm is None else float(grad_norm),
        )

    def _metrics(self, store, ctx: LossContext, layout: BatchLayout) -> dict[str, float]:
        """Global metrics on the last stage, broadcast to every pipeline stage."""
        ps = parallel_state()
        payload: list[Any] = [None]
        if ps.is_pipeline_last_stage():
            total = LossOutput.accumulate([r["output"] for r in store])
            metrics = dict(ctx.stats.metrics) if ctx.stats is not None else {}
            if ctx.stats is None:  # in place: the global statistics' metrics from the members seen
                metrics = dict(self.objective.statistics(Members.cat(ctx.members), layout).metrics)
            total.metrics = metrics
            payload = [to_host_floats(total.finalize(layout))]  # one device-to-host copy for all metrics
        if ps.get_pipeline_model_parallel_world_size() > 1:
            broadcast_objects(
                payload, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
            )
        return payload[0]
