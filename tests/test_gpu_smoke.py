"""The first CUDA step, on ONE GPU without Transformer Engine (the local spec): what the CPU guards can only
stand in for. Skipped on CPU machines; `make test` runs them in a CUDA process on a GPU host, and
scripts/gpu_check.sh lists them in its table.

Each compares against an independent reference computed on the same GPU: torch.log_softmax on the model's
own logits, and the objective on plain autograd tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.multiproc import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.gpu


def _step_worker(rank, world, objective_name):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from gift_megatron.megatron import ModelConfig, ObjectiveStep, ParallelConfig, PrecisionConfig, build_model
    from gift_megatron.objectives import SINGLE_PROCESS, TokenBatch, build_objective

    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    try:
        cfg = ModelConfig(
            num_layers=2,
            hidden_size=128,
            ffn_hidden_size=256,
            num_attention_heads=4,
            num_query_groups=2,
            vocab_size=300,
            seq_length=32,
        )
        torch.manual_seed(0)
        model = build_model(cfg, ParallelConfig(), PrecisionConfig(dtype="fp32"))
        assert next(model.parameters()).is_cuda
        ddp = DistributedDataParallel(
            config=model.config, module=model, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True)
        )
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.0, clip_grad=0.0), [ddp])
        g = torch.Generator().manual_seed(1)
        n, s = 8, 32
        tokens = torch.randint(0, 300, (n, s + 1), generator=g)
        mask = torch.zeros(n, s)
        mask[:, s // 2 :] = 1.0
        batch = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": mask,
            "rewards": torch.rand(n, generator=g),
            "group_ids": torch.arange(n) // 4,
        }
        # Host tensors in, as the trainer builds them: the step moves them.
        mbs = [{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, n, 2)]
        options = {"reference": "rollout"} if objective_name == "gift" else {}
        step = ObjectiveStep(build_objective(objective_name, **options), [ddp], opt)
        result = step(mbs)
        # Reference: the same model's logits through torch.log_softmax, the objective on plain tensors.
        with torch.no_grad():
            dev = torch.device("cuda", torch.cuda.current_device())
            pos = torch.arange(s, device=dev)[None].expand(n, s)
            logits = model(batch["tokens"].to(dev), pos, None)[..., : cfg.vocab_size].float()
            lp = torch.log_softmax(logits, -1).gather(-1, batch["labels"].to(dev)[..., None])[..., 0]
            tb = TokenBatch(
                logp=lp,
                mask=batch["loss_mask"].to(dev),
                rewards=batch["rewards"].to(dev),
                group_ids=batch["group_ids"].to(dev),
                old_logp=lp,
            )
            ref = build_objective(objective_name, **options)(tb, SINGLE_PROCESS)
        return result.loss, float(ref.loss), result.stats_source
    finally:
        ps.destroy_model_parallel()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("objective", ["gift", "grpo", "gft"])
def test_objective_step_on_cuda_with_nccl_and_the_local_spec(objective):
    loss, ref, source = run_ranks(
        _step_worker, 1, objective, timeout=250, backend="nccl", env={"GIFT_MEGATRON_DEVICE": "cuda"}
    )[0]
    assert loss == pytest.approx(ref, rel=1e-4, abs=1e-5), (loss, ref, source)


def test_vocab_parallel_logprobs_on_cuda_match_log_softmax():
    from gift_megatron.parallel.logprobs import vocab_parallel_logprobs

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(64, 3, 1000, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 1000, (64, 3), device="cuda", generator=g)
    lp = vocab_parallel_logprobs(logits, labels, chunk_size=16)
    lp.sum().backward()
    ref_logits = logits.detach().float().requires_grad_(True)
    ref = torch.log_softmax(ref_logits, -1).gather(-1, labels[..., None])[..., 0]
    ref.sum().backward()
    assert lp.is_cuda and torch.allclose(lp, ref, atol=2e-2)
    assert torch.allclose(logits.grad.float(), ref_logits.grad, atol=2e-2)


@pytest.mark.timeout(400)
def test_one_rank_trainer_run_on_cuda(tmp_path):
    """The whole loop on one GPU: the CPU rollout engine on CUDA, NCCL, eval, checkpoint, resume."""
    import json
    import subprocess
    import sys

    from gift_megatron.data.toy import write_toy_task

    task = tmp_path / "toy"
    write_toy_task(str(task), num_train=64, num_eval=8, seed=0)
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "gift_megatron.train",
        os.path.join(ROOT, "examples", "tiny_cpu_gift.yaml"),
        f"data.train_files=[{task}/train.jsonl]",
        f"data.eval_files=[{task}/eval.jsonl]",
        f"data.tokenizer={task}/tokenizer",
        "run.progress=false",
        "run.tensorboard=false",
        "run.plots=false",
        f"run.output_dir={run}",
        "train.steps=3",
        "run.save_interval=2",
        "precision.dtype=bf16",
        "optimizer.use_distributed_optimizer=false",
    ]
    env = dict(os.environ, GIFT_MEGATRON_DEVICE="cuda", PYTHONUNBUFFERED="1")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(abs(v) < 1e6 for v in losses)
    gaps = [r["rollout/logprob_gap_max"] for r in records if "rollout/logprob_gap_max" in r]
    assert gaps and max(gaps) < 0.05  # the CPU engine on CUDA samples from the trainer's own weights (bf16)
