"""Checkpoints across layer specs: local <-> Transformer Engine (gift_megatron/megatron/checkpoint/).

On GPU the trainer builds GPTModel with Transformer Engine's layer spec; on CPU, and in every converter
output, with the local spec. Transformer Engine cannot be installed on CPU (it breaks ``import
megatron.core``), so the TE side is a CPU model built from a spec whose modules ask for exactly the sharded
state dict that the TE spec's modules ask for. Where each key comes from (megatron-core 0.16.1 and 0.19.2,
Transformer Engine 2.x sources; the two megatron-core versions agree on all of it):

- ``get_gpt_layer_with_transformer_engine_spec``: ``input_layernorm`` and ``pre_mlp_layernorm`` are
  ``IdentityOp`` (no state); ``linear_qkv`` and ``mlp.linear_fc1`` are ``TELayerNormColumnParallelLinear``
  (TE's ``LayerNormLinear``, which registers ``weight``, ``bias`` only when it has one, ``layer_norm_weight``
  and, for RMSNorm, no ``layer_norm_bias``); ``linear_proj`` / ``linear_fc2`` are ``TERowParallelLinear``;
  ``core_attention`` is ``TEDotProductAttention``; ``q_layernorm`` / ``k_layernorm`` are ``TENorm``, i.e.
  ``te.pytorch.RMSNorm`` (TE >= 1.9). The spec's ``sharded_state_dict_keys_map`` only renames TE's
  op-fuser MLP (``mlp.0.weight`` ...), which this spec does not build.
- ``TransformerBlock`` given a layer spec builds ``final_layernorm`` with ``LayerNormImpl``, which is
  ``TENorm`` whenever TE is installed.
- ``TELayerNormColumnParallelLinear.sharded_state_dict``: ``make_sharded_tensors_for_checkpoint`` with axis
  map ``{"weight": 0, "bias": 0}``: ``layer_norm_weight`` is a replicated ShardedTensor, ``_extra_state`` a
  ShardedObject replicated over TP (replica id (0, tp_rank, dp_rank)) of global shape (num_layers,).
  ``TERowParallelLinear``: the same with ``{"weight": 1}``.
- ``TEDotProductAttention.sharded_state_dict`` saves nothing unless ``softmax_type == "learnable"``, although
  TE's ``DotProductAttention`` (a ``TransformerEngineBaseModule``) has ``_extra_state`` in its torch state
  dict.
- ``te.pytorch.RMSNorm`` is a fusible op since TE 1.13 (``BasicOperation``: ``weight`` and
  ``_extra_state``) and has no ``sharded_state_dict``; Megatron's ``sharded_state_dict_default`` makes a
  replicated ShardedTensor of ``weight`` and a ShardedObject of ``_extra_state``: global shape
  (num_layers,) for q/k norms, (1,) for the final norm.
- TE's ``get_extra_state`` returns FP8 metadata pickled into a uint8 tensor (an empty one without FP8);
  ``set_extra_state`` ignores ``None`` and empty tensors.

The emulated modules below reproduce those keys, axis maps and extra-state semantics, hold a non-empty
extra state (as after FP8 training, distinct per model, so "kept" and "loaded" can be told apart) and run
the same math as the local spec (RMSNorm inside the linear layer), so a loaded model also gives the local
model's logits. Both models come from the trainer's builder (``build_model``), the TE one with its layer
spec swapped for the stand-ins'.

Not emulated (so real TE is untested here): FP8 itself and the real contents of TE's extra state; TE's
load hook that drops a missing ``core_attention._extra_state`` from strict loading (left out on purpose:
the stand-in is stricter, and the loader must cope without it); TE's ``_load_from_state_dict`` for FP8
primary weights.

Checked: local -> TE and TE -> local round trips are bit-identical against the saving model's tensors at
TP=1 (this process) and TP=2 (2 gloo ranks), for llama (tied), qwen2 (QKV bias) and qwen3 (QK norm,
head_dim 24); TE-only extra state keeps its initial value and TE -> TE restores it; the manifest records
each spec; a manifest without the spec field still loads; the converter's output loads into the TE model at
TP=1 and TP=2; a missing weight is still an error naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pickle
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from tests.multiproc import run_ranks

RANKS_TIMEOUT = 150
FAMILIES = {
    "llama": dict(family="llama", tie_embeddings=True),
    "qwen2": dict(family="qwen2", add_qkv_bias=True),
    "qwen3": dict(family="qwen3", qk_layernorm=True, kv_channels=24),
}
# The extra state only a TE model saves (relative to a local-spec checkpoint), per family.
TE_ONLY_EXTRA_STATE = {
    "llama": ["decoder.final_layernorm._extra_state"],
    "qwen2": ["decoder.final_layernorm._extra_state"],
    "qwen3": [
        "decoder.final_layernorm._extra_state",
        "decoder.layers.self_attention.k_layernorm._extra_state",
        "decoder.layers.self_attention.q_layernorm._extra_state",
    ],
}
# A TE model's fused-norm parameter -> the local model's parameter of the same weight (layer-local names).
FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def model_config(family: str):
    from gift_megatron.megatron.model import ModelConfig

    return ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=100,
        seq_length=16,
        max_position_embeddings=64,
        **FAMILIES[family],
    )


# --------------------------------------------------------------------------------------------------
# Transformer Engine's modules, as their checkpoints see them, on CPU
# --------------------------------------------------------------------------------------------------


class _TEExtraState:
    """TE's ``_extra_state``: a uint8 tensor (pickled FP8 metadata). Here a payload naming the model's seed
    (set by :func:`build`) and the module's build order: the same on every TP rank, as Megatron assumes
    (it saves TP rank 0's copy), and different between models."""

    def _init_extra_state(self) -> None:
        _EXTRA_STATE_COUNTER[1] += 1
        payload = {"model_seed": _EXTRA_STATE_COUNTER[0], "module": _EXTRA_STATE_COUNTER[1], "amax_history": [1.5]}
        self.te_extra_state = torch.frombuffer(bytearray(pickle.dumps(payload)), dtype=torch.uint8).clone()

    def get_extra_state(self) -> torch.Tensor:
        return self.te_extra_state.clone()

    def set_extra_state(self, state) -> None:
        if state is None or state.numel() == 0:  # TE: no FP8 metadata to load (e.g. a local linear's None)
            return
        self.te_extra_state = state.detach().clone()


_EXTRA_STATE_COUNTER = [0, 0]  # [seed of the model being built, modules built so far]


def _te_sharded_state_dict(module, prefix, sharded_offsets, metadata, axis_map):
    """Megatron's TE wrappers' ``sharded_state_dict`` (both versions): every state-dict entry through
    ``make_sharded_tensors_for_checkpoint`` with the wrapper's TP axis map."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    return make_sharded_tensors_for_checkpoint(
        module.state_dict(prefix="", keep_vars=True),
        prefix,
        axis_map,
        sharded_offsets,
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_cp_group=(metadata or {}).get("dp_cp_group") or ps.get_data_parallel_group(with_context_parallel=True),
    )


def _emulated_classes():
    """The TE stand-ins, built on Megatron's local modules (imported lazily: megatron is imported in ranks)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class LayerNormColumnParallelLinear(_TEExtraState, ColumnParallelLinear):
        """TELayerNormColumnParallelLinear: RMSNorm (``layer_norm_weight`` [in]) fused before the linear
        layer (``weight`` [out / tp, in], ``bias`` [out / tp] if any)."""

        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype, device="cpu"))
            self.norm_eps = config.layernorm_epsilon
            self._init_extra_state()

        def forward(self, input_, *args, **kwargs):
            normed = F.rms_norm(input_, (self.input_size,), self.layer_norm_weight, self.norm_eps)
            return super().forward(normed, *args, **kwargs)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return _te_sharded_state_dict(self, prefix, sharded_offsets, metadata, {"weight": 0, "bias": 0})

    class RowParallelLinearTE(_TEExtraState, RowParallelLinear):
        """TERowParallelLinear: ``weight`` [out, in / tp] and extra state."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_extra_state()

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return _te_sharded_state_dict(self, prefix, sharded_offsets, metadata, {"weight": 1})

    class DotProductAttentionTE(_TEExtraState, DotProductAttention):
        """TEDotProductAttention: extra state in its torch state dict, nothing in its sharded one."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_extra_state()

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return {}  # Megatron's wrapper passes an empty state dict unless the softmax offset is learnable

    class RMSNormTE(_TEExtraState, torch.nn.Module):
        """te.pytorch.RMSNorm (TENorm): ``weight`` [hidden] and extra state, no sharded_state_dict."""

        def __init__(self, config, hidden_size, eps=1e-5, **_):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device="cpu"))
            self.hidden_size, self.eps = hidden_size, eps
            self._init_extra_state()

        def forward(self, x):
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)

    return LayerNormColumnParallelLinear, RowParallelLinearTE, DotProductAttentionTE, RMSNormTE


def te_block_spec(cfg):
    """The TE spec's block (layers + final norm) with the stand-ins, from the local spec's structure."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    ln_linear, row_linear, attention, norm = _emulated_classes()
    spec = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm")
    layer = spec.submodules
    attn = layer.self_attention
    attn.submodules = dataclasses.replace(
        attn.submodules,
        linear_qkv=ln_linear,
        core_attention=attention,
        linear_proj=row_linear,
        **({"q_layernorm": norm, "k_layernorm": norm} if cfg.qk_layernorm else {}),
    )
    if isinstance(layer.mlp, functools.partial):  # megatron-core 0.19: MLP.as_mlp_submodule
        mlp = dataclasses.replace(layer.mlp.keywords["submodules"], linear_fc1=ln_linear, linear_fc2=row_linear)
        layer.mlp = functools.partial(layer.mlp.func, *layer.mlp.args, **{**layer.mlp.keywords, "submodules": mlp})
    else:  # 0.16: ModuleSpec(MLP)
        layer.mlp.submodules = dataclasses.replace(layer.mlp.submodules, linear_fc1=ln_linear, linear_fc2=row_linear)
    layer.input_layernorm = IdentityOp
    layer.pre_mlp_layernorm = IdentityOp
    layer.sharded_state_dict_keys_map = {}
    return TransformerBlockSubmodules(layer_specs=[spec] * cfg.num_layers, layer_norm=norm)


def build(cfg, spec: str, seed: int):
    """This rank's GPTModel of ``spec`` ("local" / "te") by the trainer's builder, every parameter random
    (norms around 1; replicated parameters equal on every TP rank, as a trained model's are)."""
    from megatron.core import parallel_state as ps

    from gift_megatron.megatron import model as model_module

    parallel = model_module.ParallelConfig(tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size())
    precision = model_module.PrecisionConfig(dtype="fp32")
    _EXTRA_STATE_COUNTER[:] = [seed, 0]
    patch = (
        mock.patch.object(model_module, "layer_spec", lambda c, backend=None: te_block_spec(c))
        if spec == "te"
        else contextlib.nullcontext()
    )
    with patch:
        model = model_module.build_model(cfg, parallel, precision)
    tp_rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            sharded = getattr(p, "tensor_model_parallel", False)
            g = torch.Generator(device="cpu").manual_seed(seed * 1009 + i * 7 + (tp_rank if sharded else 0))
            p.copy_(torch.randn(p.shape, generator=g, device="cpu") * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def local_name(te_name: str) -> str:
    """The local model's name of a TE model's parameter."""
    for fused, local in FUSED_NORMS.items():
        if te_name.endswith(fused):
            return te_name[: -len(fused)] + local
    return te_name


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def te_extra_states(model) -> dict[str, bytes]:
    """Module name -> its extra state bytes, for every TE stand-in."""
    return {name: bytes(m.te_extra_state.tolist()) for name, m in model.named_modules() if isinstance(m, _TEExtraState)}


def compare(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], rename) -> list[str]:
    """Names whose tensors differ (or are absent) between ``target`` and ``source`` (``rename``: target name
    -> source name). Empty when every weight was copied exactly."""
    mapped = {rename(n): n for n in target}
    bad = sorted(set(source) ^ set(mapped))
    return bad + [n for n in target if rename(n) in source and not torch.equal(target[n], source[rename(n)])]


def logits(model, seed: int = 5) -> torch.Tensor:
    """Vocab-parallel logits [2, 12, V_padded / tp] of a fixed batch."""
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(tokens, torch.arange(12)[None].expand_as(tokens), None)


def save(model, root: str) -> str:
    from gift_megatron.megatron.checkpoint import save_checkpoint
    from tests.tiny_gpt import _child_processes_allowed

    with _child_processes_allowed():  # Megatron's writer starts processes; run_ranks' ranks are daemons
        return save_checkpoint(root, 0, [model])


def attempt(fn, *args) -> dict | str:
    """``fn(*args)``, or the error it raised as text: one direction that fails then fails its own tests, with
    the message, instead of the fixture every test shares (loading errors are raised on every rank alike)."""
    try:
        return fn(*args)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def local_to_te(cfg, root: str) -> dict:
    """A local-spec checkpoint into a TE model: weights against the saving model's, extra state, logits."""
    from gift_megatron.megatron.checkpoint import load_checkpoint, read_manifest

    source = build(cfg, "local", seed=1)
    ckpt = save(source, os.path.join(root, f"{cfg.family}_local"))
    te = build(cfg, "te", seed=2)
    extra_before = te_extra_states(te)
    differs_before = len(compare(params(te), params(source), local_name)) == len(params(te))
    info = load_checkpoint(ckpt, [te])
    return {
        "differs_before": differs_before,
        "mismatch": compare(params(te), params(source), local_name),
        "info": {k: info[k] for k in ("spec", "extra_state_not_loaded")},
        "extra_state_kept": te_extra_states(te) == extra_before,
        "logits_equal": torch.equal(logits(te), logits(source)),
        "manifest_spec": read_manifest(ckpt)["model"].get("spec"),
    }


def from_te(cfg, root: str) -> dict:
    """A TE checkpoint into a local model and into another TE model."""
    from gift_megatron.megatron.checkpoint import load_checkpoint, read_manifest

    source = build(cfg, "te", seed=3)
    ckpt = save(source, os.path.join(root, f"{cfg.family}_te"))
    local = build(cfg, "local", seed=4)
    to_source_name = {local_name(n): n for n in params(source)}.get
    differs_before = len(compare(params(local), params(source), to_source_name)) == len(params(local))
    info = load_checkpoint(ckpt, [local])
    out = {
        "differs_before": differs_before,
        "manifest_spec": read_manifest(ckpt)["model"].get("spec"),
        "to_local": compare(params(local), params(source), to_source_name),
        "to_local_info": {k: info[k] for k in ("spec", "extra_state_not_loaded")},
        "to_local_logits_equal": torch.equal(logits(local), logits(source)),
    }
    te = build(cfg, "te", seed=5)
    initial = te_extra_states(te)
    info = load_checkpoint(ckpt, [te])
    out["to_te"] = compare(params(te), params(source), lambda n: n)
    out["to_te_info"] = {k: info[k] for k in ("spec", "extra_state_not_loaded")}
    loaded, saved = te_extra_states(te), te_extra_states(source)
    out["extra_state_modules"] = sorted(loaded)
    out["extra_state_restored"] = sorted(n for n in loaded if loaded[n] == saved[n] != initial[n])
    out["extra_state_kept"] = sorted(n for n in loaded if loaded[n] == initial[n] != saved[n])
    return out


def round_trips(family: str, root: str) -> dict:
    """Both directions for ``family`` in the current layout: the facts the tests assert on (this rank's)."""
    cfg = model_config(family)
    return {"local_to_te": attempt(local_to_te, cfg, root), "from_te": attempt(from_te, cfg, root)}


def converter_output_into_te(meg_root: str, hf_dir: str) -> dict:
    """Load the converter's checkpoint into the TE model of this layout; the export (HF names, TP-gathered)
    and the fused norms against the HF tensors."""
    from gift_megatron.hf import (
        iter_hf_tensors,
        model_config_from_info,
        read_conversion_info,
        resolve_checkpoint,
    )
    from gift_megatron.megatron.checkpoint import load_checkpoint
    from tests.test_conversion import hf_tensors

    cfg = model_config_from_info(read_conversion_info(meg_root))
    te = build(cfg, "te", seed=6)
    info = load_checkpoint(resolve_checkpoint(meg_root), [te], restore_rng=False)
    hf = hf_tensors(hf_dir)
    exported = {n: t.clone() for n, t in iter_hf_tensors(te, cfg)}
    layer = te.decoder.layers[0]
    return {
        "export_mismatch": sorted(set(hf) ^ set(exported))
        + [n for n in hf if n in exported and not torch.equal(hf[n], exported[n])],
        "fused_norms_equal": torch.equal(
            layer.self_attention.linear_qkv.layer_norm_weight, hf["model.layers.0.input_layernorm.weight"]
        )
        and torch.equal(layer.mlp.linear_fc1.layer_norm_weight, hf["model.layers.0.post_attention_layernorm.weight"]),
        "info": {k: info[k] for k in ("spec", "extra_state_not_loaded")},
    }


def tp2_worker(rank, world, root, converted):
    from tests.tiny_gpt import Layout, setup_parallel, teardown_parallel

    setup_parallel(Layout(tp=2))
    try:
        out = {family: round_trips(family, root) for family in FAMILIES}
        out["converter"] = attempt(converter_output_into_te, *converted) if converted else None
        return out
    finally:
        teardown_parallel()


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random Qwen3 (QK norm, head_dim 24, norms randomized) and its converter output: (Megatron
    root, HF folder), or None without transformers (the round trips do not need it)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    from gift_megatron.hf import hf_to_megatron
    from tests.test_conversion import make_hf

    root = tmp_path_factory.mktemp("converted")
    make_hf(root / "hf", "qwen3")
    hf_to_megatron(root / "hf", root / "meg", progress=False)
    return str(root / "meg"), str(root / "hf")


@pytest.fixture(scope="module")
def tp1(tmp_path_factory, converted):
    from gift_megatron.hf.convert import single_process_megatron

    root = str(tmp_path_factory.mktemp("tp1"))
    with single_process_megatron():
        out = {family: round_trips(family, root) for family in FAMILIES}
        out["converter"] = attempt(converter_output_into_te, *converted) if converted else None
    return out


@pytest.fixture(scope="module")
def tp2(tmp_path_factory, converted):
    root = str(tmp_path_factory.mktemp("tp2"))
    return run_ranks(tp2_worker, 2, root, converted, timeout=RANKS_TIMEOUT)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def check_local_to_te(out, family: str) -> None:
    assert isinstance(out, dict), out  # else: the error loading raised
    assert out["differs_before"], "every weight of the TE model must start with another value"
    assert out["mismatch"] == []  # every weight bit-identical to the saving local model's (norms renamed)
    assert out["manifest_spec"] == "local"
    assert out["info"] == {
        "spec": {"checkpoint": "local", "model": "transformer_engine"},
        "extra_state_not_loaded": TE_ONLY_EXTRA_STATE[family],
    }
    assert out["extra_state_kept"]  # TE-only extra state (and the local linears' None) left as it was
    assert out["logits_equal"]  # the fused norms act where the local norms did


def check_from_te(out, family: str) -> None:
    assert isinstance(out, dict), out
    assert out["differs_before"], "every weight of the local model must start with another value"
    assert out["manifest_spec"] == "transformer_engine"
    assert out["to_local"] == [] and out["to_te"] == []
    assert out["to_local_info"] == {
        "spec": {"checkpoint": "transformer_engine", "model": "local"},
        "extra_state_not_loaded": [],
    }
    assert out["to_local_logits_equal"]
    assert out["to_te_info"] == {
        "spec": {"checkpoint": "transformer_engine", "model": "transformer_engine"},
        "extra_state_not_loaded": [],
    }
    # TE -> TE restores every extra state Megatron saves; TE's DotProductAttention's it never saves.
    attention = [f"decoder.layers.{i}.self_attention.core_attention" for i in range(2)]
    assert out["extra_state_kept"] == attention
    assert out["extra_state_restored"] == [n for n in out["extra_state_modules"] if n not in attention]


@pytest.mark.timeout(RANKS_TIMEOUT)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_local_checkpoint_loads_into_te_model_at_tp1(tp1, family):
    check_local_to_te(tp1[family]["local_to_te"], family)


@pytest.mark.timeout(RANKS_TIMEOUT)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_te_checkpoint_loads_into_local_and_te_models_at_tp1(tp1, family):
    check_from_te(tp1[family]["from_te"], family)


@pytest.mark.timeout(RANKS_TIMEOUT + 60)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_local_checkpoint_loads_into_te_model_at_tp2(tp2, family):
    for rank in (0, 1):
        check_local_to_te(tp2[rank][family]["local_to_te"], family)


@pytest.mark.timeout(RANKS_TIMEOUT + 60)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_te_checkpoint_loads_into_local_and_te_models_at_tp2(tp2, family):
    for rank in (0, 1):
        check_from_te(tp2[rank][family]["from_te"], family)


@pytest.mark.timeout(RANKS_TIMEOUT + 60)
def test_converter_output_loads_into_te_model(converted, tp1, tp2):
    if converted is None:
        pytest.skip("transformers is not installed")
    for out in (tp1["converter"], tp2[0]["converter"], tp2[1]["converter"]):
        assert isinstance(out, dict), out
        assert out["export_mismatch"] == []
        assert out["fused_norms_equal"]
        # The converter writes one layer at a time, each under its own keys (non_homogeneous_layers), so the
        # TE-only extra state it lacks is named per layer (a training checkpoint stacks the layers).
        per_layer = sorted(
            ["decoder.final_layernorm._extra_state"]
            + [f"decoder.layers.{i}.self_attention.{n}_layernorm._extra_state" for i in range(2) for n in ("k", "q")]
        )
        assert out["info"] == {
            "spec": {"checkpoint": "local", "model": "transformer_engine"},
            "extra_state_not_loaded": per_layer,
        }


@pytest.mark.timeout(RANKS_TIMEOUT)
def test_missing_weight_is_an_error_and_old_manifests_load(tmp_path):
    """A QKV bias the checkpoint lacks is still a CheckpointError naming it, before the TE model changes;
    a manifest without the spec field (written before it existed) loads, its spec read as None."""
    from gift_megatron.hf.convert import single_process_megatron
    from gift_megatron.megatron.checkpoint import MANIFEST_NAME, CheckpointError, load_checkpoint

    with single_process_megatron():
        no_bias = dataclasses.replace(model_config("qwen2"), add_qkv_bias=False)
        ckpt = save(build(no_bias, "local", seed=1), str(tmp_path / "no_bias"))
        with_bias = build(model_config("qwen2"), "te", seed=2)
        before = params(with_bias)
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(ckpt, [with_bias])
        assert "1 model tensor(s) are not in the checkpoint: decoder.layers.self_attention.linear_qkv.bias" in str(
            error.value
        ), str(error.value)
        assert compare(params(with_bias), before, lambda n: n) == []

        # A manifest that claims the bias: the reader's own failure is a CheckpointError naming it too.
        manifest_file = os.path.join(ckpt, MANIFEST_NAME)
        manifest = json.load(open(manifest_file))
        original = json.dumps(manifest)
        manifest["model"]["tensors"]["decoder.layers.self_attention.linear_qkv.bias"] = {
            "shape": [2, 128],
            "allow_shape_mismatch": False,
        }
        json.dump(manifest, open(manifest_file, "w"))
        with pytest.raises(
            CheckpointError,
            match=r"reading checkpoint .* failed: rank 0: \w+Error: .*"
            r"decoder\.layers\.self_attention\.linear_qkv\.bias",
        ):
            load_checkpoint(ckpt, [with_bias])

        manifest = json.loads(original)
        manifest["model"].pop("spec", None)
        json.dump(manifest, open(manifest_file, "w"))
        source = build(no_bias, "local", seed=1)
        te = build(no_bias, "te", seed=3)
        info = load_checkpoint(ckpt, [te])
        assert info["spec"] == {"checkpoint": None, "model": "transformer_engine"}
        assert info["extra_state_not_loaded"] == TE_ONLY_EXTRA_STATE["qwen2"]
        assert compare(params(te), params(source), local_name) == []


@pytest.mark.timeout(RANKS_TIMEOUT)
def test_extra_state_missing_within_one_spec_is_a_warning(tmp_path, caplog):
    """The recorded spec tells an expected gap (a local checkpoint into a TE model: logged at INFO) from a
    suspicious one (a TE checkpoint without a TE model's extra state: FP8 scaling restarts, a WARNING)."""
    import logging

    from gift_megatron.hf.convert import single_process_megatron
    from gift_megatron.megatron.checkpoint import load_checkpoint

    cfg = model_config("qwen2")
    with single_process_megatron(), caplog.at_level(logging.INFO, logger="gift_megatron.megatron.checkpoint"):
        source = build(cfg, "te", seed=1)
        plain = torch.nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_epsilon, device="cpu")
        with torch.no_grad():
            plain.weight.copy_(source.decoder.final_layernorm.weight)
        source.decoder.final_layernorm = plain  # a TE model whose final norm saves no extra state
        te_ckpt = save(source, str(tmp_path / "te"))
        local_ckpt = save(build(cfg, "local", seed=2), str(tmp_path / "local"))
        info = load_checkpoint(te_ckpt, [build(cfg, "te", seed=3)])
        assert info["spec"] == {"checkpoint": "transformer_engine", "model": "transformer_engine"}
        assert info["extra_state_not_loaded"] == ["decoder.final_layernorm._extra_state"]
        ours = "gift_megatron.megatron.checkpoint"
        warnings = [r for r in caplog.records if r.name == ours and r.levelno == logging.WARNING]
        assert (
            len(warnings) == 1
            and "a resume is not exact: decoder.final_layernorm._extra_state" in warnings[0].getMessage()
        )
        caplog.clear()
        info = load_checkpoint(local_ckpt, [build(cfg, "te", seed=4)])
        assert info["extra_state_not_loaded"] == ["decoder.final_layernorm._extra_state"]
        records = [r for r in caplog.records if r.name == ours]
        assert [r.levelno for r in records] == [logging.INFO]
        assert "(spec local) into a 'transformer_engine' model" in records[0].getMessage()
