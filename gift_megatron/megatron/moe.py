"""Mixture-of-Experts pieces of the training step: router-loss scale, router metrics, micro-batch counts.

Router losses. Megatron-Core adds the router's load-balancing (aux) and z losses to the gradient inside the
backward pass (``MoEAuxLossAutoScaler``), scaled so that, with ``calculate_per_token_loss``, they come out
right when every ``loss_func`` returns count = its tokens: the router pre-multiplies each loss by its local
token count, and ``finalize_model_grads`` divides every gradient by the step's global count. Our
``loss_func`` returns count = members (``gift_megatron/megatron/step.py``), so the global count is
D = members x cp instead of T = the step's router tokens, and the router losses would be T / D (the row
length) times too strong. megatron-core 0.19 multiplies the router-loss gradient by
``config.moe_grad_scale_func()``; :class:`RouterLossScale` sets it to D / T (times the fp16 loss scale, which
that hook replaces), which restores exactly Megatron's intended scale. megatron-core 0.16 has no such hook:
there, non-zero ``model.moe_aux_loss_coeff`` / ``model.moe_z_loss_coeff`` are refused
(:func:`check_router_loss_support`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "MoEStepMonitor",
    "check_equal_micro_batch_counts",
    "check_router_loss_support",
    "clear_tracker",
    "fix_router_without_transformer_engine",
    "has_moe_grad_scale_func",
    "load_balance",
    "router_loss_scale",
]


def has_moe_grad_scale_func() -> bool:
    """Whether the installed megatron-core lets the router-loss gradient scale be set (0.17+; not 0.16)."""
    from megatron.core.transformer import TransformerConfig

    return "moe_grad_scale_func" in {f.name for f in dataclasses.fields(TransformerConfig)}


def check_router_loss_support(model: Any) -> None:
    """Raise ValueError naming the keys when ``model`` (a ModelConfig, or anything with
    ``moe_aux_loss_coeff`` / ``moe_z_loss_coeff``) asks for router losses this megatron-core cannot scale."""
    keys = [
        f"model.{k}={getattr(model, k)}"
        for k in ("moe_aux_loss_coeff", "moe_z_loss_coeff")
        if getattr(model, k, 0) or 0
    ]
    if keys and not has_moe_grad_scale_func():
        import megatron.core

        raise ValueError(
            f"{', '.join(keys)}: router losses need megatron-core >= 0.17 (its moe_grad_scale_func "
            f"sets their gradient scale under our per-member loss normalization); the installed "
            f"megatron-core {getattr(megatron.core, '__version__', '?')} would scale them by the "
            "row length. Set these coefficients to 0 or upgrade megatron-core"
        )


def fix_router_without_transformer_engine() -> None:
    """megatron-core 0.16 without Transformer Engine: define ``moe_utils.te_general_gemm = None``.

    Why: 0.16's router gating (``RouterGatingLinearFunction``, used by every TopKRouter) tests
    ``te_general_gemm is not None``, but imports that name only when TE imports, so without TE (a CPU
    machine, or a GPU host without the optional TE install) every MoE forward raised NameError. With the name
    set to None it takes its own torch matmul path, as 0.19 does. A no-op where the name exists."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# ----------------------------------------------------------------------------------- pure functions
def router_loss_scale(n_members_times_cp: float, router_tokens: float) -> float:
    """D / T: the factor ``config.moe_grad_scale_func`` must return (before the fp16 loss scale) so that the
    router losses get Megatron's intended gradient scale when ``loss_func`` returns count = members.

    ``n_members_times_cp``: D, the global sum of the counts our ``loss_func`` returns in the step (members x
    context-parallel size). ``router_tokens``: T, the tokens every router of one layer sees in the step,
    summed over micro-batches and data-parallel ranks (each token once: sequence- and context-parallel shards
    of a sequence add up to it). Megatron's intended scale is what count = T would give.
    """
    if router_tokens <= 0:
        raise ValueError(f"router_tokens must be > 0, got {router_tokens}")
    return float(n_members_times_cp) / float(router_tokens)


def load_balance(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Per layer: the busiest expert's load over the mean load, max_e n_e / mean_e n_e.

    ``tokens_per_expert``: [layers, experts] float, the (token, expert) assignments of each layer (a token
    routed to k experts counts k times). 1.0 is a perfectly balanced layer; the worst is experts / top-k (every
    token on the same k experts). Returns [layers] float on the input's device; rows without tokens give 0.
    """
    mean = tokens_per_expert.mean(dim=-1)
    peak = tokens_per_expert.amax(dim=-1)
    return torch.where(mean > 0, peak / mean.clamp(min=1e-30), torch.zeros_like(mean))


def check_equal_micro_batch_counts(counts: list[int], ep: int) -> None:
    """Raise RuntimeError when data-parallel ranks (in rank order, ``counts``) would run different numbers of
    micro-batches with expert parallelism ``ep`` > 1: every MoE layer all-to-alls over the expert group once
    per micro-batch, so a rank with fewer micro-batches leaves its peers waiting forever."""
    if ep > 1 and len(set(counts)) > 1:
        listing = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
        raise RuntimeError(
            f"expert parallelism (parallel.expert_model_parallel_size={ep}) needs the same number of "
            f"micro-batches on every data-parallel rank; this step has {listing} (data-parallel "
            "ranks). Give every rank the same number of members (train.micro_batch_size divides "
            "each rank's share)"
        )


# ---------------------------------------------------------------------------------------- the step
_NAMES = {"load_balancing_loss": "aux_loss", "z_loss": "z_loss"}


class MoEStepMonitor:
    """The Mixture-of-Experts side of one :class:`~gift_megatron.megatron.step.ObjectiveStep` step.

    - :meth:`check_micro_batches` (before any forward pass, reference and old-policy passes included): equal
      micro-batch counts on the data-parallel ranks under expert parallelism, and the step's router tokens T.
    - :meth:`start` (before the forward/backward): router-loss scale D / T through
      ``config.moe_grad_scale_func`` (0.17+), Megatron's MoE tracker and our load counts cleared.
    - :meth:`finish` (after the optimizer step): step metrics, identical on every rank, then clears again:
      ``moe/aux_loss`` and ``moe/z_loss`` (Megatron's tracked router losses, without their coefficient,
      averaged over micro-batches and MoE layers; present when their coefficient is non-zero),
      ``moe/load_balance_layer{i}`` for every MoE layer i (0-based global index, as Hugging Face's
      ``model.layers.{i}``): :func:`load_balance` of the step's training tokens, and ``moe/load_balance_max`` /
      ``moe/load_balance_mean`` over the MoE layers.

    Load counts come from a forward hook on every router of ``model`` that counts only training forwards
    (module in training mode, autograd on): the reference / old-policy / statistics passes run without
    gradients and are not counted. Activation recomputation of MoE layers would count a micro-batch twice
    (the model builder does not enable it).
    """

    def __init__(self, model_chunks: list, config: Any) -> None:
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron.core.utils import unwrap_model

        self.config = config
        self.num_layers = config.num_layers
        self.num_experts = config.num_moe_experts
        self.routers = [m for chunk in model_chunks for m in unwrap_model(chunk).modules() if isinstance(m, TopKRouter)]
        self.device = next(unwrap_model(model_chunks[0]).parameters()).device
        # [layers, experts] assignments of this rank's training tokens (float64: exact counts, any step size).
        self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64, device=self.device)
        self.router_tokens = 0.0
        self.num_micro_batches = 0
        self._ratio = 1.0
        for router in self.routers:
            router.register_forward_hook(self._count)
        if has_moe_grad_scale_func():
            config.moe_grad_scale_func = self._router_loss_scale
        else:
            check_router_loss_support(SimpleCoefficients(config))

    @classmethod
    def for_model(cls, model_chunks: list) -> MoEStepMonitor | None:
        """The monitor of ``model_chunks`` (DDP-wrapped or not), None for a dense model."""
        config = model_chunks[0].config
        if not getattr(config, "num_moe_experts", None):
            return None
        return cls(model_chunks, config)

    # ------------------------------------------------------------------------------ hooks and hooks' math
    def _count(self, module: Any, inputs: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        routing_map = output[1]  # (probs, routing_map [tokens, experts] bool), 0.16 and 0.19
        self.counts[module.layer_number - 1] += routing_map.sum(dim=0).to(self.counts.dtype)

    def _router_loss_scale(self) -> Any:
        """``config.moe_grad_scale_func``: D / T times the loss scale that ``grad_scale_func`` (fp16) applies
        to the main loss, which Megatron uses for the router losses when this hook is unset."""
        scale_func = self.config.grad_scale_func
        if scale_func is None:
            return torch.full((1,), self._ratio, dtype=torch.float32, device=self.device)
        return scale_func(torch.ones(1, dtype=torch.float32, device=self.device)) * self._ratio

    # ---------------------------------------------------------------------------------------- the step
    def check_micro_batches(self, micro_batches: Sequence[dict[str, Any]]) -> None:
        """Clear error before compute if data-parallel ranks hold different numbers of micro-batches under
        expert parallelism; records the step's global router-token count T. One small all-gather over the
        data-parallel group (for EP > 1 or non-zero router-loss coefficients; nothing otherwise)."""
        from megatron.core import parallel_state as ps

        from gift_megatron import comm

        self.num_micro_batches = len(micro_batches)
        local_tokens = float(sum(mb["tokens"].numel() for mb in micro_batches))
        ep = ps.get_expert_model_parallel_world_size()
        if ep == 1 and not self._router_losses_on():
            self.router_tokens = local_tokens  # unused: the scale matters only for router losses
            return
        row = torch.tensor([[float(len(micro_batches)), local_tokens]], dtype=torch.float64, device=self.device)
        table = comm.all_gather_rows(row, ps.get_data_parallel_group()).tolist()
        check_equal_micro_batch_counts([int(n) for n, _ in table], ep)
        self.router_tokens = sum(t for _, t in table)

    def start(self, members_times_cp: float) -> None:
        """Before the step's forward/backward, after :meth:`check_micro_batches` on the same micro-batches:
        ``members_times_cp`` is D (``LossContext.scale``)."""
        self._ratio = router_loss_scale(members_times_cp, self.router_tokens) if self._router_losses_on() else 1.0
        self.counts.zero_()
        clear_tracker()

    def finish(self) -> dict[str, float]:
        """Step metrics (see the class docstring), identical on every rank; clears the tracker and counts.
        One all-reduce over every rank (each layer's values live on its pipeline stage only)."""
        from gift_megatron import comm

        names, table, divisors = self._tracked()
        packed = torch.cat([table, self.counts], dim=1)
        total = comm.all_reduce_tensor(packed, "sum", comm.WORLD).cpu()
        clear_tracker()
        self.counts.zero_()
        moe_layers = [i for i in range(self.num_layers) if total[i, len(names) :].sum() > 0]
        out: dict[str, float] = {}
        for j, name in enumerate(names):
            per_layer = total[:, j] / divisors[j]
            out["moe/" + _NAMES.get(name, name)] = float(per_layer[moe_layers].mean()) if moe_layers else 0.0
        balance = load_balance(total[:, len(names) :])
        for i in moe_layers:
            out[f"moe/load_balance_layer{i}"] = float(balance[i])
        if moe_layers:
            out["moe/load_balance_max"] = float(balance[moe_layers].max())
            out["moe/load_balance_mean"] = float(balance[moe_layers].mean())
        return out

    def _router_losses_on(self) -> bool:
        return bool(self.config.moe_aux_loss_coeff) or bool(self.config.moe_z_loss_coeff)

    def _tracked(self):
        """(names, [layers, names] float64 of this rank's tracked values / micro-batches, per-name divisor).

        Megatron records, per layer and micro-batch, each router loss over the ranks that share its tokens:
        the aux loss is a partial sum to be summed over its ``reduce_group`` (TP x CP) and averaged over the
        data-parallel ranks, the z-loss is averaged over TP x DP x CP. A sum over all ranks (each layer lives
        on one pipeline stage) divided by stage_size / |reduce_group| gives exactly that, for both."""
        from megatron.core import parallel_state as ps

        from gift_megatron import comm

        names = [n for n in _TRACKED_NAMES if self._coefficient(n)]
        table = torch.zeros(self.num_layers, len(names), dtype=torch.float64, device=self.device)
        divisors = []
        stage = comm.group_size(comm.WORLD) // ps.get_pipeline_model_parallel_world_size()
        entries = tracker_entries()
        for j, name in enumerate(names):
            values, reduce_group = entries.get(name, (None, None))
            if values is not None:
                table[:, j] = values.to(table.device, torch.float64)[: self.num_layers] / max(self.num_micro_batches, 1)
            divisors.append(stage / comm.group_size(reduce_group))
        return names, table, divisors

    def _coefficient(self, tracked_name: str) -> float:
        return {
            "load_balancing_loss": self.config.moe_aux_loss_coeff or 0.0,
            "z_loss": self.config.moe_z_loss_coeff or 0.0,
        }[tracked_name]


_TRACKED_NAMES = ("load_balancing_loss", "z_loss")


class SimpleCoefficients:
    """The two router-loss coefficients of a TransformerConfig under ModelConfig's key names."""

    def __init__(self, config: Any) -> None:
        self.moe_aux_loss_coeff = config.moe_aux_loss_coeff or 0.0
        self.moe_z_loss_coeff = config.moe_z_loss_coeff or 0.0


# ------------------------------------------------------------------------- Megatron's MoE tracker
def tracker_entries() -> dict[str, tuple[Any, Any]]:
    """name -> (per-layer values [num_layers] accumulated over micro-batches, reduce group) of Megatron's
    MoE metrics tracker (0.19: ``MoEMetricsTracker``; 0.16: the layer-wise logging dict)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:  # megatron-core 0.16
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        return {name: (e["values"], e.get("reduce_group")) for name, e in get_moe_layer_wise_logging_tracker().items()}
    return {name: (e.values, e.reduce_group) for name, e in get_moe_metrics_tracker().metrics.items()}


def clear_tracker() -> None:
    """Zero Megatron's MoE metrics tracker (what Megatron's training loop does after reporting a step)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:  # megatron-core 0.16
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
        return
    get_moe_metrics_tracker().clear()
