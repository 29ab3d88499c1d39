"""The trainer's processes: the default process group and Megatron's parallel state for the configured layout,
and the data-parallel replicas whose first rank owns the rollout engine.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from gift_megatron import comm
from gift_megatron.config import TrainConfig
from gift_megatron.device import default_backend, use_cuda
from gift_megatron.megatron.mpu import parallel_state


def init_distributed(cfg: TrainConfig) -> None:
    """The default process group (torchrun's environment, or a single process) and Megatron's parallel
    state with the configured layout; NCCL on CUDA, gloo with the CPU runtime otherwise."""
    cuda = use_cuda()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m gift_megatron.train`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(default_backend(), timeout=datetime.timedelta(minutes=30))
    p = cfg.parallel
    if cuda:
        from megatron.core import parallel_state, tensor_parallel

        parallel_state.initialize_model_parallel(
            p.tensor_model_parallel_size,
            p.pipeline_model_parallel_size,
            context_parallel_size=p.context_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
            expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        )
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.run.seed)
    else:
        from gift_megatron.parallel import initialize_model_parallel_cpu

        initialize_model_parallel_cpu(
            p.tensor_model_parallel_size,
            p.pipeline_model_parallel_size,
            p.context_parallel_size,
            seed=cfg.run.seed,
            expert_model_parallel_size=p.expert_model_parallel_size,
            expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_groups() -> tuple[comm.ProcessGroup | None, int]:
    """(process group of this rank's data-parallel replica, global rank of its rollout owner).

    A replica is every rank with the same data-parallel rank: its TP x PP x CP ranks. Built from an
    all-gather of data-parallel ranks because Megatron has no group spanning exactly TP x PP x CP.
    """
    ps = parallel_state()
    dp_ranks = comm.all_gather_objects(ps.get_data_parallel_rank())
    mine: tuple[comm.ProcessGroup | None, int] = (None, dist.get_rank())
    for d in sorted(set(dp_ranks)):
        ranks = [r for r, x in enumerate(dp_ranks) if x == d]
        group = comm.new_group(ranks) if len(ranks) > 1 else None  # every rank must create every group
        if d == ps.get_data_parallel_rank():
            mine = (group, ranks[0])
    return mine


def is_rollout_owner() -> bool:
    ps = parallel_state()
    return (
        ps.get_tensor_model_parallel_rank() == 0
        and ps.get_pipeline_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )
