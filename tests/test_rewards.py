"""Rewards: math-verify answers, exact match, the toy reward, a Hugging Face reward model against calling
transformers directly, user functions by module:function, and non-finite rewards shown with their sample."""

from __future__ import annotations

import math
import random
import sys
import types

import pytest
import torch

from gift_megatron.data import PromptExample
from gift_megatron.rewards import RewardError, RewardInput, build_reward, check_rewards


def S(response, answer, prompt="q"):
    return RewardInput(prompt, response, answer)


@pytest.mark.parametrize("response, answer, expected", [
    ("so the result is \\boxed{1/2}", "0.5", 1.0),
    ("The answer is 42", "42", 1.0),
    ("The answer is 41", "42", 0.0),
    ("$\\frac{3}{4}$", "0.75", 1.0),
    ("\\boxed{x^2+1}", "\\boxed{1+x^2}", 1.0),
    ("no answer here", "7", 0.0),
])
def test_math_verify(response, answer, expected):
    assert build_reward("math_verify")([S(response, answer)]) == [expected]


def test_exact_match_options():
    assert build_reward("exact_match")([S("  Paris ", "paris"), S("Lyon", "paris")]) == [1.0, 0.0]
    assert build_reward("exact_match", ignore_case=False)([S("Paris", "paris")]) == [0.0]
    assert build_reward("exact_match", first_number=True)([S("42, because 6*7", "42"), S("-3 it is", "-3")]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="reward exact_match: bad options"):
        build_reward("exact_match", fuzzy=True)


def test_toy_reward_and_a_random_policy():
    from gift_megatron.data.toy import CHARS, toy_rows

    toy = build_reward("toy")
    assert toy([S("12", "12"), S("9", "12"), S("x", "12"), S("30", "12"), S(" 12 1", "12")]) == \
        [1.0, pytest.approx(0.7), 0.0, 0.0, 1.0]
    # A uniform random policy over the toy vocabulary gets a low but nonzero reward: room to learn.
    rng = random.Random(0)
    rows = toy_rows(400, seed=5)
    vocab = CHARS + ["<eos>"]
    samples = []
    for r in rows:
        text = "".join(rng.choice(vocab) for _ in range(3)).split("<eos>")[0]
        samples.append(S(text, r["answer"]))
    mean = sum(toy(samples)) / len(samples)
    assert 0.1 < mean < 0.4, mean


def test_user_function_batch_and_per_sample(monkeypatch):
    mod = types.ModuleType("my_rewards")
    mod.batch = lambda samples, bonus=0.0: [len(s.response) + bonus for s in samples]
    mod.single = lambda prompt, response, answer: float(response == answer)
    mod.value = 3
    monkeypatch.setitem(sys.modules, "my_rewards", mod)
    assert build_reward("my_rewards:batch", bonus=0.5)([S("ab", None), S("", None)]) == [2.5, 0.5]
    assert build_reward("my_rewards:single", per_sample=True)([S("a", "a"), S("b", "a")]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        build_reward("my_rewards:nope")
    with pytest.raises(ValueError, match="'value' is not callable"):
        build_reward("my_rewards:value")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        build_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="unknown reward 'verifier'"):
        build_reward("verifier")


def test_non_finite_rewards_show_the_sample():
    ex = PromptExample(prompt="2+2=", messages=None, answer="4", source="data/train.jsonl", line=17)
    samples = [RewardInput("2+2=", "4", "4", ex), RewardInput("2+2=", "five", "4", ex)]
    assert check_rewards([1, 0.5], samples) == [1.0, 0.5]
    with pytest.raises(RewardError) as err:
        check_rewards([1.0, math.nan], samples)
    msg = str(err.value)
    assert "reward 1 is nan" in msg and "'five'" in msg and "data/train.jsonl:17" in msg and "answer='4'" in msg
    with pytest.raises(RewardError, match="returned 1 values for 2 samples"):
        check_rewards([1.0], samples)
    with pytest.raises(RewardError, match="reward 0 is 'x', not a number"):
        check_rewards(["x", 1.0], samples)


def test_reward_model_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gift_megatron.data.toy import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                                   pad_token_id=tok.pad_token_id)
    model = transformers.LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rm = build_reward(f"reward_model:{tmp_path / 'rm'}", batch_size=2, device="cpu")
    samples = [S("12", None, "5+7="), S("3", None, "1+2="), S("1", None, "9+9=")]
    got = rm(samples)
    assert len(got) == 3 and all(math.isfinite(v) for v in got)
    with torch.no_grad():  # one unpadded sequence at a time: no padding logic shared with the code under test
        want = [model(torch.tensor([tok.encode(s.prompt + s.response)])).logits[0, 0].item() for s in samples]
    assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="cannot load it"):
        build_reward(f"reward_model:{tmp_path / 'missing'}")
