"""Mixture-of-Experts configuration: Hugging Face mapping, parameter counts against transformers, layout
validation errors, router-loss support per megatron-core version, and the pure helpers of megatron/moe.py."""

from __future__ import annotations

import pytest
import torch

from gift_megatron.megatron import moe
from gift_megatron.megatron.model import ModelConfig, ParallelConfig

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
)


def _transformers():
    return pytest.importorskip("transformers")


def hf_configs():
    t = _transformers()
    return {
        "qwen3_moe": t.Qwen3MoeConfig(
            **TINY,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            decoder_sparse_step=1,
        ),
        "qwen2_moe": t.Qwen2MoeConfig(
            **TINY,
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=40,
            norm_topk_prob=False,
            decoder_sparse_step=2,
        ),
        "mixtral": t.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True),
    }


def meta_parameter_count(hf_config) -> int:
    """Parameters of the transformers model built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


def test_from_hf_config_maps_the_three_moe_families():
    cfgs = hf_configs()
    q3 = ModelConfig.from_hf_config(cfgs["qwen3_moe"])
    assert (q3.family, q3.num_experts, q3.moe_router_topk, q3.moe_ffn_hidden_size) == ("qwen3_moe", 8, 2, 24)
    assert q3.ffn_hidden_size == 96 and q3.qk_layernorm and q3.head_dim == 32 and not q3.add_qkv_bias
    assert q3.moe_layer_freq == [0, 1, 1, 1]  # mlp_only_layers=[0]
    assert not q3.moe_router_pre_softmax  # norm_topk_prob=True renormalizes the top-k weights
    assert q3.moe_shared_expert_intermediate_size is None and not q3.moe_shared_expert_gate
    assert q3.moe_aux_loss_coeff == 0.0  # router_aux_loss_coef (0.001) is the run's choice, not copied
    q2 = ModelConfig.from_hf_config(cfgs["qwen2_moe"])
    assert (q2.family, q2.num_experts, q2.moe_router_topk, q2.moe_ffn_hidden_size) == ("qwen2_moe", 6, 3, 16)
    assert q2.moe_router_pre_softmax and q2.add_qkv_bias and not q2.qk_layernorm
    assert q2.moe_shared_expert_intermediate_size == 40 and q2.moe_shared_expert_gate
    assert q2.moe_layer_freq == [0, 1, 0, 1]  # decoder_sparse_step=2: layers 1 and 3
    mx = ModelConfig.from_hf_config(cfgs["mixtral"])
    assert (mx.family, mx.num_experts, mx.moe_router_topk, mx.moe_ffn_hidden_size) == ("mixtral", 4, 2, 96)
    assert mx.moe_layer_freq is None and not mx.moe_router_pre_softmax and mx.tie_embeddings


def test_both_expert_count_spellings_are_read():
    base = dict(
        model_type="qwen3_moe",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        moe_intermediate_size=24,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    )
    assert ModelConfig.from_hf_config({**base, "num_experts": 8}).num_experts == 8  # config.json on disk
    assert ModelConfig.from_hf_config({**base, "num_local_experts": 16}).num_experts == 16  # transformers 5 to_dict
    with pytest.raises(ValueError, match="no expert count"):
        ModelConfig.from_hf_config(base)


def test_unsupported_moe_architectures_list_the_supported_ones():
    for model_type in ("deepseek_v3", "qwen3_next", "gpt_oss"):
        with pytest.raises(ValueError) as err:
            ModelConfig.from_hf_config({"model_type": model_type, "hidden_size": 64})
        msg = str(err.value)
        assert "Mixture-of-Experts" in msg and repr(model_type) in msg
        assert "qwen3_moe" in msg and "qwen2_moe" in msg and "mixtral" in msg
    # an unknown model_type that has experts is named as an MoE architecture too
    with pytest.raises(ValueError, match="unsupported Mixture-of-Experts architecture.*'my_moe'"):
        ModelConfig.from_hf_config({"model_type": "my_moe", "n_routed_experts": 64})


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_parameter_count_equals_transformers_meta_model(family):
    hf = hf_configs()[family]
    assert ModelConfig.from_hf_config(hf).parameter_count() == meta_parameter_count(hf)


def test_qwen3_30b_a3b_recipe_parameter_count_equals_transformers():
    """The recipe's model section against Qwen3MoeForCausalLM built on the meta device from Qwen3-30B-A3B's
    architecture (its config.json values, written out here)."""
    from gift_megatron.config import load_config

    t = _transformers()
    hf = t.Qwen3MoeConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
    )
    cfg = load_config("examples/qwen3-30b-a3b-gift.yaml")
    assert cfg.model == ModelConfig.from_hf_config(hf, seq_length=cfg.model.seq_length)
    count = meta_parameter_count(hf)
    assert cfg.model.parameter_count() == count
    assert 30.0e9 < count < 31.0e9 and 3.2e9 < cfg.model.active_parameter_count() < 3.5e9  # "30B-A3B"


def test_moe_model_config_errors_name_the_key():
    moe_cfg = dict(family="qwen3_moe", num_experts=4)
    with pytest.raises(
        ValueError, match="model.family='qwen3_moe' is a Mixture-of-Experts family: set model.num_experts"
    ):
        ModelConfig(family="qwen3_moe")
    with pytest.raises(ValueError, match="model.num_experts=4 needs a Mixture-of-Experts model.family"):
        ModelConfig(family="qwen3", num_experts=4)
    with pytest.raises(ValueError, match="model.moe_router_topk must lie in \\[1, model.num_experts=4\\]"):
        ModelConfig(**moe_cfg, moe_router_topk=5)
    with pytest.raises(
        ValueError, match="model.moe_layer_freq must list 0 \\(dense\\) or 1 \\(MoE\\) for each of the 2"
    ):
        ModelConfig(**moe_cfg, moe_layer_freq=[1])
    with pytest.raises(ValueError, match="model.moe_aux_loss_coeff is set on a dense model"):
        ModelConfig(moe_aux_loss_coeff=0.01)
    with pytest.raises(
        ValueError, match="model.moe_shared_expert_gate needs model.moe_shared_expert_intermediate_size"
    ):
        ModelConfig(**moe_cfg, moe_shared_expert_gate=True)


def test_expert_layout_validation_errors_name_the_field():
    m = ModelConfig(
        family="qwen3_moe",
        num_experts=6,
        num_attention_heads=4,
        num_query_groups=2,
        hidden_size=64,
        moe_ffn_hidden_size=24,
    )
    P = ParallelConfig
    with pytest.raises(
        ValueError, match="parallel.expert_model_parallel_size \\(4\\) does not divide model.num_experts \\(6\\)"
    ):
        P(expert_model_parallel_size=4).validate(4, m)
    with pytest.raises(
        ValueError, match="with parallel.tensor_model_parallel_size=2 needs parallel.sequence_parallel=true"
    ):
        P(tensor_model_parallel_size=2).validate(2, m)
    with pytest.raises(ValueError, match="parallel.expert_model_parallel_size=2 needs a Mixture-of-Experts model"):
        P(expert_model_parallel_size=2).validate(2, ModelConfig())
    # world 6 = TP 2 x DP 3 is fine for attention, but ETP 2 x EP 2 x PP 1 = 4 does not divide it
    m8 = ModelConfig(
        family="qwen3_moe",
        num_experts=8,
        num_attention_heads=4,
        num_query_groups=2,
        hidden_size=64,
        moe_ffn_hidden_size=24,
    )
    with pytest.raises(
        ValueError,
        match="world size 6 is not divisible by expert tensor x expert x pipeline parallel sizes \\(2 x 2 x 1 = 4",
    ):
        P(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2).validate(6, m8)
    with pytest.raises(
        ValueError, match="parallel.expert_tensor_parallel_size \\(5\\) does not divide the expert width"
    ):
        P(expert_tensor_parallel_size=5).validate(5, m8)
    # what does fit: 8 ranks = TP 2 x DP 4; experts over EP 4 x ETP 1, or EP 2 x ETP 2 (ETP defaults to TP)
    assert (
        P(
            tensor_model_parallel_size=2,
            sequence_parallel=True,
            expert_model_parallel_size=4,
            expert_tensor_parallel_size=1,
        ).validate(8, m8)
        == 4
    )
    assert P(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2).validate(8, m8) == 4


def test_router_losses_are_refused_without_the_scale_hook(monkeypatch):
    """megatron-core 0.16 has no moe_grad_scale_func: non-zero coefficients are an error naming the keys, zero
    coefficients are fine. Checked on this megatron-core with the hook's absence simulated, and on 0.16 as is."""
    cfg = ModelConfig(family="qwen3_moe", num_experts=4, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)
    if moe.has_moe_grad_scale_func():
        moe.check_router_loss_support(cfg)  # 0.17+: supported
        monkeypatch.setattr(moe, "has_moe_grad_scale_func", lambda: False)
    with pytest.raises(ValueError) as err:
        moe.check_router_loss_support(cfg)
    assert "model.moe_aux_loss_coeff=0.01" in str(err.value) and "model.moe_z_loss_coeff=0.001" in str(err.value)
    assert "megatron-core >= 0.17" in str(err.value)
    moe.check_router_loss_support(ModelConfig(family="qwen3_moe", num_experts=4))
    # the model builder asks the same question before building anything
    from gift_megatron.megatron.model import PrecisionConfig, transformer_config

    with pytest.raises(ValueError, match="model.moe_aux_loss_coeff"):
        transformer_config(cfg, ParallelConfig(), PrecisionConfig(dtype="fp32"))


def test_router_loss_scale_is_members_times_cp_over_router_tokens():
    # 16 members of 32 tokens on 2 CP ranks: loss_func counts sum to 16 x 2 = 32 over the step, the routers
    # see 16 x 32 = 512 tokens, so the router losses must be multiplied by 32 / 512.
    assert moe.router_loss_scale(16 * 2, 16 * 32) == pytest.approx(1 / 16)
    with pytest.raises(ValueError, match="router_tokens must be > 0"):
        moe.router_loss_scale(4, 0)


def test_load_balance_metric():
    counts = torch.tensor(
        [
            [10.0, 10.0, 10.0, 10.0],  # perfectly balanced: 1
            [40.0, 0.0, 0.0, 0.0],  # one expert takes everything: E = 4
            [0.0, 0.0, 0.0, 0.0],
        ],  # no tokens: 0
        dtype=torch.float64,
    )
    assert moe.load_balance(counts).tolist() == [1.0, 4.0, 0.0]


def test_unequal_micro_batch_counts_are_an_error_only_with_expert_parallelism():
    moe.check_equal_micro_batch_counts([3, 3, 3], ep=2)
    moe.check_equal_micro_batch_counts([3, 2], ep=1)  # no all-to-all: ranks may differ
    with pytest.raises(RuntimeError, match="rank 0: 3, rank 1: 2"):
        moe.check_equal_micro_batch_counts([3, 2], ep=2)
