"""The model builder: shapes per family and TP size, forward contract, HF config mapping, errors, FP8 on GPU."""

from __future__ import annotations

import pytest
import torch

from gift_megatron.megatron.model import (
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    check_fp8_support,
)
from tests.multiproc import run_ranks

FAMILIES = {
    "llama": ModelConfig(family="llama", vocab_size=200, num_query_groups=2),
    "qwen2": ModelConfig(family="qwen2", vocab_size=200, add_qkv_bias=True),
    "qwen3": ModelConfig(family="qwen3", vocab_size=200, qk_layernorm=True, kv_channels=32),
    "tied": ModelConfig(family="llama", vocab_size=200, tie_embeddings=True),
}
FP32 = PrecisionConfig(dtype="fp32")


def build_worker(rank, world, tp, name):
    from gift_megatron.megatron.model import build_model
    from gift_megatron.parallel import destroy_model_parallel_cpu, initialize_model_parallel_cpu

    initialize_model_parallel_cpu(tp)
    try:
        cfg = FAMILIES[name]
        model = build_model(cfg, ParallelConfig(tensor_model_parallel_size=tp), FP32)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        tokens = torch.randint(0, cfg.vocab_size, (2, 8))
        logits = model(tokens, torch.arange(8)[None].expand(2, 8), None)
        return shapes, tuple(logits.shape)
    finally:
        destroy_model_parallel_cpu()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("tp", [1, 2])
def test_parameter_shapes_and_logits_contract(tp):
    for name, cfg in FAMILIES.items():
        shapes, logits = run_ranks(build_worker, tp, tp, name, timeout=150)[0]
        h, d, nq, nkv, f = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_query_groups,
            cfg.ffn_hidden_size,
        )
        V = cfg.padded_vocab_size(tp)
        assert V % (128 * tp) == 0 and V >= 200 and V - 200 < 128 * tp
        pre = "decoder.layers.0."
        assert shapes[pre + "self_attention.linear_qkv.weight"] == ((nq + 2 * nkv) * d // tp, h), name
        assert shapes[pre + "self_attention.linear_proj.weight"] == (h, nq * d // tp)
        assert shapes[pre + "mlp.linear_fc1.weight"] == (2 * f // tp, h)  # fused [gate; up]
        assert shapes[pre + "mlp.linear_fc2.weight"] == (h, f // tp)
        assert shapes["embedding.word_embeddings.weight"] == (V // tp, h)
        has_bias = pre + "self_attention.linear_qkv.bias" in shapes
        assert has_bias == (name == "qwen2"), name
        if has_bias:
            assert shapes[pre + "self_attention.linear_qkv.bias"] == ((nq + 2 * nkv) * d // tp,)
        assert (pre + "self_attention.q_layernorm.weight" in shapes) == (name == "qwen3")
        if name == "qwen3":
            assert shapes[pre + "self_attention.k_layernorm.weight"] == (d,)
        assert ("output_layer.weight" in shapes) == (name != "tied")
        # GPTModel without labels returns [b, s, V/tp]: what the log-prob code relies on
        assert logits == (2, 8, V // tp), (name, logits)


def test_from_hf_config_maps_transformers_configs():
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=300,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    m = ModelConfig.from_hf_config(llama)
    assert (m.family, m.num_layers, m.hidden_size, m.ffn_hidden_size) == ("llama", 3, 64, 160)
    assert (m.num_attention_heads, m.num_query_groups, m.vocab_size) == (8, 2, 300)
    assert m.rotary_base == 500000.0 and m.rope_scaling_factor == 8.0 and m.norm_epsilon == 1e-5
    assert not m.add_qkv_bias and not m.qk_layernorm and not m.tie_embeddings
    q2 = ModelConfig.from_hf_config(
        transformers.Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
            tie_word_embeddings=True,
        )
    )
    assert q2.family == "qwen2" and q2.add_qkv_bias and q2.tie_embeddings and not q2.qk_layernorm
    q3 = ModelConfig.from_hf_config(
        transformers.Qwen3Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=100,
        )
    )
    assert q3.family == "qwen3" and q3.qk_layernorm and not q3.add_qkv_bias and q3.head_dim == 32
    with pytest.raises(
        ValueError, match="unsupported Hugging Face model_type 'gpt2'; supported: .*llama.*qwen2.*qwen3"
    ):
        ModelConfig.from_hf_config(transformers.GPT2Config())


def test_layout_validation_errors_name_the_field():
    m = ModelConfig(
        num_layers=3, num_attention_heads=6, num_query_groups=3, hidden_size=96, ffn_hidden_size=96, seq_length=30
    )
    P = ParallelConfig
    with pytest.raises(ValueError, match="world size 6 is not divisible"):
        P(tensor_model_parallel_size=4).validate(6, m)
    with pytest.raises(ValueError, match="does not divide model.num_attention_heads"):
        P(tensor_model_parallel_size=4).validate(8, m)
    with pytest.raises(ValueError, match="does not divide model.num_query_groups"):
        P(tensor_model_parallel_size=2).validate(
            2, ModelConfig(num_attention_heads=6, num_query_groups=3, hidden_size=96)
        )
    with pytest.raises(ValueError, match="does not divide model.num_layers"):
        P(pipeline_model_parallel_size=2).validate(2, m)
    with pytest.raises(ValueError, match="seq_length \\(30\\) is not divisible by 2 x parallel.context_parallel_size"):
        P(context_parallel_size=2).validate(2, m)
    with pytest.raises(ValueError, match="sequence_parallel needs tensor_model_parallel_size > 1"):
        P(sequence_parallel=True).validate(1, m)
    assert P(tensor_model_parallel_size=3).validate(6, m) == 2
    with pytest.raises(
        ValueError, match="model.num_attention_heads \\(6\\) must be a multiple of model.num_query_groups"
    ):
        ModelConfig(num_attention_heads=6, num_query_groups=4)
    with pytest.raises(ValueError, match="model.family"):
        ModelConfig(family="gpt2")


def test_precision_and_fp8_support_errors():
    with pytest.raises(ValueError, match="precision.dtype"):
        PrecisionConfig(dtype="fp64")
    with pytest.raises(ValueError, match="precision.fp8_recipe"):
        PrecisionConfig(fp8="e4m3", fp8_recipe="nvfp4")
    with pytest.raises(ValueError, match="precision.fp8 must be"):
        PrecisionConfig(fp8="e5m2")
    with pytest.raises(ValueError, match="needs dtype bf16 or fp16"):
        PrecisionConfig(dtype="fp32", fp8="e4m3")
    check_fp8_support(PrecisionConfig())  # no FP8: nothing to check
    check_fp8_support(PrecisionConfig(fp8="e4m3"), capability=(9, 0))
    check_fp8_support(PrecisionConfig(fp8="hybrid", fp8_recipe="blockwise"), capability=(9, 0))
    check_fp8_support(PrecisionConfig(fp8="e4m3", fp8_recipe="mxfp8"), capability=(10, 0))
    with pytest.raises(
        RuntimeError, match="'mxfp8' needs compute capability >= 10.0, the GPU found has compute capability 9.0"
    ):
        check_fp8_support(PrecisionConfig(fp8="e4m3", fp8_recipe="mxfp8"), capability=(9, 0))
    with pytest.raises(RuntimeError, match="'blockwise' needs compute capability >= 9.0"):
        check_fp8_support(PrecisionConfig(fp8="e4m3", fp8_recipe="blockwise"), capability=(8, 9))
    with pytest.raises(RuntimeError, match="for Hopper \\(9.x\\) only"):
        check_fp8_support(PrecisionConfig(fp8="e4m3", fp8_recipe="blockwise"), capability=(10, 0))
    with pytest.raises(RuntimeError, match="'delayed' needs compute capability >= 8.9"):
        check_fp8_support(PrecisionConfig(fp8="e4m3"), capability=(8, 0))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            check_fp8_support(PrecisionConfig(fp8="e4m3"))


def gpu_fp8_worker(rank, world, precision):
    from megatron.core import parallel_state

    from gift_megatron.megatron.model import build_model

    parallel_state.initialize_model_parallel(1, 1)
    try:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
        cfg = ModelConfig(
            family="qwen3",
            hidden_size=256,
            ffn_hidden_size=512,
            num_attention_heads=4,
            num_query_groups=2,
            vocab_size=1024,
            seq_length=128,
            qk_layernorm=True,
        )
        model = build_model(cfg, ParallelConfig(), precision)
        import transformer_engine.pytorch as te

        assert not isinstance(model.output_layer, te.module.base.TransformerEngineBaseModule)
        tokens = torch.randint(0, 1024, (4, 128), device="cuda")
        pos = torch.arange(128, device="cuda")[None].expand(4, 128)
        from megatron.core.fp8_utils import get_fp8_context

        with get_fp8_context(model.config):
            logits = model(tokens, pos, None)
        loss = torch.log_softmax(logits.float(), -1).mean()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return float(loss), all(torch.isfinite(g).all().item() for g in grads), str(logits.dtype)
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "precision",
    [
        PrecisionConfig(dtype="bf16"),
        PrecisionConfig(fp8="e4m3"),
        PrecisionConfig(fp8="hybrid", fp8_recipe="tensorwise"),
    ],
    ids=["bf16", "fp8-e4m3-delayed", "fp8-hybrid-tensorwise"],
)
def test_transformer_engine_bf16_and_fp8_train_step(precision):
    """On a GPU: the TE spec builds and runs forward+backward in BF16 and FP8 with finite gradients."""
    pytest.importorskip("transformer_engine")
    try:
        check_fp8_support(precision)
    except RuntimeError as e:
        pytest.skip(str(e))
    loss, finite, dtype = run_ranks(gpu_fp8_worker, 1, precision, timeout=250, backend="nccl")[0]
    assert torch.isfinite(torch.tensor(loss)) and finite
    assert dtype == "torch.bfloat16"
