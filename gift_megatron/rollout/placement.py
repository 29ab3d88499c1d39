"""Which GPUs a data-parallel replica's rollout engine runs on: pure functions, no CUDA, no torch.distributed.

The trainer runs one rank per GPU (torchrun: ``LOCAL_RANK`` i drives visible GPU i). A data-parallel replica is
the TP x PP x CP ranks that hold one copy of the model; its first rank owns the replica's vLLM engine. The
engine must run on GPUs of *its own* replica: any other GPU already carries another replica's trainer and
engine, and vLLM placed with ``CUDA_VISIBLE_DEVICES`` left as inherited takes GPUs 0..TP-1 of the node for every
engine (with two engines of rollout TP 2 on one node, the second one found GPUs 0-1 full and died).

So: the replica's GPUs on the owner's node are the local ranks of the replica's ranks that live on that node,
translated to physical ids through the inherited ``CUDA_VISIBLE_DEVICES`` (which may be a subset of the
machine's GPUs, and whose entries may be indices, ``GPU-<uuid>`` or ``MIG-<uuid>`` strings: they are passed on
verbatim, never parsed as integers). The engine takes the first ``rollout TP`` of them, the owner's own GPU
first. A rollout TP larger than that list is an error before anything is built.

Rank layout: torchrun numbers ranks node by node (global rank = node x local world size + local rank), and
Megatron-Core's default order ``tp-cp-ep-dp-pp`` puts the TP x CP ranks of a replica next to each other, the
data-parallel replicas next, and pipeline stages outermost. :func:`megatron_replica_ranks` reproduces that
order for config validation, where no process group exists; the trainer passes the ranks of its actual
replica group instead.
"""

from __future__ import annotations

from collections.abc import Sequence


class PlacementError(ValueError):
    """The rollout engine does not fit its replica's GPUs (the message names the config keys)."""


def visible_devices(value: str | None) -> list[str] | None:
    """The entries of a ``CUDA_VISIBLE_DEVICES`` value, stripped, in order; None when the variable is unset
    (every GPU is visible under its index). An empty value hides every GPU: that is an empty list."""
    if value is None:
        return None
    entries = [e.strip() for e in value.split(",")]
    if entries == [""]:
        return []
    if any(not e for e in entries):
        raise PlacementError(f"CUDA_VISIBLE_DEVICES={value!r} has an empty entry")
    if len(set(entries)) != len(entries):
        raise PlacementError(f"CUDA_VISIBLE_DEVICES={value!r} names a GPU twice")
    return entries


def megatron_replica_ranks(rank: int, world_size: int, tp: int, pp: int = 1, cp: int = 1) -> list[int]:
    """Global ranks of the data-parallel replica holding ``rank``, in Megatron-Core's default rank order
    (``tp-cp-ep-dp-pp``: rank = tp + TP (cp + CP (dp + DP pp))), the owner (TP, CP and PP rank 0) first."""
    mp = tp * cp
    if tp < 1 or pp < 1 or cp < 1 or world_size % (mp * pp):
        raise PlacementError(f"world size {world_size} is not a multiple of TP {tp} x PP {pp} x CP {cp}")
    if not 0 <= rank < world_size:
        raise PlacementError(f"rank {rank} is outside a world of {world_size}")
    dp = world_size // (mp * pp)
    dp_rank = (rank // mp) % dp
    return [stage * mp * dp + dp_rank * mp + i for stage in range(pp) for i in range(mp)]


def replica_local_ranks(replica_ranks: Sequence[int], rank: int, local_rank: int, local_world_size: int) -> list[int]:
    """Local ranks (GPU ordinals) on ``rank``'s node of the ranks in ``replica_ranks``, ``rank``'s own first,
    then in increasing order. Ranks are numbered node by node (torchrun): the node holds global ranks
    ``rank - local_rank`` .. ``rank - local_rank + local_world_size - 1``."""
    if not 0 <= local_rank < local_world_size:
        raise PlacementError(f"LOCAL_RANK {local_rank} is outside LOCAL_WORLD_SIZE {local_world_size}")
    if rank not in replica_ranks:
        raise PlacementError(f"rank {rank} is not in its replica's ranks {list(replica_ranks)}")
    base = rank - local_rank
    local = sorted(r - base for r in set(replica_ranks) if base <= r < base + local_world_size)
    local.remove(local_rank)
    return [local_rank] + local


def engine_devices(
    replica_local: Sequence[int], rollout_tp: int, visible: Sequence[str] | None, *, replica_size: int | None = None
) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` entries for an engine of rollout TP ``rollout_tp`` on the replica GPUs
    ``replica_local`` (local ordinals, owner first; :func:`replica_local_ranks`), given the trainer's own
    visible list (``visible_devices``; None: all GPUs, entry = ordinal). Raises :class:`PlacementError` when
    the rollout TP does not fit the replica's GPUs on this node."""
    if rollout_tp < 1:
        raise PlacementError(f"rollout.tensor_parallel_size must be >= 1, got {rollout_tp}")
    if rollout_tp > len(replica_local):
        where = f" (of its {replica_size} ranks)" if replica_size and replica_size != len(replica_local) else ""
        raise PlacementError(
            f"rollout.tensor_parallel_size={rollout_tp} does not fit the data-parallel replica's GPUs: the replica "
            f"has {len(replica_local)} GPU(s) on its engine owner's node{where}, local GPUs {list(replica_local)}. "
            "An engine may only use its own replica's GPUs (the others carry another replica's trainer and "
            f"engine): set rollout.tensor_parallel_size <= {len(replica_local)}, or raise "
            "parallel.tensor_model_parallel_size x pipeline_model_parallel_size x context_parallel_size"
        )
    chosen = list(replica_local[:rollout_tp])
    if visible is None:
        return [str(i) for i in chosen]
    if max(chosen) >= len(visible):
        raise PlacementError(
            f"CUDA_VISIBLE_DEVICES lists {len(visible)} GPU(s) ({','.join(visible)}), but local "
            f"rank {max(chosen)} needs GPU ordinal {max(chosen)}: every rank of a node must see "
            "all of the node's training GPUs (one per local rank)"
        )
    return [visible[i] for i in chosen]


def replica_engine_devices(
    replica_ranks: Sequence[int],
    rank: int,
    local_rank: int,
    local_world_size: int,
    rollout_tp: int,
    cuda_visible_devices: str | None,
) -> list[str]:
    """The whole placement for the owner ``rank`` of a replica: the ``CUDA_VISIBLE_DEVICES`` entries its engine
    process gets (:func:`replica_local_ranks` then :func:`engine_devices`)."""
    local = replica_local_ranks(replica_ranks, rank, local_rank, local_world_size)
    return engine_devices(local, rollout_tp, visible_devices(cuda_visible_devices), replica_size=len(replica_ranks))


def check_layout(world_size: int, gpus_per_node: int, tp: int, pp: int, cp: int, rollout_tp: int) -> list[str]:
    """Config-time check: every replica's engine fits its replica's GPUs when ``world_size`` ranks run
    ``gpus_per_node`` to a node in Megatron's default order. Returns the first replica's engine GPUs (local
    ordinals), for the memory plan; raises :class:`PlacementError` naming the keys otherwise."""
    if gpus_per_node < 1 or (world_size % gpus_per_node and world_size > gpus_per_node):
        raise PlacementError(f"world size {world_size} is not a whole number of nodes of {gpus_per_node} GPUs")
    gpus_per_node = min(gpus_per_node, world_size)
    dp = world_size // (tp * pp * cp)
    first = None
    for dp_rank in range(dp):
        ranks = megatron_replica_ranks(dp_rank * tp * cp, world_size, tp, pp, cp)
        owner = ranks[0]
        devices = engine_devices(
            replica_local_ranks(ranks, owner, owner % gpus_per_node, gpus_per_node),
            rollout_tp,
            None,
            replica_size=len(ranks),
        )
        first = devices if first is None else first
    return first or []
