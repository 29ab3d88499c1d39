"""The CPU rollout engine against transformers' own model run teacher-forced (an independent computation)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gift_megatron.rollout import HFRolloutEngine, SamplingParams  # noqa: E402


def tiny_llama(seed, tie=False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def teacher_forced_logprobs(model, prompt, response, temperature=1.0):
    ids = torch.tensor([list(prompt) + response.tolist()])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, response[:, None])[:, 0]


def greedy_decode(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


PROMPTS = [[5, 9, 13], [7, 2, 40, 41, 3]]


def test_greedy_generation_and_logprobs_match_the_model():
    model = tiny_llama(0)
    rollouts = HFRolloutEngine(model).generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8))
    assert [r.prompt_index for r in rollouts] == [0, 1]
    worst = 0.0
    for r, prompt in zip(rollouts, PROMPTS):
        assert r.response_ids.tolist() == greedy_decode(model, prompt, 8)
        ref = teacher_forced_logprobs(model, prompt, r.response_ids)
        worst = max(worst, float((r.logprobs - ref).abs().max()))
    assert worst < 1e-5, worst


def test_sampled_logprobs_are_tempered_model_logprobs():
    model = tiny_llama(1)
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=6, seed=3)
    rollouts = HFRolloutEngine(model).generate(PROMPTS, params)
    assert len(rollouts) == 6 and [r.prompt_index for r in rollouts] == [0, 0, 0, 1, 1, 1]
    for r in rollouts:
        ref = teacher_forced_logprobs(model, PROMPTS[r.prompt_index], r.response_ids, 0.7)
        torch.testing.assert_close(r.logprobs, ref, rtol=1e-5, atol=1e-5)
    assert len({tuple(r.response_ids.tolist()) for r in rollouts}) > 1  # it really samples


@pytest.mark.parametrize("tie", [False, True])
def test_update_weights_makes_the_engine_generate_like_the_new_model(tie):
    engine = HFRolloutEngine(tiny_llama(2, tie))
    new = tiny_llama(3, tie)
    engine.update_weights((n, p.detach().clone()) for n, p in new.named_parameters())
    r = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert r.response_ids.tolist() == greedy_decode(new, PROMPTS[0], 8)
    torch.testing.assert_close(
        r.logprobs, teacher_forced_logprobs(new, PROMPTS[0], r.response_ids), rtol=1e-5, atol=1e-5
    )


def test_bad_input():
    engine = HFRolloutEngine(tiny_llama(4))
    with pytest.raises(ValueError, match="'model.norm.weight' has shape \\[3\\]"):
        engine.update_weights([("model.norm.weight", torch.ones(3))])
    with pytest.raises(ValueError, match="'model.nope' is not a parameter"):
        engine.update_weights([("model.nope", torch.ones(3))])
    with pytest.raises(ValueError, match="the stream had no tensor for"):
        engine.update_weights([("model.norm.weight", torch.ones(32))])
    with pytest.raises(ValueError, match="prompts\\[1\\] is empty"):
        engine.generate([[1], []], SamplingParams(max_tokens=2))
    for bad in (dict(n=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_tokens=0)):
        with pytest.raises(ValueError, match="sampling\\."):
            SamplingParams(**bad)


def test_seeded_generation_leaves_the_callers_random_stream_alone():
    engine = HFRolloutEngine(tiny_llama(5))
    params = SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=11)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = engine.generate(PROMPTS, params)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)
    again = engine.generate(PROMPTS, params)  # the seed alone fixes the samples
    assert [r.response_ids.tolist() for r in first] == [r.response_ids.tolist() for r in again]
