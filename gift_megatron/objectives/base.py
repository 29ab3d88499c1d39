"""The data every objective shares: the token batch, where the rest of the batch lives, global statistics.

Every objective runs in two phases so that a group may span micro-batches and ranks:

1. ``statistics(members(batch))``: per-member scalars (reward, group id, counted tokens, and for GIFT the
   implicit reward) of this rank's whole batch, reduced over the data-parallel / context-parallel ranks
   into :class:`BatchStats` that are identical on every rank. This needs no gradient, so it can run on the
   forward-only (reference / old-policy) pass before the training micro-batches.
2. ``loss(batch, stats)`` on each micro-batch: this micro-batch's share of the global loss. The global loss
   is the sum of the shares over all micro-batches and ranks, and so is its gradient, which is what
   Megatron-Core's gradient all-reduce computes.

Calling an objective (``objective(batch)``) does both on one batch: the single-process case, or one call
per rank when every rank holds its whole batch.
"""

from __future__ import annotations

import functools
import operator
import types
import typing
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from gift_megatron.comm import ProcessGroup, all_reduce_sum, group_size

if TYPE_CHECKING:
    from gift_megatron.objectives.groups import GroupStats


# The per-member inputs an objective may declare (TokenBatch fields besides logp and mask).
INPUTS = ("rewards", "group_ids", "ref_logp", "old_logp")


@dataclass(frozen=True)
class BatchLayout:
    """Where the rest of the global batch lives, seen from this process.

    dp_group: ranks holding the other members of the batch (each member on exactly one of them).
    cp_group: ranks holding other tokens of this rank's members (Megatron's zig-zag context parallel split);
        per-sequence sums are all-reduced over it, and sequence-level terms are counted once in total.
    None means "nobody else": the default describes a single process holding the whole batch.
    totals: the batch's global (n_members, n_tokens) fp32 scalars when this view holds whole groups but not
        every member of the batch (statistics computed in place, per micro-batch): counts that normalize
        the loss and its gradient then come from here instead of a reduction over the view.
    """

    dp_group: ProcessGroup | None = None
    cp_group: ProcessGroup | None = None
    totals: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def cp_size(self) -> int:
        return group_size(self.cp_group)

    def sum_over_tokens_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """SUM over every rank that holds part of the batch (dp x cp); no gradient."""
        x = all_reduce_sum(x.detach(), self.dp_group)
        return all_reduce_sum(x, self.cp_group)


SINGLE_PROCESS = BatchLayout()


@dataclass
class TokenBatch:
    """Per-token tensors of a (micro-)batch of B members, S positions each.

    logp:      [B, S] float, log-prob of each token under the policy being trained (carries gradient).
    mask:      [B, S] float or bool, 1 on response tokens that count, 0 on prompt and padding.
    rewards:   [B] float, one explicit reward per member (None for objectives that use none).
    group_ids: [B] int, the prompt group of each member (None for objectives that use none).
    ref_logp:  [B, S] float, reference policy log-probs (no gradient), when the objective needs them.
    old_logp:  [B, S] float, rollout policy log-probs (no gradient), when the objective needs them.
    Values at positions where mask is 0 are never read (they may be padding garbage, even NaN).
    """

    logp: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None

    @property
    def counted(self) -> torch.Tensor:
        """[B, S] bool: the tokens that count."""
        return self.mask > 0

    def masked(self, name: str) -> torch.Tensor:
        """Field ``name`` in fp32 with non-counted positions set to 0, so padding never leaks (0 * NaN)."""
        x = getattr(self, name)
        return torch.where(self.counted, x.float(), torch.zeros((), dtype=torch.float32, device=x.device))


@dataclass
class Members:
    """Per-member scalars of this rank's batch, enough to compute every global statistic.

    rewards, group_ids: [B] (or None). token_counts: [B] fp32, counted tokens held by this rank (this CP
    rank's share). extra: objective-specific [B] fp32 scalars, e.g. GIFT's implicit reward.
    """

    token_counts: torch.Tensor
    rewards: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(parts: list[Members]) -> Members:
        """Concatenate the members of several micro-batches (same fields in every part)."""
        if not parts:
            raise ValueError("Members.cat needs at least one part")

        def cat_opt(name):
            xs = [getattr(p, name) for p in parts]
            return None if xs[0] is None else torch.cat(xs)

        return Members(
            token_counts=torch.cat([p.token_counts for p in parts]),
            rewards=cat_opt("rewards"),
            group_ids=cat_opt("group_ids"),
            extra={k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra},
        )


@dataclass(frozen=True)
class BatchStats:
    """Global statistics of the whole step's batch; identical on every rank.

    n_members, n_tokens: fp32 scalars, global counts of members and counted tokens.
    rewards: per-group statistics of the explicit rewards (group objectives).
    extra: the objective's own statistics, of a type it defines (GIFT: :class:`~gift_megatron.objectives.gift.
        ImplicitStats`, the implicit reward's group statistics); None for the others.
    metrics: metrics that only need per-member scalars, already global.
    """

    n_members: torch.Tensor
    n_tokens: torch.Tensor
    rewards: GroupStats | None = None
    extra: Any = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def groups(self) -> GroupStats:
        """The rewards' group statistics, which every group objective's loss needs."""
        if self.rewards is None:
            raise ValueError("these statistics have no reward groups (computed by a non-group objective)")
        return self.rewards

    def group_positions(self, batch: TokenBatch) -> torch.Tensor:
        """Each member's group as a position in the statistics' groups, int64 [B]."""
        if batch.group_ids is None:
            raise ValueError("group_ids are required by this objective but were not given")
        return self.groups.index(batch.group_ids)

    def advantages(self, batch: TokenBatch, eps: float, pos: torch.Tensor | None = None) -> torch.Tensor:
        """A_i = Z_g(R)_i: each member's reward z-scored within its group over the global batch, fp32 [B].
        ``pos``: :meth:`group_positions` when the caller has it (its check costs a host sync)."""
        if batch.rewards is None or batch.group_ids is None:
            raise ValueError("rewards and group_ids are required by this objective but were not given")
        return self.groups.zscore(batch.rewards, batch.group_ids, eps, pos=pos)


@dataclass
class LossOutput:
    """One call's result.

    loss: fp32 scalar, this call's share of the global loss (the whole loss for a single process holding
        the whole batch). Backpropagate it; the sum over micro-batches and ranks is the global loss.
    shares: additive metric shares: summed over micro-batches and ranks they give the global metric.
    metrics: metrics that are already global (from BatchStats), identical on every rank.
    """

    loss: torch.Tensor
    shares: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]

    @staticmethod
    def accumulate(outputs: list[LossOutput]) -> LossOutput:
        """Sum of the losses and shares of several micro-batches of one step (metrics from the first)."""
        if not outputs:
            raise ValueError("LossOutput.accumulate needs at least one output")
        shares = {k: functools.reduce(operator.add, (o.shares[k] for o in outputs)) for k in outputs[0].shares}
        return LossOutput(functools.reduce(operator.add, (o.loss for o in outputs)), shares, dict(outputs[0].metrics))

    def finalize(self, layout: BatchLayout) -> dict[str, torch.Tensor]:
        """All global metrics of a call that saw its rank's whole batch (shares summed over ranks)."""
        out = dict(self.metrics)
        if self.shares:
            keys = sorted(self.shares)
            summed = layout.sum_over_tokens_ranks(torch.stack([self.shares[k].detach().float() for k in keys]))
            out.update({k: summed[i] for i, k in enumerate(keys)})
        return out


@dataclass(frozen=True)
class GroupDefaults:
    """The members an objective trains on per group unless ``groups.n_expert`` / ``groups.n_teacher`` say
    otherwise: expert demonstrations and teacher responses, besides the ``rollout.n`` rollouts."""

    n_expert: int = 0
    n_teacher: int = 0


class Objective:
    """Base class of the registered objectives; subclasses are frozen dataclasses of their options.

    A subclass declares what it needs as class attributes, so that the step and the trainer never guess:

    - ``name``: the config name (``objective.name``).
    - ``inputs``: the TokenBatch fields it reads besides logp and mask (``rewards``, ``group_ids``,
      ``ref_logp``, ``old_logp``); :meth:`option_inputs` adds the ones an option switches on.
    - ``policy_statistics``: its batch statistics depend on the policy's log-probs (it overrides
      :meth:`member_extras`), so the step computes them from a forward pass (docs/objectives.md, "Group
      statistics"); otherwise they come from the data alone.
    - ``group_relative``: it compares the members of a group, so a group needs two or more.
    - ``default_groups``: the expert / teacher members a group gets by default.
    - ``trains_on_rollouts``: it trains on the policy's own rollouts; False for the supervised baselines,
      whose rollouts are only scored for the reward metrics.

    and implements ``statistics`` and ``loss``. Its dataclass fields are its options
    (``objective.options``), checked by name and type in :func:`build_objective`.
    """

    name: ClassVar[str] = ""
    inputs: ClassVar[frozenset[str]] = frozenset()
    policy_statistics: ClassVar[bool] = False
    group_relative: ClassVar[bool] = False
    default_groups: ClassVar[GroupDefaults] = GroupDefaults()
    trains_on_rollouts: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The declaration and the code must agree, or the step would skip (or waste) the policy pass.
        overrides = cls.member_extras is not Objective.member_extras
        if overrides != cls.policy_statistics:
            raise TypeError(
                f"objective class {cls.__name__}: policy_statistics must be True exactly when it overrides "
                "member_extras (statistics from the policy's log-probs)"
            )
        unknown = cls.inputs - set(INPUTS)
        if unknown:
            raise TypeError(f"objective class {cls.__name__}: unknown inputs {sorted(unknown)}; known: {INPUTS}")

    def __post_init__(self) -> None:
        self.validate_options()

    @property
    def uses(self) -> frozenset[str]:
        """Every TokenBatch field this instance reads besides logp and mask: ``inputs`` plus
        :meth:`option_inputs`."""
        return self.inputs | self.option_inputs()

    def option_inputs(self) -> frozenset[str]:
        """Inputs that an option switches on (e.g. GRPO's ref_logp with kl_coef > 0); none by default."""
        return frozenset()

    def validate_options(self) -> None:
        """Raise ValueError naming the option for values outside its domain (types: build_objective)."""

    # ---- phase 1 ----
    @torch.no_grad()
    def members(self, batch: TokenBatch, layout: BatchLayout = SINGLE_PROCESS) -> Members:
        """Per-member scalars of ``batch`` (no gradient). Validates the batch."""
        check_batch(batch, self.uses, self.name)
        counts = batch.counted.float().sum(dim=1)
        global_counts = all_reduce_sum(counts, layout.cp_group)
        if bool((global_counts == 0).any()):
            bad = torch.nonzero(global_counts == 0).flatten()[:5].tolist()
            raise ValueError(f"mask: members {bad} have no counted tokens (every response needs at least one)")
        return Members(
            token_counts=counts,
            rewards=None if batch.rewards is None else batch.rewards.float(),
            group_ids=None if batch.group_ids is None else batch.group_ids.to(torch.int64),
            extra=self.member_extras(batch, layout),
        )

    def member_extras(self, batch: TokenBatch, layout: BatchLayout) -> dict[str, torch.Tensor]:
        """Objective-specific per-member scalars [B] fp32 computed from the policy's log-probs (GIFT's
        implicit reward); an objective that overrides this declares ``policy_statistics = True``."""
        return {}

    def statistics(self, members: Members, layout: BatchLayout = SINGLE_PROCESS) -> BatchStats:
        raise NotImplementedError

    # ---- phase 2 ----
    def loss(self, batch: TokenBatch, stats: BatchStats, layout: BatchLayout = SINGLE_PROCESS) -> LossOutput:
        raise NotImplementedError

    def __call__(
        self, batch: TokenBatch, layout: BatchLayout = SINGLE_PROCESS, stats: BatchStats | None = None
    ) -> LossOutput:
        """Both phases on one batch; ``stats`` given means they were computed on the whole step already."""
        if stats is None:
            stats = self.statistics(self.members(batch, layout), layout)
        else:
            check_batch(batch, self.uses, self.name)
        return self.loss(batch, stats, layout)


def count_totals(members: Members, layout: BatchLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (n_members, n_tokens) as fp32 scalars. Members are counted once although CP ranks share them."""
    if layout.totals is not None:
        return layout.totals
    local = torch.stack(
        [
            torch.tensor(float(members.token_counts.shape[0]), device=members.token_counts.device) / layout.cp_size,
            members.token_counts.sum(),
        ]
    )
    total = layout.sum_over_tokens_ranks(local)
    return total[0].round(), total[1]


def check_batch(batch: TokenBatch, uses: frozenset[str], objective: str) -> None:
    """Raise ValueError naming the offending field for any malformed input.

    Shapes and dtypes are checked on the host; the value checks (mask in {0, 1}, finite log-probs and
    rewards) are computed on the batch's device and read back in ONE host copy, since each separate
    ``bool(tensor)`` would stall a GPU stream once per check per micro-batch.
    """
    lp = batch.logp
    if not isinstance(lp, torch.Tensor) or lp.dim() != 2 or not lp.dtype.is_floating_point:
        raise ValueError(f"{objective}: logp must be a float tensor [B, S], got {_desc(lp)}")
    B, S = lp.shape
    if not isinstance(batch.mask, torch.Tensor) or tuple(batch.mask.shape) != (B, S):
        raise ValueError(f"{objective}: mask must have the shape of logp {[B, S]}, got {_desc(batch.mask)}")
    m = batch.mask
    counted = batch.counted
    checks: list[tuple[torch.Tensor, str]] = []
    if m.dtype != torch.bool:
        checks.append((((m == 0) | (m == 1)).all(), f"{objective}: mask must hold only 0 and 1"))
    for name in ("ref_logp", "old_logp"):
        x = getattr(batch, name)
        if name in uses and x is None:
            raise ValueError(f"{objective}: {name} is required by this objective but was not given")
        if x is not None:
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, S) or not x.dtype.is_floating_point:
                raise ValueError(f"{objective}: {name} must be a float tensor of shape {[B, S]}, got {_desc(x)}")
            checks.append(
                ((torch.isfinite(x) | ~counted).all(), f"{objective}: {name} has non-finite values on counted tokens")
            )
    checks.append(
        ((torch.isfinite(lp.detach()) | ~counted).all(), f"{objective}: logp has non-finite values on counted tokens")
    )
    r = batch.rewards
    if "rewards" in uses:
        if not isinstance(r, torch.Tensor) or r.dim() != 1 or r.shape[0] != B:
            raise ValueError(f"{objective}: rewards must be a tensor of shape [{B}], got {_desc(r)}")
        checks.append((torch.isfinite(r).all(), "rewards"))
    if "group_ids" in uses:
        if batch.group_ids is None:
            raise ValueError(f"{objective}: group_ids are required by this objective but were not given")
        check_group_ids(batch.group_ids, B)
    flags = torch.stack([ok.to(lp.device) for ok, _ in checks]).tolist()  # the one host sync
    for ok, (_, message) in zip(flags, checks):
        if ok:
            continue
        if message == "rewards" and r is not None:
            bad = torch.nonzero(~torch.isfinite(r)).flatten()[:5].tolist()
            raise ValueError(f"{objective}: rewards are not finite for members {bad}")
        raise ValueError(message)


def check_group_ids(group_ids: torch.Tensor, n: int, name: str = "group_ids") -> None:
    """ValueError naming ``name`` unless ``group_ids`` is an integer tensor of shape [n]."""
    if not isinstance(group_ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of integer ids, got {type(group_ids).__name__}")
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers (torch.int32/int64), got dtype {group_ids.dtype}")
    if group_ids.dim() != 1 or group_ids.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one id per member), got {list(group_ids.shape)}")


def require_positive(objective: str, option: str, value: float) -> None:
    """ValueError naming the option unless ``value`` > 0."""
    if not value > 0:
        raise ValueError(f"{objective}: {option} must be > 0, got {value}")


def _desc(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {list(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` selectable by its ``name`` in configs."""
    if not cls.name:
        raise ValueError(f"objective class {cls.__name__}: set its name (a ClassVar) before registering it")
    if cls.name in OBJECTIVES:
        raise ValueError(f"objective name {cls.name!r} is registered twice")
    OBJECTIVES[cls.name] = cls
    return cls


def build_objective(name: str, **options) -> Objective:
    """The registered objective ``name`` with ``options`` (its dataclass fields).

    Raises ValueError naming the unknown objective (listing the known ones), an unknown option, or an option
    whose value does not have its field's type (an int is accepted for a float; a string never is, so a
    quoted ``"3e-4"`` fails here rather than inside the loss).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"objective: unknown name {name!r}; known objectives: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(typing.cast(Any, cls))}  # every registered objective is a dataclass
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"objective {name}: unknown option {key!r}; options: {', '.join(sorted(known))}")
        if not _has_type(value, hints[key]):
            raise ValueError(
                f"objective {name}: option {key} must be {_type_text(hints[key])}, got {type(value).__name__} {value!r}"
            )
    return cls(**options)


def _has_type(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the option annotation ``tp`` (scalars, ``X | None``, Any).

    By hand: options are plain scalars, so this is all the checking they need, and it keeps the
    objectives layer free of a validation library (OmegaConf types the config, whose ``objective.options``
    is a free mapping because each objective has its own fields)."""
    if tp is Any:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_has_type(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _type_text(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_text(t) for t in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))
