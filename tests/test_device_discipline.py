"""Device discipline, checked on a CPU machine (issue: the first CUDA step failed on device mix-ups).

Three guards against the bug class "a tensor on the wrong device", none of which needs a GPU:

1. Meta guard: library functions run on CPU inputs while ``torch.set_default_device("meta")`` is active.
   A factory call without ``device=`` then makes a meta tensor, and mixing it with the CPU inputs raises,
   exactly where a CUDA run would have mixed a CPU tensor into CUDA math. Outputs must stay on the CPU and
   equal an unguarded call bit for bit.
2. Collective audit: a 2-rank trainer run records every torch.distributed call; none may come from package
   code other than gift_megatron/comm.py, and every tensor must be on its group's device.
3. NCCL's rule on CPU: a "cuda:gloo" group rejects CPU tensors as NCCL does, and comm maps backends to
   devices accordingly.

What they cannot see is listed in the README ("On a GPU: what has run and what has not").
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.multiproc import free_port, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def meta_default():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def guarded(fn, make_inputs=lambda: ()):
    """fn(*make_inputs()) under the meta default device, and again unguarded: both results. The inputs are
    made outside the guard (they are the CPU tensors a caller hands in), fresh for each call."""
    inputs = make_inputs()
    with meta_default():
        out = fn(*inputs)
    return out, fn(*make_inputs())


def flatten(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in flatten(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in flatten(v)]
    if hasattr(x, "__dataclass_fields__"):
        return [t for k in x.__dataclass_fields__ for t in flatten(getattr(x, k))]
    return []


def assert_same_on_cpu(a, b):
    ta, tb = flatten(a), flatten(b)
    assert len(ta) == len(tb) and ta
    for x, y in zip(ta, tb):
        assert x.device.type == "cpu", f"output on {x.device}"
        assert torch.equal(x.detach(), y.detach()) or (x.isnan().any() and torch.equal(x.isnan(), y.isnan()))


def batch(B=6, S=7, seed=0, groups=2):
    from gift_megatron.objectives import TokenBatch

    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, S, generator=g) * 3).requires_grad_(True)
    mask = torch.zeros(B, S)
    mask[:, 2:] = 1.0
    mask[0, -1] = 0.0
    return TokenBatch(
        logp=logp,
        mask=mask,
        rewards=torch.rand(B, generator=g),
        group_ids=torch.arange(B) % groups,
        ref_logp=-torch.rand(B, S, generator=g) * 3,
        old_logp=logp.detach() - 0.05 * torch.rand(B, S, generator=g),
    )


OBJECTIVE_CASES = [
    ("gift", {}),
    ("gift", {"detach_stats": False}),
    ("gift", {"implicit_reward": "mean", "std_floor": 0.1}),
    ("gift", {"reference": "rollout", "detach_stats": False}),
    ("gft", {}),
    ("grpo", {}),
    ("grpo", {"kl_coef": 0.1}),
    ("dapo", {}),
    ("gspo", {}),
    ("sft", {}),
    ("dft", {}),
]


@pytest.mark.parametrize("name,options", OBJECTIVE_CASES, ids=[f"{n}-{o}" for n, o in OBJECTIVE_CASES])
def test_objectives_make_no_default_device_tensor(name, options):
    from gift_megatron.objectives import SINGLE_PROCESS, build_objective

    obj = build_objective(name, **options)

    def run(b):
        out = obj(b)
        out.loss.backward()
        return {"loss": out.loss, "metrics": out.finalize(SINGLE_PROCESS), "grad": b.logp.grad}

    assert_same_on_cpu(*guarded(run, lambda: (batch(),)))


def test_gift_loss_full_gradient_statistics_under_meta():
    """The statistics of detach_stats=False were once built with torch.zeros(G) on the default device."""
    from gift_megatron.objectives import gift_loss

    def run(b):
        loss, metrics = gift_loss(b.logp, b.ref_logp, b.mask, b.rewards, b.group_ids, detach_stats=False)
        loss.backward()
        return loss, metrics, b.logp.grad

    assert_same_on_cpu(*guarded(run, lambda: (batch(B=8, groups=3),)))


def test_group_statistics_helpers_under_meta():
    from gift_megatron.objectives.groups import group_statistics, group_zscore, segment_mean_std

    v, ids, inverse = (
        torch.tensor([0.3, 0.1, 0.7, 0.2, 0.9]),
        torch.tensor([4, 4, 1, 1, 9]),
        torch.tensor([0, 0, 1, 1, 2]),
    )
    assert_same_on_cpu(*guarded(lambda: group_zscore(v, ids)))
    assert_same_on_cpu(*guarded(lambda: group_statistics(v, ids)))
    assert_same_on_cpu(*guarded(lambda: segment_mean_std(v, inverse, 3)))


def test_vocab_parallel_logprobs_forward_and_backward_under_meta():
    from gift_megatron.parallel.logprobs import vocab_parallel_logprobs

    g = torch.Generator().manual_seed(1)
    logits0, labels = torch.randn(5, 2, 40, generator=g), torch.randint(0, 37, (5, 2), generator=g)

    def run(logits):
        lp = vocab_parallel_logprobs(logits, labels, temperature=0.7, chunk_size=3, vocab_size=37)
        lp.sum().backward()
        return lp, logits.grad

    assert_same_on_cpu(*guarded(run, lambda: (logits0.clone().requires_grad_(True),)))


def test_context_parallel_split_under_meta():
    from gift_megatron.parallel.context import zigzag_split

    x = torch.arange(32.0).reshape(2, 16)
    assert_same_on_cpu(*guarded(lambda: [zigzag_split(x, 2, r, seq_dim=1) for r in range(2)]))


def test_trainer_batch_helpers_under_meta():
    from gift_megatron.trainer.batch import (
        Member,
        engine_logprobs,
        micro_batches,
        pack,
    )
    from gift_megatron.trainer.step_metrics import rollout_kl_to_reference, rollout_logprob_gap

    members = [
        Member(0, [1, 2, 3], [4, 5, 6], "rollout", reward=0.5, rollout_logprobs=[-0.1, -0.2, -0.3]),
        Member(0, [1, 2, 3], [7, 8], "expert", reward=1.0),
        Member(1, [1, 2], [5, 6, 7, 2], "rollout", reward=0.0, rollout_logprobs=[-1.0, -0.5, -0.25, -2.0]),
        Member(1, [1, 2], [9], "teacher", reward=0.25),
    ]

    def run():
        b = pack(members, 8, pad_id=0)
        eng = engine_logprobs(members, 8)
        trainer = torch.where(b["loss_mask"] > 0, -0.3 * b["labels"].float(), torch.full_like(b["loss_mask"], 9.0))
        return (
            b,
            micro_batches(b, 2),
            eng,
            rollout_logprob_gap(trainer, eng, b["loss_mask"]),
            rollout_kl_to_reference(trainer, eng, b["loss_mask"]),
        )

    guarded_out, plain = guarded(run)
    assert_same_on_cpu(guarded_out, plain)
    # Independent reference for the vectorized gap and KL: per member, by hand.
    b = plain[0]
    gap = max(
        abs(-0.3 * lab - e)
        for m, row, labs in zip(members, range(4), b["labels"].tolist())
        if m.kind == "rollout"
        for lab, e in zip(labs[len(m.prompt_ids) - 1 :], m.rollout_logprobs)
    )
    assert plain[3].tolist() == pytest.approx([gap, 1.0], abs=1e-6)
    kl = sum(
        e - (-0.3 * lab)
        for m, labs in zip(members, b["labels"].tolist())
        if m.kind == "rollout"
        for lab, e in zip(labs[len(m.prompt_ids) - 1 :], m.rollout_logprobs)
    )
    assert plain[4].tolist() == pytest.approx([kl, 2.0], abs=1e-5)


def test_host_float_conversion_and_batch_move_under_meta():
    from gift_megatron.device import move_to, to_host_floats

    values = {"a": torch.tensor(1.5), "b": 2, "c": torch.tensor([3.25])}
    host_batch = {"x": torch.ones(2), "n": 3}
    with meta_default():
        floats = to_host_floats(values)
        moved = move_to(host_batch, torch.device("cpu"))
    assert floats == {"a": 1.5, "b": 2.0, "c": 3.25}
    assert moved["x"].device.type == "cpu" and moved["n"] == 3


def test_comm_helpers_without_a_world_are_local_under_meta():
    from gift_megatron import comm

    x = torch.arange(4.0)
    with meta_default():
        assert comm.all_reduce_host([1.0, 2.0]) == [1.0, 2.0]
        assert torch.equal(comm.all_gather_rows(x, None), x)
        assert torch.equal(comm.all_reduce_sum(x, None), x)
        assert comm.group_device(None).type == "cpu"


# ------------------------------------------------------------------------------- NCCL's rule on CPU
def test_backend_device_types():
    from gift_megatron.comm import backend_device_type

    assert backend_device_type("cpu:gloo,cuda:gloo") == "cpu"
    assert backend_device_type("gloo") == "cpu"
    assert backend_device_type("cuda:nccl") == "cuda"
    assert backend_device_type("nccl") == "cuda"
    assert backend_device_type("cuda:gloo") == "cuda"
    assert backend_device_type("cpu:gloo,cuda:nccl") == "cpu"


def _cuda_only_gloo(rank, world):
    import torch.distributed as dist

    from gift_megatron.comm import backend_device_type

    kind = backend_device_type(str(dist.get_backend_config()))
    try:
        dist.all_reduce(torch.ones(2))
    except RuntimeError as exc:
        return kind, str(exc)
    return kind, None


def test_cuda_only_group_rejects_cpu_tensors_like_nccl():
    """A group whose backend takes CUDA tensors only (NCCL; here "cuda:gloo") refuses a CPU tensor with the
    error the first GPU run hit, and comm maps it to the CUDA device."""
    results = run_ranks(_cuda_only_gloo, 2, backend="cuda:gloo", timeout=60)
    for kind, error in results:
        assert kind == "cuda"
        assert error is not None and "No backend type associated with device type cpu" in error


# ------------------------------------------------------------------------------- collective audit
@pytest.mark.timeout(420)
def test_every_collective_of_a_trainer_run_goes_through_comm(tmp_path):
    """2 ranks at TP=2: GRPO with a KL term (reference and old-policy passes), eval, weight export to the
    rollout engine, checkpoint save. No torch.distributed call from package code outside comm.py."""
    from gift_megatron.data.toy import write_toy_task

    task = tmp_path / "toy"
    write_toy_task(str(task), num_train=64, num_eval=8, seed=0)
    audit = tmp_path / "audit"
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "tests.audit_collectives",
        os.path.join(ROOT, "examples", "tiny_cpu_gift.yaml"),
        f"data.train_files=[{task}/train.jsonl]",
        f"data.eval_files=[{task}/eval.jsonl]",
        f"data.tokenizer={task}/tokenizer",
        "run.progress=false",
        "run.tensorboard=false",
        "run.plots=false",
        f"run.output_dir={tmp_path / 'run'}",
        "parallel.tensor_model_parallel_size=2",
        "train.steps=2",
        "run.save_interval=1",
        "train.eval_interval=1",
        "train.eval_prompts=4",
        "train.prompts_per_step=4",
        "train.micro_batch_size=8",
        "objective.name=grpo",
        "objective.options={kl_coef: 0.05}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GIFT_AUDIT_OUT=str(audit))
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    files = sorted(glob.glob(str(audit / "rank*.json")))
    assert len(files) == 2
    for path in files:
        records = json.load(open(path))
        bypass = sorted({r["caller"] for r in records if r["bypass"]})
        assert not bypass, f"collectives called outside gift_megatron/comm.py: {bypass}"
        wrong = [r for r in records if r.get("wrong_device")]
        assert not wrong, f"collective tensors off their group's device: {wrong[:5]}"
        ours = [r for r in records if r["caller"].startswith(os.path.join(ROOT, "gift_megatron", "comm.py"))]
        ops = {r["op"] for r in ours}
        # Not vacuous: the run went through comm for reductions, object broadcasts (rollouts, checkpoint
        # names), barriers (checkpoint), and the export's TP gather onto the rollout owner.
        assert {"all_reduce", "gather", "broadcast_object_list", "barrier"} <= ops, ops
        assert len(ours) > 20


# ------------------------------------------------------------------------------- CUDA without TE
def test_backend_selection_and_refusals_without_transformer_engine():
    from gift_megatron.megatron.model import ParallelConfig, PrecisionConfig, select_backend

    plain, bf16 = ParallelConfig(tensor_model_parallel_size=2), PrecisionConfig(dtype="bf16")
    assert select_backend(plain, bf16, cuda=True, transformer_engine=True) == "transformer_engine"
    assert select_backend(plain, bf16, cuda=True, transformer_engine=False) == "local"
    assert select_backend(plain, bf16, cuda=False, transformer_engine=False) == "local"
    # Sequence parallelism runs on the local spec (SequenceParallelRMSNorm), with or without CUDA.
    sp = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    assert select_backend(sp, bf16, cuda=True, transformer_engine=False) == "local"
    assert select_backend(sp, bf16, cuda=False, transformer_engine=False) == "local"
    for parallel, precision, key in [
        (plain, PrecisionConfig(dtype="bf16", fp8="hybrid"), "precision.fp8"),
        (ParallelConfig(context_parallel_size=2), bf16, "parallel.context_parallel_size"),
    ]:
        for cuda in (True, False):
            with pytest.raises(RuntimeError, match="Transformer Engine") as err:
                select_backend(parallel, precision, cuda=cuda, transformer_engine=False)
            assert key in str(err.value)
            assert ("GPU host" in str(err.value)) == cuda


def test_cuda_config_without_transformer_engine_is_valid_for_megatron(monkeypatch):
    """On a CUDA host without TE the TransformerConfig turns TE-only fusions off; the old flags are what
    megatron-core itself rejects there ("apply_rope_fusion is not available")."""
    from gift_megatron.megatron import model as model_mod

    monkeypatch.setattr(model_mod, "_cuda", lambda: True)
    monkeypatch.setattr(model_mod, "_te", lambda: False)
    cfg = model_mod.ModelConfig()
    config = model_mod.transformer_config(cfg, model_mod.ParallelConfig(), model_mod.PrecisionConfig(dtype="bf16"))
    assert not config.apply_rope_fusion and not config.masked_softmax_fusion
    assert not config.gradient_accumulation_fusion and not config.use_cpu_initialization
    assert config.bias_activation_fusion  # Megatron's own jit fusion: no TE needed
    with pytest.raises(Exception, match="apply_rope_fusion"):
        model_mod.transformer_config(
            cfg, model_mod.ParallelConfig(), model_mod.PrecisionConfig(dtype="bf16"), apply_rope_fusion=True
        )
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    core = model_mod.layer_spec(cfg, "local").submodules.self_attention.submodules.core_attention
    # Megatron's local attention (the packed-row subclass of packed_attention.py), not TE's.
    assert issubclass(core, DotProductAttention) and "TE" not in core.__name__


def test_fp8_param_is_refused_naming_the_key():
    from gift_megatron.megatron.model import PrecisionConfig

    with pytest.raises(ValueError, match="precision.fp8_param"):
        PrecisionConfig(dtype="bf16", fp8="hybrid", fp8_param=True)


def test_device_choice_from_the_environment(monkeypatch):
    from gift_megatron import device

    monkeypatch.setenv("GIFT_MEGATRON_DEVICE", "cpu")
    assert not device.use_cuda() and device.default_backend() == "gloo"
    assert device.compute_device() == torch.device("cpu") and not device.has_transformer_engine()
    monkeypatch.setenv("GIFT_MEGATRON_DEVICE", "tpu")
    with pytest.raises(ValueError, match="GIFT_MEGATRON_DEVICE"):
        device.use_cuda()
    if not torch.cuda.is_available():
        monkeypatch.setenv("GIFT_MEGATRON_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            device.use_cuda()


def test_packing_and_step_batch_under_meta():
    """The token-budget plan, packed rows (trainer and plugin paths), unpacking and the per-sequence CP split."""
    from gift_megatron.parallel.packing import sequence_lengths, trim_rows, unpack, zigzag_positions
    from gift_megatron.trainer.batch import Member, step_batch

    members = [
        Member(
            g,
            [1, 2, 3][: 2 + g % 2],
            [4 + i, 5, 6][: 1 + i],
            "rollout",
            reward=float(i),
            rollout_logprobs=[-0.1] * (1 + i),
        )
        for g in range(3)
        for i in range(3)
    ]

    def run():
        packed = step_batch(members, seq_length=8, pad_id=0, micro_batch_tokens=16, dp_size=2, dp_rank=1, multiple=4)
        rows = step_batch(members, seq_length=8, pad_id=0, micro_batch_size=3, multiple=2)
        mb = packed.micro_batches[0]
        layout = mb["packed"]
        return (
            packed.micro_batches,
            packed.engine,
            rows.micro_batches,
            rows.engine,
            unpack(mb["loss_mask"], layout),
            zigzag_positions(layout, 2, 1, torch.device("cpu")),
            torch.tensor(sequence_lengths(rows.micro_batches[0]["loss_mask"]), device="cpu"),
            trim_rows(rows.micro_batches[0], multiple=4),
        )

    assert_same_on_cpu(*guarded(run))


def test_moe_step_helpers_under_meta():
    """The pure helpers of gift_megatron/megatron/moe.py (router metrics) keep CPU inputs on the CPU."""
    from gift_megatron.megatron.moe import check_equal_micro_batch_counts, load_balance, router_loss_scale

    counts = torch.tensor([[3.0, 1.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    assert_same_on_cpu(*guarded(lambda: load_balance(counts)))
    with meta_default():
        assert router_loss_scale(32, 512) == 1 / 16
        check_equal_micro_batch_counts([2, 2], ep=2)


# torch factories that create a tensor on the default device unless told otherwise.
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "eye", "rand", "randn"}
FACTORIES |= {"randint", "randperm"}


def test_every_factory_call_in_the_library_names_its_device():
    """The static half of the meta guard: a ``torch.<factory>(...)`` call in gift_megatron/ without
    ``device=`` lands on the CPU next to CUDA tensors, on paths a CPU test may never reach."""
    import ast

    missing = []
    for path in sorted(glob.glob(os.path.join(ROOT, "gift_megatron", "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            func = getattr(node, "func", None)
            if (
                isinstance(node, ast.Call)
                and isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id == "torch"
                and func.attr in FACTORIES
                and not any(k.arg == "device" for k in node.keywords)
            ):
                missing.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} torch.{func.attr}")
    assert not missing, missing
