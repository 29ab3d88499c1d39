"""Build a Megatron-Core GPTModel for the families we target from typed configs.

Three small dataclasses, in the spirit of Megatron's TransformerConfig:

- :class:`ModelConfig`: the architecture (Llama-2/3, Qwen2/2.5, Qwen3 dense; Mixture-of-Experts Qwen3-MoE,
  Qwen2-MoE and Mixtral), with ``from_hf_config``;
- :class:`ParallelConfig`: TP / PP / CP / EP / ETP sizes and ``validate(world_size, model)``;
- :class:`PrecisionConfig`: bf16 / fp16 / fp32 and the FP8 options of Transformer Engine.

:func:`build_model` picks the layer spec (:func:`select_backend`): Transformer Engine's on a CUDA machine
that has TE (imported there and only there: installing TE on a CPU machine breaks ``import megatron.core``),
the local spec otherwise (CPU, or a GPU host without the optional TE install, with TE-only fusions off).

Mixture-of-Experts layers: Megatron's MoELayer (router, token dispatcher, experts). With TE, the experts are
TE grouped GEMMs (``moe_grouped_gemm``); on the local spec they are a ``SequentialMLP`` of ordinary
column/row-parallel linears (one per local expert), which is what runs on CPU. Only the local path has been
executed in this repository (on CPU); the TE grouped-GEMM path is Megatron's own spec, untested here.

FP8 scope: the transformer layers' linear layers run in FP8 inside Megatron's FP8 context; the output
layer is Megatron's plain ``tensor_parallel.ColumnParallelLinear`` in both supported megatron-core lines
(0.16, 0.19), not a TE module, so the logits and our fp32 log-probs never see FP8.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral")
FAMILIES = ("llama", "qwen2", "qwen3") + MOE_FAMILIES
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "qwen2_moe": "qwen2_moe",
    "mixtral": "mixtral",
}
# Hugging Face Mixture-of-Experts architectures we know and do not support (their routing or layers differ:
# DeepSeek's grouped routing with shared experts and MLA, Qwen3-Next's linear attention, gpt-oss's biased
# experts and attention sinks, ...). Named so that the error says "MoE" and lists what is supported.
UNSUPPORTED_MOE_MODEL_TYPES = (
    "deepseek_v2",
    "deepseek_v3",
    "qwen3_next",
    "gpt_oss",
    "granitemoe",
    "olmoe",
    "dbrx",
    "jamba",
    "phimoe",
    "minimax",
    "glm4_moe",
    "ernie4_5_moe",
    "llama4",
    "qwen3_vl_moe",
    "hunyuan_v1_moe",
    "bailing_moe",
    "dots1",
    "kimi_k2",
)
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
# Minimum compute capability per recipe. FP8 tensor cores arrive with Ada/Hopper (8.9); Transformer
# Engine 2.x implements blockwise scaling for Hopper only and MXFP8 for Blackwell (10.0+) only
# (TE's own recipe availability checks: check_fp8_block_scaling_support / check_mxfp8_support).
_RECIPE_CAPABILITY = {
    "delayed": ((8, 9), None),
    "tensorwise": ((8, 9), None),
    "blockwise": ((9, 0), (10, 0)),
    "mxfp8": ((10, 0), None),
}


@dataclass
class ModelConfig:
    """A decoder-only transformer, dense or Mixture-of-Experts.

    family: ``llama``, ``qwen2``, ``qwen3`` (dense) or ``qwen3_moe``, ``qwen2_moe``, ``mixtral``
        (Mixture-of-Experts): the Hugging Face layout the weights map to and from.
    num_layers: transformer layers. hidden_size: model width. ffn_hidden_size: SwiGLU inner width (of the
        dense layers; in a Mixture-of-Experts model the layers that moe_layer_freq marks dense).
    num_attention_heads: query heads. num_query_groups: KV heads (GQA; = num_attention_heads for MHA).
    kv_channels: head dimension (None: hidden_size // heads; Qwen3 sets it explicitly).
    vocab_size: the tokenizer's vocabulary; the model's is padded to a multiple of
        make_vocab_size_divisible_by x TP (as Megatron-LM does), see :meth:`padded_vocab_size`.
    make_vocab_size_divisible_by: the padding multiple of the embedding rows (times TP).
    max_position_embeddings: RoPE table length; seq_length: the training sequence length.
    rotary_base: RoPE theta. rope_scaling_factor: Llama-3.1 style RoPE scaling factor (None: off).
    norm_epsilon: RMSNorm epsilon. add_qkv_bias: Qwen2's biases on Q, K, V. qk_layernorm: Qwen3's RMSNorm
    on queries and keys. tie_embeddings: output layer shares the input embedding.

    num_experts: routed experts per MoE layer (0 = dense model; every moe_* key below then stays at its
        default).
    moe_router_topk: experts each token is routed to (Qwen3-30B-A3B: 8, Mixtral: 2).
    moe_ffn_hidden_size: SwiGLU inner width of one routed expert (None: ffn_hidden_size).
    moe_shared_expert_intermediate_size: SwiGLU width of the shared expert every token also goes through
        (Qwen2-MoE; None: no shared expert).
    moe_shared_expert_gate: the shared expert's output is scaled by sigmoid(x . w) (Qwen2-MoE).
    moe_router_pre_softmax: softmax over all experts, then top-k without renormalizing (Qwen2-MoE,
        ``norm_topk_prob: false``); False: the top-k weights sum to 1 (Qwen3-MoE, Mixtral).
    moe_layer_freq: per layer, 1 = MoE and 0 = dense (length num_layers; None: every layer is MoE). From
        Hugging Face ``mlp_only_layers`` / ``decoder_sparse_step``.
    moe_aux_loss_coeff: coefficient of the Switch load-balancing loss of the router (0: off). Hugging Face's
        ``router_aux_loss_coef`` is deliberately not copied: it is the pre-training value, and whether a
        post-training run balances its router is the run's choice (set it here).
    moe_z_loss_coeff: coefficient of the router z-loss (mean squared logsumexp of the router logits; 0: off).
    """

    family: str = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: int | None = None
    vocab_size: int = 128
    max_position_embeddings: int = 2048
    seq_length: int = 512
    rotary_base: float = 10000.0
    rope_scaling_factor: float | None = None
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    tie_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128
    num_experts: int = 0
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    moe_router_pre_softmax: bool = False
    moe_layer_freq: list[int] | None = None
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float = 0.0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model.family must be one of {FAMILIES}, got {self.family!r}")
        self._check_moe()
        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "vocab_size",
            "seq_length",
            "make_vocab_size_divisible_by",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_query_groups ({self.num_query_groups})"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set model.kv_channels"
            )

    def _check_moe(self) -> None:
        """Clear errors for Mixture-of-Experts fields that contradict each other (each names its key)."""
        if self.num_experts < 0:
            raise ValueError(f"model.num_experts must be >= 0 (0: dense model), got {self.num_experts}")
        moe_family = self.family in MOE_FAMILIES
        if moe_family and self.num_experts == 0:
            raise ValueError(f"model.family={self.family!r} is a Mixture-of-Experts family: set model.num_experts")
        if self.num_experts and not moe_family:
            raise ValueError(
                f"model.num_experts={self.num_experts} needs a Mixture-of-Experts model.family "
                f"({', '.join(MOE_FAMILIES)}), got {self.family!r}"
            )
        if not self.num_experts:
            moe_only = [
                k
                for k in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_layer_freq")
                if getattr(self, k) is not None
            ]
            moe_only += [
                k for k in ("moe_shared_expert_gate", "moe_aux_loss_coeff", "moe_z_loss_coeff") if getattr(self, k)
            ]
            if moe_only:
                raise ValueError(f"model.{moe_only[0]} is set on a dense model (model.num_experts=0)")
            return
        if not 1 <= self.moe_router_topk <= self.num_experts:
            raise ValueError(
                f"model.moe_router_topk must lie in [1, model.num_experts={self.num_experts}], "
                f"got {self.moe_router_topk}"
            )
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"model.{name} must be >= 1 (or null), got {value}")
        if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
            raise ValueError("model.moe_shared_expert_gate needs model.moe_shared_expert_intermediate_size")
        for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        freq = self.moe_layer_freq
        if freq is not None:
            if len(freq) != self.num_layers or any(v not in (0, 1) for v in freq):
                raise ValueError(
                    f"model.moe_layer_freq must list 0 (dense) or 1 (MoE) for each of the "
                    f"{self.num_layers} layers, got {freq}"
                )
            if not any(freq):
                raise ValueError(
                    "model.moe_layer_freq marks no layer as MoE: set model.num_experts=0 for a dense model"
                )

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        """Whether some layers are Mixture-of-Experts layers."""
        return self.num_experts > 0

    @property
    def expert_ffn_hidden_size(self) -> int:
        """SwiGLU inner width of one routed expert."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def moe_layers(self) -> list[bool]:
        """Per layer (0-based), whether it is a Mixture-of-Experts layer."""
        if not self.num_experts:
            return [False] * self.num_layers
        if self.moe_layer_freq is None:
            return [True] * self.num_layers
        return [bool(v) for v in self.moe_layer_freq]

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocabulary rows of the embedding and output layer: vocab_size rounded up to a multiple of
        make_vocab_size_divisible_by x tp, so every TP rank holds an equal contiguous shard."""
        m = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // m) * m

    def parameter_count(self) -> int:
        """Parameters of the unpadded model (embedding, layers, final norm, untied output layer).

        A MoE layer has the router (h x E, no bias), E routed SwiGLU experts of width moe_ffn_hidden_size and,
        for Qwen2-MoE, the shared expert and its gate (h); a dense layer has one SwiGLU of ffn_hidden_size.
        """
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.add_qkv_bias else 0) + (2 * d if self.qk_layernorm else 0)
        dense_mlp = 3 * h * self.ffn_hidden_size
        moe_mlp = h * self.num_experts + self.num_experts * 3 * h * self.expert_ffn_hidden_size
        if self.moe_shared_expert_intermediate_size:
            moe_mlp += 3 * h * self.moe_shared_expert_intermediate_size + (h if self.moe_shared_expert_gate else 0)
        layers = sum(attn + 2 * h + (moe_mlp if moe else dense_mlp) for moe in self.moe_layers())
        emb = self.vocab_size * h
        return layers + h + emb * (1 if self.tie_embeddings else 2)

    def active_parameter_count(self) -> int:
        """Parameters one token goes through: parameter_count() with top-k of the routed experts per MoE layer
        (Qwen3-30B-A3B: about 3.3 B of 30.5 B). Equals parameter_count() for a dense model."""
        unused = self.num_experts - self.moe_router_topk
        return (
            self.parameter_count()
            - sum(self.moe_layers()) * unused * 3 * self.hidden_size * self.expert_ffn_hidden_size
        )

    @classmethod
    def from_hf_config(cls, cfg: Any, **overrides: Any) -> ModelConfig:
        """The ModelConfig of a Hugging Face LlamaConfig / Qwen2Config / Qwen3Config, or of the
        Mixture-of-Experts Qwen3MoeConfig / Qwen2MoeConfig / MixtralConfig (object or dict).

        MoE keys read: the expert count under either spelling (``num_experts``, ``num_local_experts``:
        transformers 5 stores Qwen3-MoE's as the latter), ``num_experts_per_tok``, ``moe_intermediate_size``,
        ``shared_expert_intermediate_size`` (Qwen2-MoE, which always gates it), ``norm_topk_prob`` (False:
        pre-softmax routing; Mixtral always renormalizes), ``mlp_only_layers`` and ``decoder_sparse_step``
        (which layers are MoE, as transformers decides it). ``router_aux_loss_coef`` is not copied: the
        router-loss coefficients are the run's choice (``model.moe_aux_loss_coeff``, default 0).
        """
        c = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        model_type = c.get("model_type")
        supported_moe = ", ".join(MOE_FAMILIES)
        if model_type not in HF_MODEL_TYPES:
            experts = c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts")
            if model_type in UNSUPPORTED_MOE_MODEL_TYPES or experts:
                raise ValueError(
                    f"unsupported Mixture-of-Experts architecture: Hugging Face model_type "
                    f"{model_type!r}; supported MoE model_types: {supported_moe} (dense: "
                    f"{', '.join(sorted(k for k, v in HF_MODEL_TYPES.items() if v not in MOE_FAMILIES))})"
                )
            raise ValueError(
                f"unsupported Hugging Face model_type {model_type!r}; supported: {', '.join(sorted(HF_MODEL_TYPES))}"
            )
        family = HF_MODEL_TYPES[model_type]
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {c.get('hidden_act')!r} is not supported (SwiGLU with silu only)")
        rope = c.get("rope_scaling") or c.get("rope_parameters") or None
        factor = None
        if rope and rope.get("rope_type", rope.get("type")) not in (None, "default"):
            if rope.get("rope_type", rope.get("type")) != "llama3":
                raise ValueError(f"rope_scaling {rope} is not supported (only Llama-3 'llama3' scaling)")
            expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            for k, v in expected.items():
                if float(rope.get(k, v)) != v:
                    raise ValueError(f"rope_scaling.{k}={rope.get(k)} differs from Megatron-Core's fixed {v}")
            factor = float(rope["factor"])
        theta = c.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        fields = dict(
            family=family,
            num_layers=c["num_hidden_layers"],
            hidden_size=c["hidden_size"],
            ffn_hidden_size=c["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=c.get("num_key_value_heads") or heads,
            kv_channels=head_dim if head_dim != c["hidden_size"] // heads else None,
            vocab_size=c["vocab_size"],
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            rotary_base=float(theta),
            rope_scaling_factor=factor,
            norm_epsilon=c.get("rms_norm_eps", 1e-6),
            add_qkv_bias=(
                family == "qwen2"
                or (family == "qwen2_moe" and bool(c.get("qkv_bias", True)))
                or bool(c.get("attention_bias", False))
            ),
            qk_layernorm=family in ("qwen3", "qwen3_moe"),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        )
        if family in MOE_FAMILIES:
            fields.update(_hf_moe_fields(c, family))
        fields.update(overrides)
        return cls(**fields)


def _hf_moe_fields(c: dict[str, Any], family: str) -> dict[str, Any]:
    """ModelConfig MoE fields of a Hugging Face Qwen3-MoE / Qwen2-MoE / Mixtral config dict."""
    experts = c.get("num_experts") or c.get("num_local_experts")
    if not experts:
        raise ValueError(f"Hugging Face {family} config has no expert count (num_experts / num_local_experts)")
    layers = c["num_hidden_layers"]
    if family == "mixtral":
        # Every Mixtral layer is MoE; its experts are intermediate_size wide and top-k weights renormalized.
        return dict(
            num_experts=experts,
            moe_router_topk=c.get("num_experts_per_tok", 2),
            moe_ffn_hidden_size=c["intermediate_size"],
            moe_router_pre_softmax=False,
        )
    # Qwen2-MoE / Qwen3-MoE: transformers' rule for a sparse layer (Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer).
    dense_only = set(c.get("mlp_only_layers") or [])
    step = c.get("decoder_sparse_step", 1) or 1
    pattern = [int(i not in dense_only and (i + 1) % step == 0) for i in range(layers)]
    fields: dict[str, Any] = dict(
        num_experts=experts,
        moe_router_topk=c.get("num_experts_per_tok", 2),
        moe_ffn_hidden_size=c.get("moe_intermediate_size") or c["intermediate_size"],
        # norm_topk_prob False: softmax over all experts, top-k weights used as they are (pre-softmax in
        # Megatron's terms); True: the top-k weights are renormalized, which is a softmax over the top-k logits.
        moe_router_pre_softmax=not bool(c.get("norm_topk_prob", False)),
        moe_layer_freq=None if all(pattern) else pattern,
    )
    if family == "qwen2_moe" and c.get("shared_expert_intermediate_size"):
        fields.update(
            moe_shared_expert_intermediate_size=c["shared_expert_intermediate_size"], moe_shared_expert_gate=True
        )
    return fields


@dataclass
class ParallelConfig:
    """The model-parallel layout; data parallel is world_size / (tp x pp x cp).

    tensor_model_parallel_size: tp, ranks that split every layer's weights (keep it within a node).
    pipeline_model_parallel_size: pp, ranks that split the layers into stages.
    context_parallel_size: cp, ranks that split every sequence (Megatron's zig-zag split; for long sequences).
    sequence_parallel: shard activations along the sequence between TP regions; needs tp > 1 (Mixture-of-Experts
    models with tp > 1 require it). The TE spec uses TE's norms; the local spec gets a torch RMSNorm whose
    weight gradient is summed over TP (:class:`SequenceParallelRMSNorm`).
    expert_model_parallel_size: ep, ranks that split the routed experts of every MoE layer (must divide
    model.num_experts; carved out of the data-parallel x context-parallel x tensor-parallel ranks of a stage).
    expert_tensor_parallel_size: etp, ranks that split each expert's weights (None: Megatron's default, the
    tensor_model_parallel_size).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None

    @property
    def etp(self) -> int:
        """The expert tensor-parallel size Megatron uses (tensor_model_parallel_size when unset)."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def validate(self, world_size: int, model: ModelConfig) -> int:
        """Raise ValueError naming the field when this layout cannot run ``model`` on ``world_size`` ranks;
        return the data-parallel size."""
        tp, pp, cp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.context_parallel_size
        for name, v in (
            ("tensor_model_parallel_size", tp),
            ("pipeline_model_parallel_size", pp),
            ("context_parallel_size", cp),
        ):
            if v < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {v}")
        if world_size % (tp * pp * cp):
            raise ValueError(
                f"world size {world_size} is not divisible by tensor x pipeline x context parallel "
                f"sizes ({tp} x {pp} x {cp} = {tp * pp * cp})"
            )
        if model.num_attention_heads % tp:
            raise ValueError(
                f"parallel.tensor_model_parallel_size ({tp}) does not divide "
                f"model.num_attention_heads ({model.num_attention_heads})"
            )
        if model.num_query_groups % tp:
            raise ValueError(
                f"parallel.tensor_model_parallel_size ({tp}) does not divide "
                f"model.num_query_groups ({model.num_query_groups} KV heads)"
            )
        if model.ffn_hidden_size % tp:
            raise ValueError(
                f"parallel.tensor_model_parallel_size ({tp}) does not divide "
                f"model.ffn_hidden_size ({model.ffn_hidden_size})"
            )
        if model.num_layers % pp:
            raise ValueError(
                f"parallel.pipeline_model_parallel_size ({pp}) does not divide model.num_layers ({model.num_layers})"
            )
        if cp > 1 and model.seq_length % (2 * cp):
            raise ValueError(
                f"model.seq_length ({model.seq_length}) is not divisible by 2 x "
                f"parallel.context_parallel_size ({2 * cp})"
            )
        if self.sequence_parallel and tp == 1:
            raise ValueError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
        self._validate_experts(world_size, model)
        return world_size // (tp * pp * cp)

    def _validate_experts(self, world_size: int, model: ModelConfig) -> None:
        """The expert layout: EP divides the experts, MoE with TP > 1 has sequence parallelism, and the world
        splits into ETP x EP x PP as Megatron's ``initialize_model_parallel`` requires."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        ep, etp = self.expert_model_parallel_size, self.expert_tensor_parallel_size
        if ep < 1:
            raise ValueError(f"parallel.expert_model_parallel_size must be >= 1, got {ep}")
        if etp is not None and etp < 1:
            raise ValueError(f"parallel.expert_tensor_parallel_size must be >= 1 (or null), got {etp}")
        if not model.is_moe:
            if ep > 1:
                raise ValueError(
                    f"parallel.expert_model_parallel_size={ep} needs a Mixture-of-Experts model "
                    "(model.num_experts is 0)"
                )
            if etp is not None and etp != tp:
                raise ValueError(
                    f"parallel.expert_tensor_parallel_size={etp} needs a Mixture-of-Experts model "
                    "(model.num_experts is 0)"
                )
            return
        if model.num_experts % ep:
            raise ValueError(
                f"parallel.expert_model_parallel_size ({ep}) does not divide model.num_experts ({model.num_experts})"
            )
        if tp > 1 and not self.sequence_parallel:
            # Megatron-Core's MoE layer requires it: the token dispatcher splits tokens along the sequence.
            raise ValueError(
                f"a Mixture-of-Experts model with parallel.tensor_model_parallel_size={tp} needs "
                "parallel.sequence_parallel=true"
            )
        etp = self.etp
        if world_size % (etp * ep * pp):
            raise ValueError(
                f"world size {world_size} is not divisible by expert tensor x expert x pipeline "
                f"parallel sizes ({etp} x {ep} x {pp} = {etp * ep * pp}; "
                "parallel.expert_tensor_parallel_size defaults to tensor_model_parallel_size)"
            )
        if model.expert_ffn_hidden_size % etp:
            raise ValueError(
                f"parallel.expert_tensor_parallel_size ({etp}) does not divide the expert width "
                f"model.moe_ffn_hidden_size ({model.expert_ffn_hidden_size})"
            )
        shared = model.moe_shared_expert_intermediate_size
        if shared and shared % tp:
            raise ValueError(
                f"parallel.tensor_model_parallel_size ({tp}) does not divide "
                f"model.moe_shared_expert_intermediate_size ({shared})"
            )


@dataclass
class PrecisionConfig:
    """dtype: "bf16" | "fp16" | "fp32" (parameters and activations).

    fp8: None | "e4m3" | "hybrid" (e4m3 forward, e5m2 gradients); fp8_recipe: "delayed" | "tensorwise" |
    "blockwise" | "mxfp8"; fp8_margin, fp8_amax_history_len, fp8_amax_compute_algo: delayed-scaling
    options; fp8_param: FP8 weights as parameters -- refused for now (not wired through the
    parameter gather, optimizer and export);
    first_last_layers_bf16 with num_layers_at_start_in_bf16 / num_layers_at_end_in_bf16: keep those layers
    out of FP8 (a common stabilizer for post-training).
    """

    dtype: str = "bf16"
    fp8: str | None = None
    fp8_recipe: str = "delayed"
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_param: bool = False
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision.dtype must be bf16, fp16 or fp32, got {self.dtype!r}")
        if self.fp8 is not None and self.fp8 not in FP8_FORMATS:
            raise ValueError(f"precision.fp8 must be None or one of {FP8_FORMATS}, got {self.fp8!r}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"precision.fp8_recipe must be one of {FP8_RECIPES}, got {self.fp8_recipe!r}")
        if self.fp8_amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(
                f"precision.fp8_amax_compute_algo must be max or most_recent, got {self.fp8_amax_compute_algo!r}"
            )
        if self.fp8 is not None and self.dtype == "fp32":
            raise ValueError("precision.fp8 needs dtype bf16 or fp16 for the non-FP8 parts, got fp32")
        if self.fp8_param:
            # Refused rather than half-wired: FP8 parameters need DDP's fp8_param_gather, an optimizer that
            # keeps fp32 main weights of FP8 tensors, and an export that dequantizes them for the rollout
            # engine and the HF writer. None of that exists here yet; FP8 compute (precision.fp8) does.
            raise ValueError(
                "precision.fp8_param=true is not supported: FP8 weights are not wired through the "
                "parameter all-gather, the optimizer or the weight export. Use precision.fp8 "
                "(FP8 compute with bf16 weights) and leave fp8_param false"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]


def check_fp8_support(precision: PrecisionConfig, capability: tuple[int, int] | None = None) -> None:
    """Raise a clear error when ``precision`` asks for FP8 the GPU found cannot run.

    ``capability`` is the CUDA compute capability (major, minor); by default the current device's.
    """
    if precision.fp8 is None:
        return
    if capability is None:
        if not _cuda():
            raise RuntimeError(
                f"precision.fp8={precision.fp8!r} needs a CUDA GPU with Transformer Engine; "
                "none is available on this machine"
            )
        capability = torch.cuda.get_device_capability()
    low, below = _RECIPE_CAPABILITY[precision.fp8_recipe]
    name = f"compute capability {capability[0]}.{capability[1]}"
    if tuple(capability) < low:
        raise RuntimeError(
            f"precision.fp8_recipe={precision.fp8_recipe!r} needs compute capability >= "
            f"{low[0]}.{low[1]}, the GPU found has {name}"
        )
    if below is not None and tuple(capability) >= below:
        raise RuntimeError(
            f"precision.fp8_recipe={precision.fp8_recipe!r} is implemented by Transformer Engine "
            f"for Hopper (9.x) only; the GPU found has {name} (use 'mxfp8' on Blackwell)"
        )


def _cuda() -> bool:
    from gift_megatron.device import use_cuda

    return use_cuda()


def _te() -> bool:
    from gift_megatron.device import has_transformer_engine

    return has_transformer_engine()


def select_backend(
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    *,
    cuda: bool | None = None,
    transformer_engine: bool | None = None,
) -> str:
    """ "transformer_engine" (TE layer spec and fusions) or "local" (Megatron's torch modules), for this
    process; raises before anything is built when the layout or precision needs TE and TE is absent.

    TE's spec is used only on CUDA with TE importable. Without it (a CPU machine, or a GPU host without the
    optional TE install) FP8 and model-level context parallelism are refused with an error naming
    Transformer Engine: the local spec's attention rejects context parallelism, and FP8 GEMMs exist only in
    TE. Sequence parallelism runs on the local spec (:class:`SequenceParallelRMSNorm` replaces the torch norm
    that rejects it). ``cuda`` / ``transformer_engine``
    override the detection (tests).
    """
    cuda = _cuda() if cuda is None else cuda
    te = (cuda and _te()) if transformer_engine is None else transformer_engine
    if te:
        return "transformer_engine"
    where = "on this CPU machine" if not cuda else "on this GPU host (transformer-engine is not installed)"
    needs = []
    if precision.fp8 is not None:
        needs.append(f"precision.fp8={precision.fp8!r}")
    if parallel.context_parallel_size > 1:
        needs.append(f"parallel.context_parallel_size={parallel.context_parallel_size}")
    if needs:
        raise RuntimeError(
            f"{', '.join(needs)} need(s) Transformer Engine, which is not available {where}; "
            "install transformer-engine on the GPU nodes or turn these options off"
        )
    return "local"


def transformer_config(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, **overrides: Any):
    """The Megatron-Core TransformerConfig for this model, layout and precision.

    ``calculate_per_token_loss`` is on: gift_megatron's training step normalizes globally through it.
    Without CUDA every fusion that needs a CUDA kernel or Apex is off and weights are built on the CPU.
    """
    from megatron.core.transformer import TransformerConfig

    cuda = _cuda()
    te = select_backend(parallel, precision, cuda=cuda) == "transformer_engine"
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=precision.torch_dtype,
        pipeline_dtype=precision.torch_dtype,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        calculate_per_token_loss=True,
        use_cpu_initialization=not cuda,
        init_method_std=0.02,
    )
    if not cuda:
        kwargs.update(
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            apply_rope_fusion=False,
            cross_entropy_loss_fusion=False,
        )
    elif te:
        kwargs.update(bias_activation_fusion=True, masked_softmax_fusion=True, apply_rope_fusion=True)
    else:
        # CUDA without TE: Megatron's own jit fusions (SwiGLU, bias-dropout-add) run; the fused RoPE,
        # fused softmax and gradient-accumulation kernels come from TE/Apex, so they stay off
        # (megatron-core raises "apply_rope_fusion is not available" otherwise).
        kwargs.update(
            bias_activation_fusion=True,
            bias_dropout_fusion=True,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            apply_rope_fusion=False,
        )
    if model.is_moe:
        kwargs.update(_moe_kwargs(model, parallel, te))
    if precision.fp8 is not None:
        check_fp8_support(precision)
        kwargs.update(
            fp8=precision.fp8,
            fp8_recipe=precision.fp8_recipe,
            fp8_margin=precision.fp8_margin,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
            fp8_param=precision.fp8_param,
            first_last_layers_bf16=precision.first_last_layers_bf16,
            num_layers_at_start_in_bf16=precision.num_layers_at_start_in_bf16,
            num_layers_at_end_in_bf16=precision.num_layers_at_end_in_bf16,
        )
    kwargs.update(overrides)
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(k for k in kwargs if k not in known)
    if unknown:
        import megatron.core

        raise ValueError(
            f"options {unknown} are not supported by the installed megatron-core "
            f"{getattr(megatron.core, '__version__', '?')}"
        )
    return TransformerConfig(**kwargs)


def _moe_kwargs(model: ModelConfig, parallel: ParallelConfig, te: bool) -> dict[str, Any]:
    """TransformerConfig options of a Mixture-of-Experts model (empty for a dense one)."""
    from gift_megatron.megatron.moe import check_router_loss_support, fix_router_without_transformer_engine

    check_router_loss_support(model)  # megatron-core 0.16 cannot scale router losses: refuse them there
    fix_router_without_transformer_engine()  # 0.16's router gating raised NameError without TE
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.expert_ffn_hidden_size,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=model.moe_shared_expert_gate,
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        moe_layer_freq=list(model.moe_layer_freq) if model.moe_layer_freq is not None else 1,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        # Megatron's "off" for the z-loss is None (0.0 would still compute and log it).
        moe_z_loss_coeff=model.moe_z_loss_coeff or None,
        # Routing decisions in fp32 whatever the training dtype: bf16 router logits flip near-tied top-k
        # choices between the trainer and the rollout engine.
        moe_router_dtype="fp32",
        # alltoall: each EP rank sends exactly the tokens its peers' experts need (allgather sends all).
        moe_token_dispatcher_type="alltoall",
        # TE's grouped GEMM runs all local experts in one kernel; the local spec has a SequentialMLP instead.
        moe_grouped_gemm=te,
        moe_permute_fusion=False,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.etp,
    )


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm for the local spec under sequence parallelism.

    Why: Megatron's local norm (``WrappedTorchNorm``) refuses sequence parallelism, although an RMSNorm is
    per-token math that runs unchanged on a sequence shard. What sequence parallelism changes is the weight
    gradient: each TP rank sees only its shard of the tokens, so the gradients must be summed over the TP
    group, which ``finalize_model_grads`` does for every parameter tagged ``sequence_parallel``. This class
    is the torch norm with that tag (as TE's norms and Megatron's fused norm carry it). Takes the arguments
    Megatron's layer builders pass to a norm (``config``, ``hidden_size``, ``eps``; others are ignored).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused: Any) -> None:
        # Built on the CPU like the rest of the local model (use_cpu_initialization); build_model moves the
        # whole model to the GPU when there is one.
        super().__init__(hidden_size, eps=eps, device=torch.device("cpu"), dtype=config.params_dtype)
        # Megatron's marker attribute: finalize_model_grads all-reduces these weights' gradients over TP.
        self.weight.sequence_parallel = bool(config.sequence_parallel)  # pyrefly: ignore[missing-attribute]


def _with_sequence_parallel_norms(block):
    """``block`` (TransformerBlockSubmodules of the local spec) with every norm a SequenceParallelRMSNorm."""
    from megatron.core.transformer.identity_op import IdentityOp

    def norm(current):
        return current if current is IdentityOp else SequenceParallelRMSNorm

    replaced: dict[int, Any] = {}
    for spec in block.layer_specs:
        if id(spec) in replaced:  # Megatron reuses one spec object for every dense (or every MoE) layer
            continue
        layer = dataclasses.replace(
            spec.submodules,
            input_layernorm=norm(spec.submodules.input_layernorm),
            pre_mlp_layernorm=norm(spec.submodules.pre_mlp_layernorm),
        )
        attn = layer.self_attention
        attn_sub = dataclasses.replace(
            attn.submodules,
            q_layernorm=norm(attn.submodules.q_layernorm),
            k_layernorm=norm(attn.submodules.k_layernorm),
        )
        layer.self_attention = dataclasses.replace(attn, submodules=attn_sub)
        replaced[id(spec)] = dataclasses.replace(spec, submodules=layer)
    return dataclasses.replace(
        block, layer_specs=[replaced[id(s)] for s in block.layer_specs], layer_norm=SequenceParallelRMSNorm
    )


def decoder_spec(model: ModelConfig, config, backend: str | None = None):
    """What GPTModel's ``transformer_layer_spec`` gets: for a dense model without sequence parallelism on the
    local spec, :func:`layer_spec`; otherwise Megatron's decoder block spec for this pipeline stage (each
    layer dense or MoE per ``config.moe_layer_freq``); on the local spec with the packed-row attention and,
    under sequence parallelism, :class:`SequenceParallelRMSNorm` norms. ``config``: the TransformerConfig of
    :func:`transformer_config`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if backend is None:
        backend = "transformer_engine" if _cuda() and _te() else "local"
    local_sp = backend == "local" and config.sequence_parallel
    if not model.is_moe and not local_sp:
        return layer_spec(model, backend)
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=backend == "transformer_engine", normalization="RMSNorm"
    )
    if backend != "local":
        return block
    from gift_megatron.megatron.packed_attention import with_packed_attention

    # As layer_spec: the local attention also takes packed (THD) rows (packed_attention.py).
    return with_packed_attention(_with_sequence_parallel_norms(block) if local_sp else block)


def layer_spec(model: ModelConfig, backend: str | None = None):
    """Transformer Engine's layer spec on CUDA with TE (imported lazily), the local spec otherwise.
    ``backend``: "transformer_engine" | "local" (default: what this process has)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if backend is None:
        backend = "transformer_engine" if _cuda() and _te() else "local"
    if backend == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    from gift_megatron.megatron.packed_attention import with_packed_attention

    # The local attention also takes packed (THD) rows, one sequence at a time (see packed_attention.py).
    return with_packed_attention(
        gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm, normalization="RMSNorm")
    )


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    **config_overrides: Any,
):
    """This rank's GPTModel (its pipeline stage and tensor-parallel shard), on the current device.

    Megatron's parallel state must be initialized (``initialize_model_parallel`` or, on CPU,
    ``gift_megatron.parallel.initialize_model_parallel_cpu``), with the expert sizes of ``parallel`` for a
    Mixture-of-Experts model. The model returns vocab-parallel logits
    [b, s, padded_vocab / tp] when called without labels.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp != parallel.tensor_model_parallel_size:
        raise ValueError(
            f"parallel.tensor_model_parallel_size={parallel.tensor_model_parallel_size} but Megatron's "
            f"parallel state was initialized with TP={tp}"
        )
    ep = parallel_state.get_expert_model_parallel_world_size()
    if ep != parallel.expert_model_parallel_size:
        raise ValueError(
            f"parallel.expert_model_parallel_size={parallel.expert_model_parallel_size} but Megatron's "
            f"parallel state was initialized with EP={ep}"
        )
    parallel.validate(torch.distributed.get_world_size(), model)
    backend = select_backend(parallel, precision)  # before anything is built: a clear error naming TE
    config = transformer_config(model, parallel, precision, **config_overrides)
    gpt = GPTModel(
        config=config,
        # A TransformerBlockSubmodules (the MoE decoder spec) is accepted too, though annotated ModuleSpec.
        transformer_layer_spec=typing.cast(Any, decoder_spec(model, config, backend)),
        vocab_size=model.padded_vocab_size(tp),
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        # Annotated int, used as a float base: a non-integer base (YaRN-scaled configs) passes as is.
        rotary_base=typing.cast(
            int, model.rotary_base if not float(model.rotary_base).is_integer() else int(model.rotary_base)
        ),
        rope_scaling=model.rope_scaling_factor is not None,
        rope_scaling_factor=model.rope_scaling_factor or 8.0,
    )
    if _cuda():
        gpt = gpt.cuda()
    if precision.dtype != "fp32":
        gpt = gpt.to(precision.torch_dtype)
    return gpt
