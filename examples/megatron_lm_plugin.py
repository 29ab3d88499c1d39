"""An existing Megatron-Core training script switching its loss to GIFT, GFT or a baseline.

Everything above the "gift_megatron" marker is what a Megatron-LM style script already has: process
groups, a GPTModel, Megatron's DistributedDataParallel and optimizer. The plugin replaces the script's
forward_step/loss_func and its get_forward_backward_func call with a few lines.

Runs on CPU (gloo) as well as on GPUs:

    python examples/megatron_lm_plugin.py --objective gift --steps 3
    torchrun --nproc-per-node 2 examples/megatron_lm_plugin.py --objective gft --tp 2

The batches here are synthetic groups of responses with made-up rewards (a real run gets them from a
rollout engine and a verifier; see the trainer). What the example shows is the integration surface.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

# CUDA or CPU for the whole process (GIFT_MEGATRON_DEVICE=auto|cpu|cuda), and whether TE is installed.
from gift_megatron.device import has_transformer_engine, use_cuda


def init_distributed(tp: int, pp: int) -> None:
    """What the existing script already does: process group + Megatron parallel state."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if use_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
        from megatron.core import parallel_state, tensor_parallel

        parallel_state.initialize_model_parallel(tp, pp)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    else:
        dist.init_process_group("gloo")
        # gift_megatron's CPU runtime: Megatron-Core on CPU, a no-op where CUDA exists.
        from gift_megatron.parallel import initialize_model_parallel_cpu

        initialize_model_parallel_cpu(tp, pp, seed=1234)


def build_gpt(tp: int, pp: int, vocab: int, seq: int):
    """A small Llama-style GPTModel, as the existing script builds it (TE spec where Transformer Engine is
    installed, the local spec otherwise)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    cuda = use_cuda()
    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=not cuda,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        calculate_per_token_loss=True,  # gift_megatron's step normalizes globally through it
    )
    if has_transformer_engine():  # TE's attention takes packed (THD) rows natively
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        from gift_megatron.megatron.packed_attention import with_packed_attention

        # The local attention refuses packed rows; this swaps in one that runs it once per sequence.
        spec = with_packed_attention(get_gpt_layer_local_spec(normalization="RMSNorm"))
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=seq,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope",
    )
    return model.cuda() if cuda else model


def synthetic_groups(step: int, n_groups: int, group_size: int, seq: int, vocab: int):
    """Groups of responses to the same prompt with rewards: the rollout + verifier's output."""
    g = torch.Generator().manual_seed(step)
    n = n_groups * group_size
    prompt = torch.randint(0, vocab, (n_groups, seq + 1), generator=g).repeat_interleave(group_size, 0)
    prompt[:, seq // 2 :] = torch.randint(0, vocab, (n, seq + 1 - seq // 2), generator=g)
    mask = torch.zeros(n, seq)
    ends = torch.randint(seq // 2 + 2, seq + 1, (n,), generator=g)  # responses of different lengths
    for i, end in enumerate(ends.tolist()):
        mask[i, seq // 2 - 1 : end] = 1.0  # response tokens count, prompt tokens and padding do not
    rewards = (prompt[:, seq // 2 :] % 2 == 0).float().mean(1)  # a made-up verifiable reward
    return {
        "tokens": prompt[:, :-1],
        "labels": prompt[:, 1:],
        "loss_mask": mask,
        "rewards": rewards,
        "group_ids": torch.arange(n) // group_size + step * n_groups,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--objective", default="gift", help="gift | gft | grpo | dapo | gspo | sft | dft")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=None,
        help="pack members into rows of at most this many tokens instead (Megatron-Core's THD format)",
    )
    args = p.parse_args()
    vocab, seq = 128, 32

    init_distributed(args.tp, args.pp)
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = build_gpt(args.tp, args.pp, vocab, seq)
    ddp = DistributedDataParallel(
        config=model.config,
        module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
    )
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=1.0), [ddp])

    # ---- gift_megatron: the lines that switch the loss ----------------------------------------------
    from gift_megatron.megatron import ObjectiveStep, pack_global_batch, split_global_batch
    from gift_megatron.megatron.reference import FrozenReference
    from gift_megatron.objectives import build_objective
    from gift_megatron.parallel.packing import pad_multiple

    # Options are the objective's dataclass fields. GIFT's std_floor bounds the step-0 gradient: with a
    # frozen reference every implicit reward starts at 0, so the group std is 0 (docs/objectives.md, "Zero implicit rewards and std_floor").
    options = {"std_floor": 0.05} if args.objective == "gift" else {}
    objective = build_objective(args.objective, **options)
    reference = FrozenReference([ddp], lambda i: build_gpt(args.tp, args.pp, vocab, seq))
    train_step = ObjectiveStep(objective, [ddp], optimizer, reference=reference)
    # --------------------------------------------------------------------------------------------------

    for step in range(args.steps):
        # Host tensors: ObjectiveStep moves each micro-batch to the model's device once.
        batch = synthetic_groups(step, n_groups=4, group_size=4, seq=seq, vocab=vocab)
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        if args.micro_batch_tokens:  # packed rows (THD) under a token budget, balanced over DP ranks
            micro_batches = pack_global_batch(
                batch,
                micro_batch_tokens=args.micro_batch_tokens,
                dp_rank=dp_rank,
                dp_size=dp_size,
                multiple=pad_multiple(args.tp),
                fixed_rows=args.pp > 1,
            )  # pipeline stages need equal shapes
        else:
            micro_batches = split_global_batch(
                batch, micro_batch_size=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size
            )
        result = train_step(micro_batches)
        if dist.get_rank() == 0:
            shown = {
                k: round(v, 4)
                for k, v in result.metrics.items()
                if k in ("reward/mean", "loss", "gift/corr_advantage_z", "groups/degenerate_frac", "clip_frac")
            }
            print(
                f"step {step}: {args.objective} loss {result.loss:.5f} grad_norm {result.grad_norm:.4f} "
                f"stats {result.stats_source} {shown}",
                flush=True,
            )
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
