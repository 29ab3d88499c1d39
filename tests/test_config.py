"""The YAML config loader: typed sections, dotted overrides, errors that name the key, world-size checks."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from gift_megatron.config import ConfigError, check_world_size, config_from_dict, load_config, save_config

BASE = {
    "model": {"seq_length": 64, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2},
    "data": {"max_prompt_tokens": 16},
    "rollout": {"n": 4, "max_tokens": 8},
    "train": {"prompts_per_step": 8, "micro_batch_size": 4},
}


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_and_overrides_typed(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        [
            "train.steps=7",
            "optimizer.lr=3e-4",
            "objective.name=grpo",
            "objective.options.kl_coef=0.1",
            "data.train_files=a.jsonl,b.jsonl",
            "run.tensorboard=false",
            "model.tie_embeddings=true",
        ],
    )
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optimizer.lr == pytest.approx(3e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.objective.name == "grpo" and cfg.objective.options == {"kl_coef": 0.1}
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.run.tensorboard is False and cfg.model.tie_embeddings is True
    assert cfg.model.seq_length == 64  # from the file


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["objective.options.beta=0.5"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trian.steps=3", "unknown key trian"),
        ("train.stpes=3", "unknown key train.stpes"),
        ("train.steps=three", "train.steps: expected an integer"),
        ("train.steps=2.5", "train.steps: expected an integer"),
        ("run.tensorboard=maybe", "run.tensorboard: expected true or false"),
        ("rollout.engine=sglang", "rollout.engine: must be one of"),
        ("model.num_layers=0", "model.num_layers must be >= 1"),
        ("objective.name=ppo", "objective.name: unknown objective 'ppo'"),
        ("objective.options.betta=1", "unknown option 'betta'"),
        ("rollout.n=1", "set rollout.n >= 2"),
        ("rollout.max_tokens=60", "exceeds model.seq_length"),
        ("train.steps", "expected key=value"),
        ("precision.fp8=e5m2", "precision.fp8 must be None or one of"),
    ],
)
def test_bad_keys_and_values_name_the_key(tmp_path, override, expected):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert expected in str(err.value)


def test_group_of_one_is_fine_for_sft_and_gft_counts_experts(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["objective.name=sft", "rollout.n=1"])
    assert cfg.group_composition() == (1, 0, 0)  # demonstrations only; rollouts feed the metrics
    with pytest.raises(ConfigError, match="a group has no trained member"):
        load_config(write(tmp_path, BASE), ["objective.name=dft", "groups.n_expert=0"])
    gft = load_config(write(tmp_path, BASE), ["objective.name=gft"])
    assert gft.group_composition() == (1, 3, 4)  # docs/objectives.md GFT defaults: 1 expert, 3 teachers
    gft1 = load_config(
        write(tmp_path, BASE), ["objective.name=gft", "rollout.n=1", "groups.n_teacher=0", "groups.n_expert=1"]
    )
    assert gft1.group_composition() == (1, 0, 1)


def test_world_size_checks_name_the_numbers(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["parallel.tensor_model_parallel_size=2"])
    assert check_world_size(cfg, 4) == 2
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible"):
        check_world_size(cfg, 3)
    bad_tp = load_config(write(tmp_path, BASE), ["parallel.tensor_model_parallel_size=8"])
    with pytest.raises(ConfigError, match=r"does not divide model.num_attention_heads"):
        check_world_size(bad_tp, 8)
    uneven = load_config(write(tmp_path, BASE), ["train.prompts_per_step=3"])
    with pytest.raises(ConfigError, match=r"prompts_per_step \(3\) must be a multiple of data-parallel size \(2\)"):
        check_world_size(uneven, 2)
    mbs = load_config(write(tmp_path, BASE), ["train.micro_batch_size=3"])
    with pytest.raises(ConfigError, match=r"not a multiple of train.micro_batch_size \(3\)"):
        check_world_size(mbs, 2)


QWEN2_HF = {
    # init.hf_config is read as checkpoint conversion reads it: `architectures` names the family.
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}


def test_model_from_hf_config_with_overrides(tmp_path):
    hf = dict(QWEN2_HF)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    cfg = config_from_dict({**BASE, "model": {"seq_length": 64}, "init": {"hf_config": str(tmp_path / "hf")}})
    assert (cfg.model.family, cfg.model.num_layers, cfg.model.add_qkv_bias, cfg.model.tie_embeddings) == (
        "qwen2",
        3,
        True,
        True,
    )
    assert cfg.model.seq_length == 64  # the file's model keys override the HF config
    with pytest.raises(ConfigError, match="init.hf_config: cannot read"):
        config_from_dict({**BASE, "init": {"hf_config": str(tmp_path / "missing")}})


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"mlp_bias": True}, "mlp_bias=true is not supported"),
        ({"use_sliding_window": True, "sliding_window": 32}, "sliding-window attention is not supported"),
    ],
)
def test_hf_config_refuses_what_conversion_refuses(tmp_path, extra, expected):
    """init.hf_config goes through the conversion's reader: a config.json it refuses cannot start a run either."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**QWEN2_HF, **extra}))
    yaml_file = write(tmp_path, {**BASE, "model": {"seq_length": 64}, "init": {"hf_config": str(tmp_path / "hf")}})
    with pytest.raises(ConfigError) as err:
        load_config(yaml_file)
    message = str(err.value)
    assert message.startswith(f"{yaml_file}: init.hf_config: ") and expected in message, message
    assert str(tmp_path / "hf" / "config.json") in message


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(listy)


RECIPES = [
    ("examples/qwen2.5-7b-gift.yaml", 8),
    ("examples/qwen2.5-32b-gift.yaml", 32),
    ("examples/qwen2.5-math-7b-gft.yaml", 8),
    ("examples/tiny_cpu_gift.yaml", 2),
    ("examples/qwen3-30b-a3b-gift.yaml", 32),
    ("examples/tiny_cpu_moe_gift.yaml", 2),
]


@pytest.mark.parametrize("path, world", RECIPES)
def test_recipes_load_validate_and_dry_run_their_layout(path, world):
    from gift_megatron.layout_plan import layout_plan

    cfg = load_config(path)
    plan = layout_plan(cfg, world)
    tp, pp, cp = plan["tp"], plan["pp"], plan["cp"]
    assert tp * pp * cp * plan["dp"] == world
    if world >= 8:  # the H100 recipes: model states must leave room for activations on an 80 GB GPU
        assert plan["train_states_gib"] < 40, plan


@pytest.mark.parametrize("path", [p for p, _ in RECIPES[:3]])
def test_recipe_parameter_count_matches_transformers(path):
    transformers = pytest.importorskip("transformers")
    import torch

    m = load_config(path).model
    hf = transformers.Qwen2Config(
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        vocab_size=m.vocab_size,
        tie_word_embeddings=m.tie_embeddings,
    )
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(hf)
    assert m.parameter_count() == sum(p.numel() for p in model.parameters())


# -- the colocated vLLM engine: keys, placement and the per-GPU memory plan ------------------------------------


def test_rollout_engine_keys_are_typed(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        [
            "rollout.kv_cache_bytes=8589934592",
            "rollout.enforce_eager=false",
            "rollout.sleep_level=1",
            "rollout.offload_training_states=false",
        ],
    )
    r = cfg.rollout
    assert (r.kv_cache_bytes, r.enforce_eager, r.sleep_level, r.offload_training_states) == (8 << 30, False, 1, False)
    d = load_config(write(tmp_path, BASE)).rollout
    # Defaults: level 2 (a weight update follows every wake), eager, offload decided by where the engine runs.
    assert (d.kv_cache_bytes, d.enforce_eager, d.sleep_level, d.offload_training_states) == (None, True, 2, None)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("rollout.sleep_level=3", "rollout.sleep_level must be 1"),
        ("rollout.kv_cache_bytes=0", "rollout.kv_cache_bytes must be > 0"),
        ("rollout.kv_cache_bytes=8GiB", "rollout.kv_cache_bytes: expected an integer"),
        ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization must be in (0, 1]"),
        ("rollout.enforce_eager=sometimes", "rollout.enforce_eager: expected true or false"),
    ],
)
def test_bad_rollout_engine_values_name_the_key(tmp_path, override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE), [override])
    assert expected in str(err.value)


def test_offload_default_follows_the_engine():
    from gift_megatron.config import TrainConfig, offload_enabled

    cfg = TrainConfig()
    assert offload_enabled(cfg, cuda=True) and not offload_enabled(cfg, cuda=False)
    cfg.rollout.engine = "hf"
    assert not offload_enabled(cfg, cuda=True)
    cfg.rollout.offload_training_states = True
    assert offload_enabled(cfg, cuda=False)


SEVEN_B = "examples/qwen2.5-7b-gift.yaml"


def test_7b_memory_plan_shows_the_engine_with_and_without_offload():
    from gift_megatron.layout_plan import layout_plan

    plan = layout_plan(load_config(SEVEN_B), 8)
    assert plan["rollout_gpus_of_first_replica"] == "0,1"
    assert plan["rollout_weights_gib"] == pytest.approx(7.09, abs=0.01)
    assert plan["rollout_engine_gib"] == pytest.approx(0.45 * 79.6)
    assert plan["rollout_kv_cache_gib"] == pytest.approx(
        plan["rollout_engine_gib"] - plan["rollout_weights_gib"] - plan["rollout_activations_gib"]
    )
    assert plan["rollout_kv_bytes_per_token"] == 2 * 28 * 2 * 128 * 2  # K and V, 28 layers, 4 KV heads / TP 2
    assert plan["offload_training_states"] is True
    assert plan["awake_trainer_gib_with_offload"] == plan["weights_gib"]
    assert plan["awake_trainer_gib_without_offload"] == plan["train_states_gib"]
    assert plan["generation_peak_gib"] == plan["generation_peak_gib_with_offload"] == pytest.approx(42.91, abs=0.01)
    assert plan["generation_peak_gib_without_offload"] == pytest.approx(67.74, abs=0.01)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["rollout.gpu_memory_utilization=0.95"],
            r"rollout.gpu_memory_utilization=0.95 \(75.6 GiB of a 79.6 GiB GPU\) leaves the trainer too little memory",
        ),
        (
            ["rollout.gpu_memory_utilization=0.6", "rollout.offload_training_states=false"],
            r"trainer holds weights, gradient buffers and optimizer state \(rollout.offload_training_states is off\).*"
            r"or set rollout.offload_training_states=true",
        ),
        (["rollout.kv_cache_bytes=75000000000"], r"rollout.kv_cache_bytes=75000000000 leaves the trainer too little"),
        (
            ["rollout.gpu_memory_utilization=0.1"],
            r"leaves the vLLM engine 0.0 GiB of KV cache.*raise "
            r"rollout.gpu_memory_utilization",
        ),
        (["rollout.kv_cache_bytes=1000000"], r"KV cache \(34 tokens, fewer than one model.seq_length=4096 sequence\)"),
        (["rollout.sleep_during_training=false"], r"rollout.sleep_during_training=false keeps the engine's 35.8 GiB"),
    ],
)
def test_memory_plan_refuses_budgets_that_leave_the_trainer_too_little(overrides, expected):
    from gift_megatron.layout_plan import layout_plan

    with pytest.raises(ConfigError, match=expected):
        layout_plan(load_config(SEVEN_B, overrides), 8)


def test_validate_cli_prints_the_plan_and_fails_on_a_bad_budget(capsys):
    from gift_megatron.cli import main

    # The recipe's checkpoint and data live on a cluster: --layout-only skips the path checks.
    assert main(["validate", SEVEN_B, "--world-size", "8"]) == 2
    assert "init.checkpoint" in capsys.readouterr().err
    assert main(["validate", SEVEN_B, "--world-size", "8", "--layout-only"]) == 0
    out = capsys.readouterr().out
    assert "rollout_kv_cache_gib" in out and re.search(r"generation_peak_gib_without_offload +67.74", out)
    assert main(["validate", SEVEN_B, "rollout.gpu_memory_utilization=0.95", "--world-size", "8", "--layout-only"]) == 2
    assert "leaves the trainer too little memory" in capsys.readouterr().err
    assert main(["validate", SEVEN_B, "rollout.tensor_parallel_size=4", "--world-size", "8", "--layout-only"]) == 2
    assert "rollout.tensor_parallel_size=4 does not fit" in capsys.readouterr().err


@pytest.mark.parametrize("path, world", [(SEVEN_B, 8), ("examples/qwen2.5-32b-gift.yaml", 32)])
def test_cluster_doc_shows_the_numbers_validate_prints(path, world):
    """docs/cluster.md quotes the memory plan of both recipes: it must stay what `validate` computes."""
    import os

    from gift_megatron.layout_plan import layout_plan

    plan = layout_plan(load_config(path), world)
    doc = open(
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "cluster.md"),
        encoding="utf-8",
    ).read()
    row = (
        f"**{plan['train_states_gib']:.1f} GiB** | ",
        f"**{plan['train_peak_gib']:.1f} GiB** | ",
        f"**{plan['generation_peak_gib_with_offload']:.1f} / {plan['generation_peak_gib_without_offload']:.1f} GiB**",
    )
    for text in row:
        assert text in doc, text
    engine = (
        f"{plan['rollout_weights_gib']:.1f} GiB of weights, ~{plan['rollout_activations_gib']:.1f} GiB of activations"
    )
    assert engine in doc and f"{plan['rollout_kv_cache_gib']:.1f} GiB of KV cache" in doc, engine
    assert f"({plan['rollout_engine_gib']:.1f} GiB)" in doc


def test_token_budget_keys(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_config(path, ["train.micro_batch_size=null", "train.micro_batch_tokens=128"])
    assert cfg.train.micro_batch_tokens == 128 and cfg.train.micro_batch_size is None
    assert (
        load_config(write(tmp_path, {k: v for k, v in BASE.items() if k != "train"}, "d.yaml")).train.micro_batch_size
        == 4
    )
    with pytest.raises(
        ConfigError,
        match=r"train.micro_batch_size \(4\) and train.micro_batch_tokens \(128\) are both "
        r"set.*train.micro_batch_size=null",
    ):
        load_config(path, ["train.micro_batch_tokens=128"])
    with pytest.raises(ConfigError, match=r"train.micro_batch_tokens \(130\) must be a positive multiple of 4"):
        load_config(
            path, ["train.micro_batch_size=null", "train.micro_batch_tokens=130", "parallel.context_parallel_size=2"]
        )
    with pytest.raises(
        ConfigError,
        match=r"train.micro_batch_tokens \(48\) is smaller than a member of "
        r"model.seq_length \(64\)",
    ):
        load_config(path, ["train.micro_batch_size=null", "train.micro_batch_tokens=48"])


def test_exponent_override_is_a_float(tmp_path):
    """OmegaConf's override grammar reads 3e-4 as a number (YAML 1.1, and so PyYAML, reads it as a string)."""
    cfg = load_config(write(tmp_path, BASE), ["objective.options.beta=3e-4"])
    beta = cfg.objective.options["beta"]
    assert beta == 3e-4 and isinstance(beta, float)


@pytest.mark.parametrize(
    "section, expected",
    [
        ({"train": {**BASE["train"], "steps": "many"}}, "train.steps: expected an integer, got 'many'"),
        ({"rollout": {**BASE["rollout"], "nn": 3}}, "unknown key rollout.nn (known keys of rollout: engine, n,"),
        ({"data": {**BASE["data"], "train_files": {"a": 1}}}, "data.train_files: expected a list, got dict"),
        ({"optimizer": {"lr_decay_style": "exp"}}, "optimizer.lr_decay_style: must be one of"),
        ({"train": 5}, "train: expected a mapping, got int 5"),
        ({"model": {**BASE["model"], "moe_layer_freq": ["x"]}}, "model.moe_layer_freq[0]: expected an integer"),
    ],
)
def test_bad_values_in_the_file_name_the_file_and_the_key(tmp_path, section, expected):
    path = write(tmp_path, {**BASE, **section})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {expected}"), str(err.value)


def test_empty_sections_and_list_overrides(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(BASE) + "run:\ninit:\n")
    cfg = load_config(path, ["data.eval_files=", "data.train_files=[a.jsonl]", "objective.options={}"])
    assert cfg.run.output_dir == "runs/default" and cfg.init.checkpoint is None
    assert cfg.data.eval_files == [] and cfg.data.train_files == ["a.jsonl"] and cfg.objective.options == {}


def _from_yaml_by_hand(path):
    """The TrainConfig of ``path`` built from its YAML sections with the dataclasses alone (no OmegaConf, no
    loader code): each section's keys passed to its class, ints and numeric strings given for float keys
    made floats."""
    import typing

    from gift_megatron.config import TrainConfig

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    hints = typing.get_type_hints(TrainConfig)
    sections = {}
    for name, values in data.items():
        fields = typing.get_type_hints(hints[name])
        sections[name] = hints[name](
            **{
                k: float(v) if float in (fields[k], *typing.get_args(fields[k])) and isinstance(v, (int, str)) else v
                for k, v in (values or {}).items()
            }
        )
    return TrainConfig(**sections)


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("path", sorted(p for p in os.listdir(EXAMPLES) if p.endswith(".yaml")))
def test_examples_load_to_exactly_their_yaml(path):
    """Every recipe loads into the TrainConfig its YAML spells out: same values, same types."""
    import dataclasses

    path = os.path.join(EXAMPLES, path)
    cfg, expected = load_config(path), _from_yaml_by_hand(path)
    assert cfg == expected
    assert json.dumps(dataclasses.asdict(cfg)) == json.dumps(dataclasses.asdict(expected))
