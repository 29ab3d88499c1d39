"""A tiny Megatron-Core GPTModel trained with Megatron's own machinery on CPU, for tests.

Used inside ranks started by ``tests.multiproc.run_ranks`` (gloo default group already initialized):

    spec, layout = TinyGPT(), Layout(tp=2)
    setup_parallel(layout)                              # parallel state + RNG seeds, CPU runtime on
    model = build_model(spec, layout)                   # this rank's pipeline stage / TP shard
    load_weights(model, ckpt_dir)                       # identical weights in every layout
    trainer = Trainer(model, spec, layout)              # DDP wrapper + Megatron optimizer
    batch = global_batch(spec, num_sequences=4, seed=0)
    loss, grad_norm = trainer.step(micro_batches(batch, 2, dp_rank, dp_size))
    teardown_parallel()

Identical weights across layouts come from a Megatron distributed checkpoint: write it once at TP=1/PP=1
(:func:`save_weights`), load it in any layout (:func:`load_weights`); Megatron reshards it, including the
fused QKV (grouped per query group) and the fused SwiGLU fc1 ([gate; up] per TP rank) layouts.

The loss is the per-token sum / count form (``calculate_per_token_loss``): a micro-batch contributes
(sum of its token losses, its token count) and Megatron divides gradients by the global token count, so
the loss and the gradients do not depend on how the global batch is split across DP ranks and micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gift_megatron.parallel.cpu_runtime import destroy_model_parallel_cpu, initialize_model_parallel_cpu


@dataclasses.dataclass(frozen=True)
class TinyGPT:
    """The tiny model: Llama/Qwen-like (RoPE, RMSNorm, SwiGLU, GQA, no biases)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 128
    vocab_size: int = 128  # divisible by every TP size used in tests (Megatron pads the vocab otherwise)
    seq_length: int = 32
    swiglu: bool = True
    tie_embeddings: bool = False  # output layer = word embeddings (with PP: a copy kept in sync on the last stage)
    bf16: bool = False  # bf16 params with fp32 main params in the optimizer (Megatron's mixed precision)

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


@dataclasses.dataclass(frozen=True)
class Layout:
    """A parallel layout. ``dp`` is implied by the world size: world = tp * pp * dp."""

    tp: int = 1
    pp: int = 1
    distributed_optimizer: bool = False


# --------------------------------------------------------------------------------------------------
# Parallel state
# --------------------------------------------------------------------------------------------------


def setup_parallel(layout: Layout, seed: int = 1234) -> None:
    """Megatron parallel state for ``layout`` on the initialized gloo default group, CPU runtime enabled."""
    initialize_model_parallel_cpu(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp, seed=seed
    )


def teardown_parallel() -> None:
    """Destroy Megatron's parallel state (the default process group stays, for run_ranks to close)."""
    destroy_model_parallel_cpu()


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def transformer_config(spec: TinyGPT, layout: Layout) -> Any:
    """A TransformerConfig (fp32, or bf16 if ``spec.bf16``) that runs with the local spec on CPU.

    Every fusion that needs a CUDA kernel or Apex is off; dropout is 0 so runs are deterministic;
    ``use_cpu_initialization`` builds weights on the CPU; per-token loss normalization is on.
    """
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        ffn_hidden_size=spec.ffn_hidden_size,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        pipeline_dtype=spec.params_dtype,
        params_dtype=spec.params_dtype,
        bf16=spec.bf16,
        normalization="RMSNorm",
        gated_linear_unit=spec.swiglu,
        activation_func=F.silu if spec.swiglu else F.gelu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        init_method_std=0.02,
        calculate_per_token_loss=True,
        # CUDA-only fusions (Apex / custom kernels).
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
    )


def build_model(spec: TinyGPT, layout: Layout) -> Any:
    """This rank's GPTModel (its pipeline stage, its tensor-parallel shard), local spec, on CPU."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from gift_megatron.megatron.packed_attention import with_packed_attention

    return GPTModel(
        config=transformer_config(spec, layout),
        # Padded rows run Megatron's local attention unchanged; packed (THD) rows run it once per sequence.
        transformer_layer_spec=with_packed_attention(get_gpt_layer_local_spec(normalization="RMSNorm")),
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="rope",
    )


def save_weights(model: Any, ckpt_dir: str) -> None:
    """Write ``model``'s weights as a Megatron distributed checkpoint (collective over all ranks)."""
    from megatron.core import dist_checkpointing

    os.makedirs(ckpt_dir, exist_ok=True)  # Megatron requires an existing, empty directory
    with _child_processes_allowed():
        dist_checkpointing.save(_unwrap(model).sharded_state_dict(), ckpt_dir)


@contextlib.contextmanager
def _child_processes_allowed() -> Iterator[None]:
    """Let this process start child processes while the block runs, even if it is daemonic.

    Why: ``run_ranks`` starts ranks as daemonic processes, and Python refuses to start children from one,
    but Megatron's checkpoint writer does: a multiprocessing Manager for its results queue (0.19) or one
    forked writer per file (0.16). Under torchrun ranks are not daemonic, so this only matters in tests.
    """
    proc = multiprocessing.current_process()
    was_daemon = proc.daemon
    if was_daemon:
        proc.daemon = False
    try:
        yield
    finally:
        if was_daemon:
            proc.daemon = True


def load_weights(model: Any, ckpt_dir: str) -> None:
    """Load a distributed checkpoint written by :func:`save_weights` in any layout into ``model``."""
    from megatron.core import dist_checkpointing

    module = _unwrap(model)
    state = dist_checkpointing.load(module.sharded_state_dict(), ckpt_dir)
    module.load_state_dict(state, strict=True)


def full_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Name -> detached CPU copy of every parameter of ``model`` (the whole model when TP=PP=1)."""
    return {name: p.detach().clone() for name, p in _unwrap(model).named_parameters()}


def _unwrap(model: Any) -> Any:
    """The GPTModel inside a Megatron DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def global_batch(spec: TinyGPT, num_sequences: int, seed: int) -> dict[str, torch.Tensor]:
    """A deterministic batch that a few optimizer steps can learn from, with ragged loss masks.

    Tokens are drawn from a fixed 16-token subset of the vocabulary spread over all of it (so the loss
    falls within a few steps, and labels land in every vocab shard of a TP split). Loss masks keep a
    random-length prefix of each sequence, so token counts differ between sequences and the per-token
    normalization matters. ``tokens`` and ``labels`` are ``[n, s]``; ``labels`` is ``tokens`` shifted
    left by one.
    """
    subset = torch.randperm(spec.vocab_size, generator=torch.Generator().manual_seed(0))[:16]
    gen = torch.Generator().manual_seed(seed)
    seq = subset[torch.randint(0, len(subset), (num_sequences, spec.seq_length + 1), generator=gen)]
    lengths = torch.randint(spec.seq_length // 4, spec.seq_length + 1, (num_sequences,), generator=gen)
    positions = torch.arange(spec.seq_length)
    return {
        "tokens": seq[:, :-1].contiguous(),
        "labels": seq[:, 1:].contiguous(),
        "loss_mask": (positions[None, :] < lengths[:, None]).float(),
    }


def micro_batches(
    batch: dict[str, torch.Tensor], num_micro_batches: int, dp_rank: int, dp_size: int
) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches: the global batch split into ``dp_size`` disjoint contiguous slices,
    and this rank's slice into ``num_micro_batches`` equal micro-batches."""
    n = batch["tokens"].shape[0]
    if n % (dp_size * num_micro_batches):
        raise ValueError(f"{n} sequences do not split into {dp_size} DP ranks x {num_micro_batches} micro-batches")
    per_rank = n // dp_size
    mine = {k: v[dp_rank * per_rank : (dp_rank + 1) * per_rank] for k, v in batch.items()}
    size = per_rank // num_micro_batches
    return [{k: v[i * size : (i + 1) * size] for k, v in mine.items()} for i in range(num_micro_batches)]


# --------------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------------


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Megatron's 3-tuple loss format for ``calculate_per_token_loss``: (sum of masked token losses, token
    count, {"lm loss": [sum, count]} for reporting). ``output_tensor`` is GPTModel's ``[b, s]`` per-token
    cross-entropy (it computes it vocab-parallel when given labels)."""
    mask = loss_mask.float()
    loss_sum = (output_tensor.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: Any) -> tuple[torch.Tensor, Any]:
    """Megatron forward_step_func: run one micro-batch, return the per-token losses and the loss function."""
    mb = next(data_iterator)
    tokens = mb["tokens"]
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    # attention_mask=None: the local spec's softmax builds the causal mask itself.
    output = model(tokens, position_ids, None, labels=mb["labels"])
    return output, partial(loss_func, mb["loss_mask"])


class Trainer:
    """Megatron-Core training on one rank: DDP wrapper, Megatron optimizer (Adam), forward/backward schedule.

    ``step`` runs one optimizer step over this rank's micro-batches and returns the global per-token mean
    loss and the gradient norm Megatron clipped with; both are the same on every rank of every layout.
    """

    def __init__(
        self,
        model: Any,
        spec: TinyGPT,
        layout: Layout,
        *,
        lr: float = 1e-2,
        clip_grad: float = 0.5,
        weight_decay: float = 0.01,
    ) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.spec = spec
        config = model.config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=layout.distributed_optimizer,
        )
        self.model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=lr,
                weight_decay=weight_decay,
                clip_grad=clip_grad,
                params_dtype=spec.params_dtype,
                bf16=spec.bf16,
                use_distributed_optimizer=layout.distributed_optimizer,
            ),
            [self.model],
        )
        # What Megatron's training loop wires into the config for the schedules.
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = self.model.no_sync

    def step(self, micro_batch_list: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """One optimizer step over ``micro_batch_list``; returns (global mean token loss, grad norm)."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reported = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batch_list),
            model=[self.model],
            num_microbatches=len(micro_batch_list),
            seq_length=self.spec.seq_length,
            micro_batch_size=micro_batch_list[0]["tokens"].shape[0],
            forward_only=False,
        )
        update_successful, grad_norm, _ = self.optimizer.step()
        if not update_successful:
            raise RuntimeError("Megatron optimizer skipped the update")
        # Only the last pipeline stage has the losses; sum over micro-batches and DP ranks, then share
        # with the other stages.
        sum_count = torch.zeros(2)
        if parallel_state.is_pipeline_last_stage():
            sum_count = torch.stack([r["lm loss"] for r in reported]).sum(0)
            dist.all_reduce(sum_count, group=parallel_state.get_data_parallel_group())
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        last_stage = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(sum_count, src=last_stage, group=pp_group)
        return float(sum_count[0] / sum_count[1]), float(grad_norm)
