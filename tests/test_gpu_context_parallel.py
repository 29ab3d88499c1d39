"""Model-level context parallelism needs Transformer Engine attention, so it is tested on GPUs only.

The same GIFT and GFT step at CP=1 and CP=2 (2 GPUs, NCCL): equal loss, metrics and gradient norm; and
packed rows (THD, each sequence zig-zag split on its own) at CP=2 against padded rows at CP=1. On CPU the
loss-level CP contract is pinned by test_layout_invariance.py (packed too).
"""

from __future__ import annotations

import pytest
import torch

from tests.multiproc import run_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]


def cp_worker(rank, world, cp, objective, packed=False):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from gift_megatron.megatron import (
        FrozenReference,
        ModelConfig,
        ObjectiveStep,
        ParallelConfig,
        PrecisionConfig,
        build_model,
        pack_global_batch,
        split_global_batch,
    )
    from gift_megatron.objectives import build_objective
    from gift_megatron.parallel.packing import pad_multiple

    ps.initialize_model_parallel(1, 1, context_parallel_size=cp)
    model_parallel_cuda_manual_seed(0)
    try:
        cfg = ModelConfig(
            family="qwen2",
            add_qkv_bias=True,
            hidden_size=128,
            ffn_hidden_size=256,
            num_attention_heads=4,
            num_query_groups=2,
            vocab_size=512,
            seq_length=64,
        )
        parallel = ParallelConfig(context_parallel_size=cp)
        torch.manual_seed(0)
        model = build_model(cfg, parallel, PrecisionConfig(dtype="bf16"))
        # identical weights in both runs: the same seeds on the same GPU model give the same initialization
        ddp = DistributedDataParallel(
            config=model.config, module=model, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True)
        )
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=0.1, bf16=True, clip_grad=1e9), [ddp])
        ref = FrozenReference([ddp], lambda i: build_model(cfg, parallel, PrecisionConfig(dtype="bf16")))
        g = torch.Generator().manual_seed(1)
        n = 8
        tokens = torch.randint(0, 512, (n, 65), generator=g)
        ends = torch.randint(24, 65, (n,), generator=g)  # ragged responses
        pos = torch.arange(64)[None]
        batch = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": ((pos >= 16) & (pos < ends[:, None])).float(),
            "rewards": torch.randn(n, generator=g),
            "group_ids": torch.arange(n) // 4,
        }
        step = ObjectiveStep(build_objective(objective), [ddp], opt, reference=ref)
        if packed:
            mbs = pack_global_batch(
                batch,
                micro_batch_tokens=128,
                dp_rank=ps.get_data_parallel_rank(),
                dp_size=ps.get_data_parallel_world_size(),
                multiple=pad_multiple(1, cp),
            )
        else:
            mbs = split_global_batch(
                batch,
                micro_batch_size=2,
                dp_rank=ps.get_data_parallel_rank(),
                dp_size=ps.get_data_parallel_world_size(),
            )
        res = step(mbs)
        return res.loss, res.grad_norm
    finally:
        ps.destroy_model_parallel()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("objective", ["gift", "gft"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_context_parallel_step_matches_cp1(objective, packed):
    pytest.importorskip("transformer_engine")
    if torch.cuda.device_count() < 2:
        pytest.skip("model-level context parallelism needs 2 GPUs")
    one = run_ranks(cp_worker, 1, 1, objective, timeout=300, backend="nccl")[0]
    two = run_ranks(cp_worker, 2, 2, objective, packed, timeout=300, backend="nccl")
    for loss, gnorm in two:
        assert loss == pytest.approx(one[0], rel=2e-2)  # bf16 attention kernels differ between CP layouts
        assert gnorm == pytest.approx(one[1], rel=5e-2)
