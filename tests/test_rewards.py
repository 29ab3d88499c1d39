"""Rewards: math-verify answers, exact match, the toy reward and what a random policy scores on it, a Hugging
Face reward model against calling transformers directly, user functions by module:function, the factory's
specs, and non-finite rewards shown with their sample."""

from __future__ import annotations

import math
import random
import sys
import threading
import types

import pytest
import torch

from gift_megatron.data import PromptExample
from gift_megatron.rewards import RewardError, RewardFunction, RewardInput, build_reward, check_rewards


def S(response, answer, prompt="q", example=None):
    return RewardInput(prompt, response, answer, example)


# ------------------------------------------------------------------------------------------ math_verify
@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("so the result is \\boxed{1/2}", "0.5", 1.0),
        ("The answer is 42", "42", 1.0),
        ("The answer is 41", "42", 0.0),
        ("The answer is 41, not 42", "42", 0.0),
        ("\\boxed{2} and later 5", "2", 1.0),
        ("$\\frac{3}{4}$", "0.75", 1.0),
        ("\\boxed{x^2+1}", "\\boxed{1+x^2}", 1.0),
        ("first 3, then 7, so \\boxed{7}", "7", 1.0),
        ("we get \\boxed{8}", "\\frac{1}{2}", 0.0),
        ("no answer here", "7", 0.0),
        ("", "7", 0.0),
    ],
)
def test_math_verify(response, answer, expected):
    reward = build_reward("math_verify")
    assert isinstance(reward, RewardFunction)
    assert reward([S(response, answer)]) == [expected]


def test_math_verify_options_threads_and_missing_answer():
    assert build_reward("math_verify", correct=2, wrong=-1)([S("4", "4"), S("5", "4")]) == [2.0, -1.0]
    with pytest.raises(ValueError, match="timeout_seconds must be a whole number"):
        build_reward("math_verify", timeout_seconds=0.5)
    ex = PromptExample(prompt="2+2=", messages=None, answer=None, source="d.jsonl", line=4)
    with pytest.raises(RewardError, match=r"math_verify needs an 'answer' in every row: .*\(d.jsonl:4\)"):
        build_reward("math_verify")([S("4", None, "2+2=", ex)])
    # signal.alarm only works in the main thread: elsewhere the timeout is off (default) or an error.
    results = {}

    def score(name, **options):
        try:
            results[name] = build_reward("math_verify", **options)([S("\\boxed{1/2}", "0.5")])
        except Exception as exc:
            results[name] = exc

    for name, options in (("default", {}), ("strict", {"off_main_thread": "error"})):
        t = threading.Thread(target=score, args=(name,), kwargs=options)
        t.start()
        t.join()
    assert results["default"] == [1.0]
    assert isinstance(results["strict"], RuntimeError) and "outside the main thread" in str(results["strict"])


# ------------------------------------------------------------------------------------------ exact_match
def test_exact_match_options():
    assert build_reward("exact_match")([S("  Paris ", "paris"), S("Lyon", "paris")]) == [1.0, 0.0]
    assert build_reward("exact_match")([S("New   York", "new york")]) == [1.0]
    assert build_reward("exact_match", ignore_case=False)([S("Paris", "paris")]) == [0.0]
    assert build_reward("exact_match", normalize_whitespace=False)([S("New  York", "new york")]) == [0.0]
    fn = build_reward("exact_match", first_number=True)
    assert fn(
        [
            S("42, because 6*7", "42"),
            S("-3 it is", "-3"),
            S("about 1,234 m", "1234"),
            S("x = 0.5", "0.5"),
            S("7 or 42", "42"),
            S("none", "1"),
        ]
    ) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"reward exact_match: bad options \{'fuzzy': True\}.*accepted"):
        build_reward("exact_match", fuzzy=True)
    with pytest.raises(RewardError, match="exact_match needs an 'answer'"):
        build_reward("exact_match")([S("a", None)])


# ------------------------------------------------------------------------------------------ toy reward
def test_toy_reward_modes():
    toy = build_reward("toy")
    assert toy([S("12", "12"), S("9", "12"), S("x", "12"), S("30", "12"), S(" 12 1", "12"), S("", "3")]) == [
        1.0,
        pytest.approx(0.7),
        0.0,
        0.0,
        1.0,
        0.0,
    ]
    exact = build_reward("toy", mode="exact")
    assert exact([S("12", "12"), S("12+", "12"), S("1", "12"), S("123", "12")]) == [1.0, 1.0, 0.0, 0.0]
    first = build_reward("toy", mode="exact", max_digits=1)  # add_mod10: only the first character counts
    assert first([S("73", "7"), S(" 7+", "7"), S("37", "7")]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="mode must be 'graded' or 'exact'"):
        build_reward("toy", mode="fuzzy")
    with pytest.raises(ValueError, match="max_digits must be a whole number"):
        build_reward("toy", max_digits=0)
    with pytest.raises(RewardError, match="answer must be an integer"):
        toy([S("1", "one")])


def random_policy_reward(task: str, vocab: int, n: int = 3000, max_tokens: int = 3, **options) -> float:
    """Mean toy reward of a policy that samples token ids uniformly (as a randomly initialized model roughly
    does) for up to ``max_tokens`` tokens or until EOS, decoded the way the trainer decodes responses."""
    from gift_megatron.data import Tokenizer
    from gift_megatron.data.toy import build_tokenizer, toy_rows

    tok = Tokenizer(build_tokenizer(), "hf")
    rng = random.Random(0)
    samples = []
    for row in toy_rows(n, seed=5, task=task):
        ids = []
        for _ in range(max_tokens):
            t = rng.randrange(vocab)
            if t == tok.eos_id:
                break
            ids.append(t)
        samples.append(S(tok.decode(ids), row["answer"], row["prompt"]))
    return sum(build_reward("toy", **options)(samples)) / n


@pytest.mark.parametrize("vocab", [17, 32])  # the toy tokenizer's ids; the demo model's 32 embedding rows
@pytest.mark.parametrize(
    "task, options, low, high",
    [
        ("add", {}, 0.10, 0.30),  # the demo's reward: about 0.15-0.2
        ("add_mod10", {"mode": "exact", "max_digits": 1}, 0.04, 0.09),  # about 1 in 17
        ("add_mod10", {}, 0.15, 0.35),
        ("add", {"mode": "exact"}, 0.01, 0.04),  # too sparse for the 10-minute CPU demo
    ],
)
def test_a_random_policy_scores_low_but_not_zero(task, options, low, high, vocab):
    # The signal RL starts from: well above zero (a random policy finds rewarded responses), well below 1.
    assert low < random_policy_reward(task, vocab, **options) < high


def test_the_correct_answers_score_one():
    from gift_megatron.data.toy import toy_rows

    for task in ("add", "add_mod10"):
        rows = toy_rows(50, seed=1, task=task)
        for options in ({}, {"mode": "exact"}, {"mode": "exact", "max_digits": 2}):
            toy = build_reward("toy", **options)
            assert toy([S(r["expert"], r["answer"]) for r in rows]) == [1.0] * 50
            assert toy([S(r["teachers"][1], r["answer"]) for r in rows]) != [1.0] * 50


# ------------------------------------------------------------------------------------------ user functions
@pytest.fixture
def user_module(monkeypatch):
    mod = types.ModuleType("my_rewards")
    mod.batch = lambda samples, bonus=0.0: [len(s.response) + bonus for s in samples]
    mod.single = lambda prompt, response, answer: float(response == answer)
    mod.broken = lambda prompt, response, answer: 1 / 0
    mod.scalar = lambda samples: 1.0
    mod.Scorer = type("Scorer", (), {"score": staticmethod(lambda samples: [0.0] * len(samples))})
    mod.value = 3
    monkeypatch.setitem(sys.modules, "my_rewards", mod)
    return mod


def test_user_function_batch_and_per_sample(user_module):
    assert build_reward("my_rewards:batch", bonus=0.5)([S("ab", None), S("", None)]) == [2.5, 0.5]
    assert build_reward("my_rewards:single", per_sample=True)([S("a", "a"), S("b", "a")]) == [1.0, 0.0]
    assert build_reward("my_rewards:Scorer.score")([S("a", None)]) == [0.0]


def test_user_function_errors_name_the_spec(user_module):
    with pytest.raises(ValueError, match="reward my_rewards:nope: module 'my_rewards' has no attribute 'nope'"):
        build_reward("my_rewards:nope")
    with pytest.raises(ValueError, match="'value' is not callable"):
        build_reward("my_rewards:value")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        build_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="unknown reward 'verifier'; choose one of"):
        build_reward("verifier")
    with pytest.raises(RewardError, match=r"reward my_rewards:broken failed \(ZeroDivisionError.*response='b'"):
        build_reward("my_rewards:broken", per_sample=True)([S("b", "a")])
    with pytest.raises(RewardError, match="reward my_rewards:single failed on a batch of 1 samples"):
        build_reward("my_rewards:single")([S("b", "a")])  # a per-sample function called in batch mode
    with pytest.raises(RewardError, match="my_rewards:scalar returned float.*per_sample"):
        build_reward("my_rewards:scalar")([S("b", "a")])


def test_user_function_from_a_file(tmp_path):
    (tmp_path / "scores.py").write_text(
        "def length(samples, scale=1.0):\n    return [scale * len(s.response) for s in samples]\n"
    )
    assert build_reward(f"{tmp_path / 'scores.py'}:length", scale=2)([S("abc", None)]) == [6.0]
    (tmp_path / "broken.py").write_text("raise RuntimeError('no config')\n")
    with pytest.raises(ValueError, match=r"broken.py:f: importing .* failed: RuntimeError: no config"):
        build_reward(f"{tmp_path / 'broken.py'}:f")
    with pytest.raises(ValueError, match="no such file"):
        build_reward(f"{tmp_path / 'missing.py'}:f")


def test_spec_forms(user_module):
    assert build_reward({"name": "exact_match", "options": {"first_number": True}})([S("4 apples", "4")]) == [1.0]
    assert build_reward({"name": "toy", "mode": "exact"})([S("5", "4")]) == [0.0]
    assert build_reward({"name": "my_rewards:batch"}, bonus=1.0)([S("", None)]) == [1.0]
    assert build_reward(lambda samples: [0.25] * len(samples))([S("", None)]) == [0.25]
    with pytest.raises(ValueError, match="needs a 'name'"):
        build_reward({"options": {}})
    with pytest.raises(ValueError, match="the path is empty"):
        build_reward("reward_model:")


# ------------------------------------------------------------------------------------------ check_rewards
def test_non_finite_rewards_show_the_sample():
    ex = PromptExample(prompt="2+2=", messages=None, answer="4", source="data/train.jsonl", line=17)
    samples = [RewardInput("2+2=", "4", "4", ex), RewardInput("2+2=", "five" * 200, "4", ex)]
    assert check_rewards([1, torch.tensor(0.5)], samples) == [1.0, 0.5]
    with pytest.raises(RewardError) as err:
        check_rewards([1.0, math.nan], samples, reward="my:fn")
    msg = str(err.value)
    assert msg.startswith("reward my:fn: reward 1 is nan (non-finite)")
    assert "prompt='2+2='" in msg and "data/train.jsonl:17" in msg and "answer='4'" in msg and "value=nan" in msg
    assert "'fivefive" in msg and "... (800 chars)" in msg and len(msg) < 600  # the response is truncated
    with pytest.raises(RewardError, match="reward 0 is inf"):
        check_rewards([math.inf, 1.0], samples)
    with pytest.raises(RewardError, match="returned 1 values for 2 samples"):
        check_rewards([1.0], samples)
    with pytest.raises(RewardError, match="reward 0 is 'x', not a number"):
        check_rewards(["x", 1.0], samples)
    with pytest.raises(RewardError, match="returned float, not a list"):
        check_rewards(1.0, samples)


# ------------------------------------------------------------------------------------------ reward model
def tiny_reward_model(path, pad_token_id, chat_template=None):
    """A random 1-layer Llama scorer over the toy tokenizer, saved to ``path`` (no download)."""
    transformers = pytest.importorskip("transformers")
    from gift_megatron.data.toy import build_tokenizer

    tok = build_tokenizer()
    if chat_template:
        tok.chat_template = chat_template
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=pad_token_id,
    )
    model = transformers.LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.mark.parametrize("pad_token_id", [0, None])  # the config names the pad id, or leaves it to us
def test_reward_model_matches_transformers(tmp_path, pad_token_id):
    model, tok = tiny_reward_model(tmp_path / "rm", pad_token_id)
    rm = build_reward(f"reward_model:{tmp_path / 'rm'}", batch_size=2, device="cpu")
    samples = [S("12", None, "5+7="), S("3", None, "1+2="), S("1", None, "9+9="), S("", None, "0+0=")]
    got = rm(samples)
    assert len(got) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in got)
    with torch.no_grad():  # one unpadded sequence at a time: no padding logic shared with the code under test
        want = [model(torch.tensor([tok.encode(s.prompt + s.response)])).logits[0, 0].item() for s in samples]
    assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="cannot load it"):
        build_reward(f"reward_model:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="dtype 'float33' is not a torch dtype"):
        build_reward(f"reward_model:{tmp_path / 'rm'}", dtype="float33")
    with pytest.raises(ValueError, match="bad options"):
        build_reward(f"reward_model:{tmp_path / 'rm'}", temperature=1.0)


def test_reward_model_chat_formatting(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}={% endfor %}"
    model, tok = tiny_reward_model(tmp_path / "rm", 0, chat_template=template)
    rm = build_reward({"name": f"reward_model:{tmp_path / 'rm'}", "options": {"device": "cpu", "batch_size": 3}})
    chat_row = PromptExample(prompt=None, messages=(("system", "0"), ("user", "1+2")), answer="3")
    samples = [S("3", None, "1+2", chat_row), S("45", None, "4+4"), S("1", None, "9+9")]
    # The row's whole chat (system turn included) and the response as the assistant turn.
    texts = ["0=1+2=3=", "4+4=45=", "9+9=1="]
    assert [rm.format(s) for s in samples] == texts
    with torch.no_grad():
        want = [model(torch.tensor([tok.encode(t)])).logits[0, 0].item() for t in texts]
    assert rm(samples) == pytest.approx(want, abs=1e-5)
    plain = build_reward(f"reward_model:{tmp_path / 'rm'}", chat_template=False, device="cpu")
    assert plain.format(samples[1]) == "4+445"
