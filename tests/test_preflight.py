"""What a user hits in the first hour, checked before anything runs: a converted checkpoint's architecture,
paths, reward names and objective options (gift-megatron validate and the launchers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from gift_megatron.config import ConfigError, check_inputs, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A conversion record as tools/convert_hf_to_megatron.py writes it (only model_config is read here).
RECORD = {
    "family": "qwen2",
    "num_layers": 2,
    "hidden_size": 64,
    "ffn_hidden_size": 128,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "kv_channels": None,
    "vocab_size": 1000,
    "max_position_embeddings": 256,
    "seq_length": 512,
    "rotary_base": 1000000.0,
    "rope_scaling_factor": None,
    "norm_epsilon": 1e-6,
    "add_qkv_bias": True,
    "qk_layernorm": False,
    "tie_embeddings": True,
    "make_vocab_size_divisible_by": 128,
}
BASE = {
    "data": {"max_prompt_tokens": 16},
    "rollout": {"n": 4, "max_tokens": 8},
    "train": {"prompts_per_step": 8, "micro_batch_size": 4},
}


def converted_root(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "gift_conversion.json").write_text(json.dumps({"model_config": RECORD, "dtype": "bf16"}))
    return root


def write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_model_section_comes_from_the_conversion_record(tmp_path):
    root = converted_root(tmp_path)
    cfg = load_config(write(tmp_path, {**BASE, "init": {"checkpoint": str(root)}, "model": {"seq_length": 128}}))
    for key, value in RECORD.items():
        if key != "seq_length":
            assert getattr(cfg.model, key) == value, key
    assert cfg.model.seq_length == 128  # the run's own choice
    # A step directory below the root finds the record too.
    (root / "step_00000000").mkdir()
    cfg = load_config(
        write(tmp_path, {**BASE, "init": {"checkpoint": str(root / "step_00000000")}, "model": {"seq_length": 128}})
    )
    assert cfg.model.vocab_size == 1000


def test_model_section_contradicting_the_record_names_every_field(tmp_path):
    root = converted_root(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(
            write(
                tmp_path,
                {
                    **BASE,
                    "init": {"checkpoint": str(root)},
                    "model": {"seq_length": 128, "rotary_base": 10000, "norm_epsilon": 1e-5, "hidden_size": 64},
                },
            )
        )
    text = str(err.value)
    assert "model.rotary_base=10000 (checkpoint: 1000000.0)" in text
    assert "model.norm_epsilon=1e-05 (checkpoint: 1e-06)" in text
    assert "hidden_size" not in text  # agrees with the record
    assert "gift_conversion.json" in text
    # Equal values in another spelling (int vs float) are not a contradiction.
    load_config(
        write(
            tmp_path, {**BASE, "init": {"checkpoint": str(root)}, "model": {"seq_length": 128, "rotary_base": 1000000}}
        )
    )


def test_missing_checkpoint_and_seq_length_beyond_positions(tmp_path):
    # A path this machine does not see loads (a recipe names cluster paths); check_inputs reports it.
    cfg = load_config(
        write(
            tmp_path,
            {
                **BASE,
                "init": {"checkpoint": str(tmp_path / "nope")},
                "data": {
                    "max_prompt_tokens": 16,
                    "train_files": [str(tmp_path / "c.yaml")],
                    "tokenizer": str(tmp_path),
                },
            },
        )
    )
    with pytest.raises(ConfigError, match="init.checkpoint: .*no complete Megatron checkpoint"):
        check_inputs(cfg)
    root = converted_root(tmp_path)
    with pytest.raises(ConfigError, match=r"model.seq_length \(512\) exceeds model.max_position_embeddings \(256\)"):
        load_config(write(tmp_path, {**BASE, "init": {"checkpoint": str(root)}}))


def test_switching_objective_on_the_command_line_says_how_to_reset_options(tmp_path):
    data = {**BASE, "model": {"seq_length": 64}, "objective": {"name": "gift", "options": {"beta": 0.5}}}
    with pytest.raises(ConfigError, match=r"unknown option 'beta'.*objective.options=\{\}"):
        load_config(write(tmp_path, data), ["objective.name=grpo"])
    assert load_config(write(tmp_path, data), ["objective.name=grpo", "objective.options={}"]).objective.name == "grpo"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from gift_megatron.data.toy import write_toy_task

    out = tmp_path_factory.mktemp("toy")
    write_toy_task(str(out), num_train=16, num_eval=4, seed=0)
    return str(out)


def toy_overrides(task):
    return [
        f"data.train_files=[{task}/train.jsonl]",
        f"data.eval_files=[{task}/eval.jsonl]",
        f"data.tokenizer={task}/tokenizer",
    ]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.train_files=[/nonexistent/train.jsonl]", "data.train_files: /nonexistent/train.jsonl does not exist"),
        ("data.eval_files=[/nonexistent/eval.jsonl]", "data.eval_files: /nonexistent/eval.jsonl does not exist"),
        ("data.tokenizer=/nonexistent/tok", "data.tokenizer: /nonexistent/tok does not exist"),
        ("reward.name=math_verfy", "unknown reward 'math_verfy'"),
        ("reward.options={strictness: 2}", "bad options"),
        ("reward.name=reward_model:/nonexistent/rm", "is not a model folder"),
        ("reward.name=nosuchpkg.mod:fn", "cannot import module 'nosuchpkg.mod'"),
    ],
)
def test_inputs_checked_before_launch(toy, override, expected):
    config = os.path.join(ROOT, "examples", "tiny_cpu_gift.yaml")
    cfg = load_config(config, toy_overrides(toy) + [override])
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        check_inputs(cfg)
    check_inputs(load_config(config, toy_overrides(toy)))  # the same config without the fault passes


def test_validate_cli_takes_overrides_after_options_and_checks_inputs(toy):
    config = os.path.join(ROOT, "examples", "tiny_cpu_gift.yaml")

    def validate(*words):
        return subprocess.run(
            [sys.executable, "-m", "gift_megatron.cli", "validate", config, *words],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = validate(*toy_overrides(toy), "--world-size", "2", "optimizer.lr=3e-4")
    assert ok.returncode == 0, ok.stderr
    assert "world_size" in ok.stdout
    bad = validate(*toy_overrides(toy), "--world-size", "2", "reward.name=math_verfy")
    assert bad.returncode == 2 and "unknown reward 'math_verfy'" in bad.stderr
    stray = validate(*toy_overrides(toy), "--world-size", "2", "--bogus")
    assert stray.returncode == 2 and "unrecognized arguments: --bogus" in stray.stderr


def test_launchers_refuse_a_misspelled_reward_before_submitting(toy):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    try:
        from common import LaunchError, check_training_config
    finally:
        sys.path.pop(0)
    config = os.path.join(ROOT, "examples", "tiny_cpu_gift.yaml")
    with pytest.raises(LaunchError, match="unknown reward 'math_verfy'"):
        check_training_config(config, toy_overrides(toy) + ["reward.name=math_verfy"], 2, "nodes (1) x gpus (2)")
    assert check_training_config(config, toy_overrides(toy), 2, "nodes (1) x gpus (2)").reward.name == "toy"
