"""vocab_parallel_logprobs against torch.log_softmax on the full-vocabulary logits (forward and backward).

The reference is always autograd through ``torch.log_softmax(full_logits.float() / T)`` on an fp32 leaf,
so the expected log-probs and gradients never come from the code under test.

Tolerances for bf16/fp16 gradients: the reference gradient is fp32. Ours rounds the saved shard softmax to
the logits' dtype once and the final gradient once more, each a relative error of at most the unit
round-off u (2^-8 for bf16 with its 8 significant bits, 2^-11 for fp16), so |ours - ref| <= ~2u * |ref|
(the reference itself, cast to bf16, would be off by up to 1u); a tiny atol covers fp32 round-off in
entries that are ~0. fp16 also has subnormals below 6e-5 with absolute spacing 2^-24 ~ 6e-8: the stored
probability's absolute error 2^-25 is scaled by |weight| / T <= ~4 here, hence its atol of 3e-7.
The log-probs themselves are fp32 from the same (exactly representable) inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from gift_megatron.parallel import logprobs as lp_module
from gift_megatron.parallel.logprobs import vocab_parallel_logprobs
from tests.multiproc import run_ranks

GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 * 2.0**-8 + 1e-4, torch.float16: 2 * 2.0**-11 + 1e-4}
GRAD_ATOL = {torch.float32: 1e-7, torch.bfloat16: 1e-9, torch.float16: 3e-7}


def make_case(seed: int, shape: tuple[int, ...], vocab: int, dtype: torch.dtype, scale: float = 4.0):
    """Full-vocab logits with a spread wide enough for probabilities from ~1e-12 to ~0.5, labels, weights."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    weights = torch.randn(*shape, generator=gen)
    return logits, labels, weights


def reference(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, temperature: float):
    """log p(label) and d(sum(weights * logp))/d logits in fp32, straight from torch.log_softmax."""
    leaf = logits.detach().float().requires_grad_()
    logp = torch.log_softmax(leaf / temperature, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    (logp * weights).sum().backward()
    return logp.detach(), leaf.grad


def ours(logits, labels, weights, temperature, chunk_size, tp_group=None):
    leaf = logits.detach().clone().requires_grad_()
    logp = vocab_parallel_logprobs(leaf, labels, tp_group=tp_group, temperature=temperature, chunk_size=chunk_size)
    (logp * weights).sum().backward()
    return logp.detach(), leaf.grad


def assert_matches(got_logp, got_grad, ref_logp, ref_grad, dtype):
    assert got_logp.dtype == torch.float32
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got_logp, ref_logp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got_grad.float(), ref_grad, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 64])
def test_tp1_matches_log_softmax(dtype, temperature, chunk_size):
    # 2 x 9 = 18 tokens: chunk 5 leaves a short last chunk, chunk 64 exceeds the token count.
    logits, labels, weights = make_case(0, (2, 9), 96, dtype, scale=3.0 if dtype == torch.float16 else 4.0)
    got = ours(logits, labels, weights, temperature, chunk_size)
    assert_matches(*got, *reference(logits, labels, weights, temperature), dtype)


def test_cpu_block_cap_splits_unchunked_work(monkeypatch):
    # Force the CPU cache blocking to its minimum so an unchunked call still walks several blocks.
    monkeypatch.setattr(lp_module, "CPU_BLOCK_BYTES", 1)
    logits, labels, weights = make_case(1, (3, 7), 40, torch.bfloat16)
    assert_matches(*ours(logits, labels, weights, 1.3, None), *reference(logits, labels, weights, 1.3), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_logits_unchanged(dtype):
    logits, labels, weights = make_case(2, (2, 6), 32, dtype)
    leaf = logits.clone().requires_grad_()
    before = leaf.detach().clone()
    (vocab_parallel_logprobs(leaf, labels, temperature=0.5, chunk_size=4) * weights).sum().backward()
    assert torch.equal(leaf.detach(), before)


def test_transposed_logits_read_in_place_and_grad_keeps_layout():
    # Megatron computes [s, b, V] and GPTModel transposes to [b, s, V]: a non-contiguous view.
    logits_sbv, _, _ = make_case(3, (7, 2), 24, torch.float32)
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 24, (2, 7), generator=gen)
    weights = torch.randn(2, 7, generator=gen)
    leaf = logits_sbv.clone().requires_grad_()
    logp = vocab_parallel_logprobs(leaf.transpose(0, 1), labels, chunk_size=3)
    (logp * weights).sum().backward()
    ref_logp, ref_grad = reference(logits_sbv.transpose(0, 1), labels, weights, 1.0)
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(leaf.grad.transpose(0, 1), ref_grad)


def test_strided_logits_fall_back_to_a_copy():
    wide, labels, weights = make_case(4, (2, 5), 40, torch.bfloat16)
    leaf = wide.clone().requires_grad_()
    strided = leaf[..., ::2]  # no permutation of this view is contiguous
    logp = vocab_parallel_logprobs(strided, labels % 20, chunk_size=3)
    (logp * weights).sum().backward()
    ref_logp, ref_grad = reference(wide[..., ::2], labels % 20, weights, 1.0)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(leaf.grad[..., ::2].float(), ref_grad, rtol=GRAD_RTOL[torch.bfloat16], atol=1e-9)
    assert torch.count_nonzero(leaf.grad[..., 1::2]) == 0


def test_confident_label_gradient_is_accurate_in_bf16():
    # p(label) ~ 0.9994: bf16 rounds p to exactly 1.0 (its spacing below 1 is 2^-8), so a gradient built
    # from the stored bf16 softmax would give 1 - p = 0 at the label. The reference value is ~6e-4.
    logits, labels, weights = make_case(5, (4, 8), 64, torch.bfloat16, scale=1.0)
    logits = logits.clone()
    logits.view(-1, 64)[torch.arange(32), labels.view(-1)] = 12.0
    ref_logp, ref_grad = reference(logits, labels, weights, 1.0)
    assert ref_logp.exp().min() > 0.999
    got_logp, got_grad = ours(logits, labels, weights, 1.0, 7)
    label_ref = ref_grad.view(-1, 64)[torch.arange(32), labels.view(-1)]
    label_got = got_grad.view(-1, 64)[torch.arange(32), labels.view(-1)].float()
    torch.testing.assert_close(label_got, label_ref, rtol=2.0**-8 + 1e-5, atol=0.0)  # one rounding
    assert_matches(got_logp, got_grad, ref_logp, ref_grad, torch.bfloat16)


def test_saves_one_logits_sized_buffer_with_grad_and_nothing_without(monkeypatch):
    logits, labels, weights = make_case(6, (3, 10), 128, torch.bfloat16)
    n_tokens = labels.numel()
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    leaf = logits.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp = vocab_parallel_logprobs(leaf, labels, chunk_size=4)
    big = [t for t in saved if t.numel() > n_tokens]
    assert [(tuple(t.shape), t.dtype) for t in big] == [((n_tokens, 128), torch.bfloat16)]
    assert sum(t.numel() * t.element_size() for t in saved if t.numel() <= n_tokens) <= 32 * n_tokens
    (logp * weights).sum().backward()

    calls: list[bool] = []
    real_forward = lp_module._forward

    def spy(*args, keep_softmax, **kwargs):
        calls.append(keep_softmax)
        out = real_forward(*args, keep_softmax=keep_softmax, **kwargs)
        assert out[1][0].softmax is None or keep_softmax
        return out

    monkeypatch.setattr(lp_module, "_forward", spy)
    with torch.no_grad():
        no_grad_logp = vocab_parallel_logprobs(leaf, labels, chunk_size=4)
    frozen_logp = vocab_parallel_logprobs(logits, labels)  # logits do not require grad
    assert calls == [False, False]
    assert no_grad_logp.grad_fn is None and frozen_logp.grad_fn is None
    torch.testing.assert_close(no_grad_logp, logp.detach())
    torch.testing.assert_close(frozen_logp, logp.detach())


def test_minus_inf_logits_outside_the_label():
    # Masked vocabulary entries (e.g. padding ids) may be -inf; they get probability and gradient 0.
    logits, labels, weights = make_case(8, (2, 5), 32, torch.bfloat16)
    logits = logits.clone()
    logits[..., 20:] = float("-inf")
    labels = labels % 20
    got_logp, got_grad = ours(logits, labels, weights, 0.9, 3)
    assert torch.isfinite(got_logp).all() and torch.count_nonzero(got_grad[..., 20:]) == 0
    assert_matches(got_logp, got_grad, *reference(logits, labels, weights, 0.9), torch.bfloat16)


def test_second_backward_is_refused():
    logits, labels, _ = make_case(7, (2, 3), 16, torch.float32)
    leaf = logits.requires_grad_()
    loss = vocab_parallel_logprobs(leaf, labels).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_empty_token_set():
    leaf = torch.zeros(0, 5, 8, requires_grad=True)
    logp = vocab_parallel_logprobs(leaf, torch.zeros(0, 5, dtype=torch.long))
    assert logp.shape == (0, 5)
    logp.sum().backward()
    assert leaf.grad.shape == leaf.shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), "labels shape"),
        (dict(labels=torch.zeros(2, 3)), "labels must be an integer"),
        (dict(labels=torch.zeros(2, 3, dtype=torch.bool)), "labels must be an integer"),
        (dict(labels=torch.full((2, 3), -1)), r"labels must lie in \[0, 8\)"),
        (dict(labels=torch.full((2, 3), 8)), r"labels must lie in \[0, 8\)"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature=True), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=-3), "chunk_size"),
        (dict(chunk_size=2.5), "chunk_size"),
        (dict(chunk_size=True), "chunk_size"),
        (dict(logits=torch.zeros(2, 3, 8, dtype=torch.long)), "logits must be a floating"),
        (dict(logits=torch.zeros(2, 3, 0)), "logits must have a non-empty"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(kwargs, match):
    args = dict(logits=torch.zeros(2, 3, 8), labels=torch.zeros(2, 3, dtype=torch.long))
    args.update(kwargs)
    logits, labels = args.pop("logits"), args.pop("labels")
    with pytest.raises(ValueError, match=match):
        vocab_parallel_logprobs(logits, labels, **args)


# ----------------------------------------------------------------------------------------------- TP = 2

TP_CASES = [  # (dtype, temperature, chunk_size)
    (torch.float32, 1.0, None),
    (torch.float32, 0.6, 5),
    (torch.bfloat16, 1.0, 1),
    (torch.bfloat16, 1.7, 5),
    (torch.bfloat16, 0.8, None),
]
TP_SHAPE, TP_VOCAB = (3, 7), 80


def _tp_worker(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    import torch.distributed as dist

    shard = TP_VOCAB // world
    results = []
    for i, (dtype, temperature, chunk_size) in enumerate(TP_CASES):
        logits, labels, weights = make_case(100 + i, TP_SHAPE, TP_VOCAB, dtype)
        local = logits[..., rank * shard : (rank + 1) * shard]
        logp, grad = ours(local, labels, weights, temperature, chunk_size, tp_group=dist.group.WORLD)
        results.append((logp, grad))
    # A label outside [0, V) is refused on every rank even though each shard alone is smaller.
    try:
        vocab_parallel_logprobs(torch.zeros(2, shard), torch.tensor([0, TP_VOCAB]), tp_group=dist.group.WORLD)
    except ValueError as err:
        assert f"[0, {TP_VOCAB})" in str(err)
    else:
        raise AssertionError("label == V was accepted")
    return results


@pytest.mark.timeout(150)
def test_tp2_matches_log_softmax_on_gathered_logits():
    per_rank = run_ranks(_tp_worker, 2, timeout=120)
    for i, (dtype, temperature, _) in enumerate(TP_CASES):
        logits, labels, weights = make_case(100 + i, TP_SHAPE, TP_VOCAB, dtype)
        # Both shards must be exercised: the labels hit each half of the vocabulary.
        assert (labels < TP_VOCAB // 2).any() and (labels >= TP_VOCAB // 2).any()
        ref_logp, ref_grad = reference(logits, labels, weights, temperature)
        (logp0, grad0), (logp1, grad1) = per_rank[0][i], per_rank[1][i]
        torch.testing.assert_close(logp0, logp1, rtol=0, atol=0)  # replicated bit-for-bit
        assert_matches(logp0, torch.cat([grad0, grad1], dim=-1), ref_logp, ref_grad, dtype)


# ------------------------------------------------------------------------------ padded vocabulary
def padded_reference(logits, labels, weights, temperature, vocab_size):
    """log_softmax over the real ids only (what the unpadded HF model computes); padded columns get 0 grad."""
    leaf = logits.detach().float().requires_grad_()
    logp = torch.log_softmax(leaf[..., :vocab_size] / temperature, -1).gather(-1, labels[..., None]).squeeze(-1)
    (logp * weights).sum().backward()
    return logp.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_padded_vocab_rows_are_left_out(dtype, chunk_size):
    logits, _, weights = make_case(7, (4, 5), 96, dtype)
    labels = torch.randint(0, 70, (4, 5), generator=torch.Generator().manual_seed(1))
    leaf = logits.detach().clone().requires_grad_()
    logp = vocab_parallel_logprobs(leaf, labels, temperature=0.9, chunk_size=chunk_size, vocab_size=70)
    (logp * weights).sum().backward()
    ref_logp, ref_grad = padded_reference(logits, labels, weights, 0.9, 70)
    assert_matches(logp.detach(), leaf.grad, ref_logp, ref_grad, dtype)
    assert not leaf.grad[..., 70:].any()
    # Without vocab_size the padded columns take mass: the two answers differ.
    assert not torch.allclose(vocab_parallel_logprobs(logits, labels, temperature=0.9), ref_logp)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 70\)"):
        vocab_parallel_logprobs(logits, torch.full((4, 5), 80), vocab_size=70)
    with pytest.raises(ValueError, match="vocab_size 100 exceeds"):
        vocab_parallel_logprobs(logits, labels, vocab_size=100)


def _padded_tp_worker(rank: int, world: int, vocab_size: int):
    import torch.distributed as dist

    logits, _, weights = make_case(11, (3, 4), 64, torch.float32)
    labels = torch.randint(0, vocab_size, (3, 4), generator=torch.Generator().manual_seed(2))
    shard = 64 // world
    leaf = logits[..., rank * shard : (rank + 1) * shard].clone().requires_grad_()
    logp = vocab_parallel_logprobs(leaf, labels, tp_group=dist.group.WORLD, vocab_size=vocab_size)
    (logp * weights).sum().backward()
    return logp.detach(), leaf.grad


@pytest.mark.timeout(150)
@pytest.mark.parametrize("vocab_size", [50, 20])  # 20: the second shard (ids 32..63) is all padding
def test_tp2_padded_vocab_matches_the_unpadded_softmax(vocab_size):
    (lp0, g0), (lp1, g1) = run_ranks(_padded_tp_worker, 2, vocab_size, timeout=120)
    logits, _, weights = make_case(11, (3, 4), 64, torch.float32)
    labels = torch.randint(0, vocab_size, (3, 4), generator=torch.Generator().manual_seed(2))
    ref_logp, ref_grad = padded_reference(logits, labels, weights, 1.0, vocab_size)
    torch.testing.assert_close(lp0, lp1, rtol=0, atol=0)
    assert_matches(lp0, torch.cat([g0, g1], -1), ref_logp, ref_grad, torch.float32)
