"""HF <-> Megatron conversion against transformers' own models (random tiny ones, built here: no downloads).

- HF -> Megatron -> HF is bit-exact (every tensor, dtype included) for Llama (Llama-3 RoPE scaling),
  Qwen2 (QKV biases) and Qwen3 (QK-norm, head_dim 24 != hidden / heads), tied and untied, fp32 and bf16;
- the converted checkpoint gives transformers' logits at TP=1 (this process) and TP=2 (2 gloo ranks);
- the streaming export at TP=2 and PP=2, to every rank or to one, equals the HF tensors exactly, in
  buckets of at most bucket_bytes; loading HF tensors from memory at TP=2 / PP=2 equals the checkpoint;
- a CPU rollout engine fed by the export at TP=2 decodes greedily like the Megatron model and reports its
  log-probs;
- the three tools (in this process; verify spawns its TP=2 ranks itself) and bad input.

The tiny models have 2 layers, hidden 64, 4 heads in 2 query groups and a vocabulary of 100 (so Megatron
pads it: 128 rows at TP=1, 256 at TP=2).
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from tests.multiproc import run_ranks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 100
BUCKET = 20_000  # bytes: between the sizes of the tiny models' tensors, so buckets hold 1 to a few
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# case -> (family, tied embeddings, dtype, save the HF model in shards)
CASES = {
    "llama-untied-fp32": ("llama", False, torch.float32, True),
    "qwen2-tied-fp32": ("qwen2", True, torch.float32, False),
    "qwen3-untied-fp32": ("qwen3", False, torch.float32, True),
    "qwen2-untied-bf16": ("qwen2", False, torch.bfloat16, False),
    "llama-tied-bf16": ("llama", True, torch.bfloat16, True),
}
FP32 = [c for c, (_, _, dtype, _) in CASES.items() if dtype == torch.float32]


def make_hf(path, family, *, tie=False, dtype=torch.float32, seed=0, vocab=VOCAB, shard=None):
    """A random transformers model of ``family`` saved into ``path``; returns it. Norm weights and biases
    are randomized too (they start at ones / zeros, which would hide a mix-up)."""
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    extra = {"llama": {"rope_scaling": LLAMA3_ROPE, "max_position_embeddings": 16384}, "qwen3": {"head_dim": 24}}.get(
        family, {}
    )
    torch.manual_seed(seed)
    cfg = config_cls(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        **{"max_position_embeddings": 64, **extra},
    )
    model = model_cls(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(dtype)
    model.save_pretrained(str(path), **({"max_shard_size": shard} if shard else {}))
    return model


def hf_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(str(path), "*.safetensors"))):
        out.update(load_file(f))
    return out


def save_tokenizer(path, n_tokens=17):
    """A word-level Hugging Face fast tokenizer with ``n_tokens`` tokens, saved into ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, n_tokens)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    assert len(tok) == n_tokens
    tok.save_pretrained(str(path))


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------- conversions (this process)
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case -> {hf, meg, back: paths; model: the transformers model (fp32 copy)}; converted in this process."""
    from gift_megatron.hf import hf_to_megatron, megatron_to_hf

    out = {}
    for case, (family, tie, dtype, sharded) in CASES.items():
        root = tmp_path_factory.mktemp(case)
        model = make_hf(root / "hf", family, tie=tie, dtype=dtype, shard="60KB" if sharded else None)
        hf_to_megatron(root / "hf", root / "meg", progress=False)
        megatron_to_hf(root / "meg", root / "back", max_shard_bytes=100_000, progress=False)
        out[case] = {
            "hf": str(root / "hf"),
            "meg": str(root / "meg"),
            "back": str(root / "back"),
            "model": model.float().eval(),
            "dtype": dtype,
            "tie": tie,
        }
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_hf_megatron_hf_is_bit_exact(converted, case):
    c = converted[case]
    if CASES[case][3]:
        assert os.path.isfile(os.path.join(c["hf"], "model.safetensors.index.json"))  # the sharded input path
    original, again = hf_tensors(c["hf"]), hf_tensors(c["back"])
    assert sorted(again) == sorted(original)
    for name, t in original.items():
        assert again[name].dtype == t.dtype == c["dtype"] and torch.equal(again[name], t), name
    # Shards of at most 100 kB (a larger tensor alone) and an index naming every tensor's shard.
    shards = sorted(glob.glob(os.path.join(c["back"], "model-*-of-*.safetensors")))
    assert len(shards) > 1
    for f in shards:
        sizes = [t.numel() * t.element_size() for t in load_file(f).values()]
        assert sum(sizes) <= 100_000 or len(sizes) == 1, (f, sizes)
    index = json.load(open(os.path.join(c["back"], "model.safetensors.index.json")))
    assert {os.path.basename(f) for f in shards} == set(index["weight_map"].values())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    # config.json: the original one, so transformers builds the same model from the folder.
    written, source = (json.load(open(os.path.join(c[k], "config.json"))) for k in ("back", "hf"))
    assert written == source
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(c["back"], dtype=c["dtype"])
    assert reloaded.config.tie_word_embeddings == c["tie"]


def test_dtype_flag_casts_both_ways(converted, tmp_path):
    from gift_megatron.hf import checkpoint_dtype, hf_to_megatron, megatron_to_hf, resolve_checkpoint
    from gift_megatron.hf.convert import single_process_megatron

    c = converted["qwen3-untied-fp32"]
    hf_to_megatron(c["hf"], tmp_path / "meg16", dtype="bf16", progress=False)
    with single_process_megatron():
        assert checkpoint_dtype(resolve_checkpoint(tmp_path / "meg16")) == torch.bfloat16
    megatron_to_hf(tmp_path / "meg16", tmp_path / "back32", dtype="fp32", progress=False)
    original, again = hf_tensors(c["hf"]), hf_tensors(tmp_path / "back32")
    for name, t in original.items():  # fp32 -> bf16 -> fp32: exactly the bf16 rounding
        assert again[name].dtype == torch.float32 and torch.equal(again[name], t.to(torch.bfloat16).float()), name
    assert json.load(open(tmp_path / "back32" / "config.json"))["dtype"] == "float32"


@pytest.mark.parametrize("case", FP32)
def test_logits_equal_transformers_at_tp1(converted, case):
    from gift_megatron.hf.verify import compare_logits

    r = compare_logits(converted[case]["hf"], converted[case]["meg"], tp=1, batch=2, seq_length=12, seed=1)
    print(f"{case} TP=1: max |logit diff| vs transformers = {r.max_abs_diff:.2e} (logits up to {r.logit_scale:.2f})")
    assert r.max_abs_diff < 1e-5


# ------------------------------------------------------------------------------ 2 gloo ranks, all cases
def _megatron_greedy(model, cfg, prompt, steps):
    """The Megatron model's own greedy decode (full recompute per token; TP-gathered logits) and the
    log-softmax of each chosen token."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    def logits_of(ids):
        t = torch.tensor([ids])
        local = model(t, torch.arange(len(ids))[None], None)[0].float()  # [s, V_padded / tp]
        parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, -1)[:, : cfg.vocab_size]

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(logits_of(ids)[-1].argmax()))
        lp = torch.log_softmax(logits_of(ids[:-1]), -1)
    new = ids[len(prompt) :]
    return new, lp[len(prompt) - 1 :].gather(-1, torch.tensor(new)[:, None])[:, 0]


def _exports(model, cfg, dst_ranks):
    """dst_rank -> this rank's buckets (cloned), for each dst_rank in ``dst_ranks``."""
    from gift_megatron.hf import iter_hf_weights

    return {
        dst: [[(n, t.clone()) for n, t in b] for b in iter_hf_weights(model, cfg, bucket_bytes=BUCKET, dst_rank=dst)]
        for dst in dst_ranks
    }


def _ranks_worker(rank, world, cases):
    """For every case: TP=2 (logits, exports, in-memory loading, rollout engine), then PP=2 (exports,
    in-memory loading). Returns case -> results of this rank."""
    from gift_megatron.hf import (
        hf_config_dict,
        load_hf_weights_into_model,
        model_config_from_info,
        read_conversion_info,
        resolve_checkpoint,
    )
    from gift_megatron.megatron.checkpoint import load_checkpoint
    from gift_megatron.megatron.model import ParallelConfig, PrecisionConfig, build_model
    from gift_megatron.parallel import destroy_model_parallel_cpu, initialize_model_parallel_cpu

    results = {case: {} for case in cases}
    for tp, pp in ((2, 1), (1, 2)):
        initialize_model_parallel_cpu(tp, pp)
        for case, c in cases.items():
            r = results[case]
            info = read_conversion_info(c["meg"])
            cfg = model_config_from_info(info)
            precision = PrecisionConfig(dtype={"float32": "fp32", "bfloat16": "bf16"}[info["dtype"]])
            parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            model = build_model(cfg, parallel, precision).eval()  # the trainer's builder
            load_checkpoint(resolve_checkpoint(c["meg"]), [model], restore_rng=False)
            # The same model filled from the HF tensors in memory at this layout.
            again = build_model(cfg, parallel, precision)
            load_hf_weights_into_model(again, cfg, hf_tensors(c["hf"]))
            r[f"loader_equal_{tp}x{pp}"] = all(
                torch.equal(a, b)
                for a, b in zip(model.state_dict().values(), again.state_dict().values())
                if isinstance(a, torch.Tensor)
            )
            exported = model
            if precision.dtype == "bf16":  # the wrapper a bf16 trainer holds (DDP adds another .module)
                from megatron.core.transformer.module import Float16Module

                exported = Float16Module(model.config, model)
            r[f"export_{tp}x{pp}"] = _exports(exported, cfg, (None, 0, 1))
            if tp == 2 and info["dtype"] == "float32":
                tokens = c["tokens"]
                r["logits_tp2"] = _megatron_greedy_logits(model, cfg, tokens)
                # Rollout engine on rank 0, a fresh random transformers model fed by the export.
                engine = None
                if rank == 0:
                    from gift_megatron.rollout import HFRolloutEngine

                    torch.manual_seed(123)
                    fresh = transformers.AutoModelForCausalLM.from_config(
                        transformers.AutoConfig.for_model(**hf_config_dict(cfg, torch.float32)), dtype=torch.float32
                    )
                    engine = HFRolloutEngine(fresh, eos_token_id=None, pad_token_id=0)
                from gift_megatron.hf import iter_hf_tensors

                stream = iter_hf_tensors(model, cfg, bucket_bytes=1 << 14, dst_rank=0)
                if engine is not None:
                    engine.update_weights(stream)
                else:
                    for _ in stream:
                        pass
                ours = [_megatron_greedy(model, cfg, p, 6) for p in c["prompts"]]
                if engine is not None:
                    from gift_megatron.rollout import SamplingParams

                    outs = engine.generate(c["prompts"], SamplingParams(n=1, temperature=0.0, max_tokens=6))
                    r["engine"] = [(o.response_ids.tolist(), o.logprobs.clone()) for o in outs]
                    r["megatron_greedy"] = ours
        destroy_model_parallel_cpu()
    return results


def _megatron_greedy_logits(model, cfg, tokens):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        local = model(tokens, torch.arange(tokens.shape[1])[None].expand_as(tokens), None).float()
        parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, -1)[..., : cfg.vocab_size]


@pytest.fixture(scope="module")
def two_ranks(converted):
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    cases = {
        case: {"hf": c["hf"], "meg": c["meg"], "tokens": tokens, "prompts": [[5, 9, 13], [7, 2, 40, 41]]}
        for case, c in converted.items()
    }
    return tokens, run_ranks(_ranks_worker, 2, cases, timeout=300)


@pytest.mark.parametrize("case", FP32)
def test_logits_equal_transformers_at_tp2(converted, two_ranks, case):
    tokens, results = two_ranks
    with torch.no_grad():
        ref = converted[case]["model"](tokens).logits
    for rank in (0, 1):
        diff = (results[rank][case]["logits_tp2"] - ref).abs().max().item()
        print(f"{case} TP=2 rank {rank}: max |logit diff| vs transformers = {diff:.2e}")
        assert diff < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_export_at_tp2_and_pp2(converted, two_ranks, case):
    original = hf_tensors(converted[case]["hf"])
    _, results = two_ranks
    for layout in ("2x1", "1x2"):
        for rank in (0, 1):
            r = results[rank][case]
            assert r[f"loader_equal_{layout}"], f"in-memory HF loading differs from the checkpoint at {layout}"
            for dst, buckets in r[f"export_{layout}"].items():
                where = (layout, f"dst_rank={dst}", f"rank {rank}")
                if dst is not None and dst != rank:
                    assert buckets == [], where  # took part in the collectives, received nothing
                    continue
                exported = {n: t for b in buckets for n, t in b}
                assert sum(len(b) for b in buckets) == len(exported), where  # each tensor once
                assert sorted(exported) == sorted(original), where
                for name, t in original.items():
                    assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), (*where, name)
                sizes = [[t.numel() * t.element_size() for _, t in b] for b in buckets]
                for s in sizes:  # bounded: at most bucket_bytes, or one larger tensor alone
                    assert sum(s) <= BUCKET or len(s) == 1, (where, s)
                for s, nxt in itertools.pairwise(sizes):  # and full: the next tensor would not have fitted
                    assert sum(s) + nxt[0] > BUCKET, (where, s, nxt)


@pytest.mark.parametrize("case", FP32)
def test_rollout_engine_fed_by_the_tp2_export_decodes_like_megatron(two_ranks, case):
    _, results = two_ranks
    r = results[0][case]
    worst = 0.0
    for (engine_ids, engine_lp), (megatron_ids, megatron_lp) in zip(r["engine"], r["megatron_greedy"]):
        assert engine_ids == megatron_ids
        worst = max(worst, (engine_lp - megatron_lp).abs().max().item())
    print(f"{case}: engine vs Megatron (TP=2) greedy log-probs, max |diff| = {worst:.2e}")
    assert worst < 1e-5


# ----------------------------------------------------------------------------------------------- tools
def test_tools_round_trip_and_verify_at_tp2(converted, tmp_path, capsys):
    c = converted["qwen3-untied-fp32"]
    to_hf, verify = load_tool("convert_megatron_to_hf"), load_tool("verify_conversion")
    # One real command line (Megatron's checkpoint writer starts a spawned helper that imports __main__).
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "convert_hf_to_megatron.py"),
            "--hf",
            c["hf"],
            "--out",
            str(tmp_path / "meg"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0 and "wrote " in proc.stdout, proc.stderr[-3000:]
    assert "HF -> Megatron: 100%" in proc.stderr  # the progress bar
    assert (
        to_hf.main(
            [
                "--megatron",
                str(tmp_path / "meg" / "step_00000000"),
                "--out",
                str(tmp_path / "back"),
                "--max-shard-size",
                "50KB",
                "--no-progress",
            ]
        )
        == 0
    )
    original, again = hf_tensors(c["hf"]), hf_tensors(tmp_path / "back")
    assert sorted(again) == sorted(original) and all(torch.equal(again[n], t) for n, t in original.items())
    assert len(glob.glob(str(tmp_path / "back" / "model-*.safetensors"))) > 1
    capsys.readouterr()
    assert (
        verify.main(
            [
                "--hf",
                c["hf"],
                "--megatron",
                str(tmp_path / "meg"),
                "--tp",
                "2",
                "--prompt-ids",
                "5,9,13,2;7,2,40,41",
                "--timeout",
                "240",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    print(out)
    assert "max |logit difference|" in out and "over 2x4 tokens, TP=2" in out
    # Another model's weights under the same architecture: verification fails with exit 1.
    make_hf(tmp_path / "other", "qwen3", seed=7, shard="60KB")
    assert verify.main(["--hf", str(tmp_path / "other"), "--megatron", str(tmp_path / "meg")]) == 1


def test_training_checkpoint_needs_the_architecture(converted, tmp_path, capsys):
    """A checkpoint without the conversion record (a training run's): --hf-config gives the architecture."""
    import shutil

    c = converted["qwen2-tied-fp32"]
    shutil.copytree(os.path.join(c["meg"], "step_00000000"), tmp_path / "run" / "step_00000007")
    to_hf = load_tool("convert_megatron_to_hf")
    assert (
        to_hf.main(
            ["--megatron", str(tmp_path / "run" / "step_00000007"), "--out", str(tmp_path / "a"), "--no-progress"]
        )
        == 2
    )
    assert "pass the architecture with --hf-config" in capsys.readouterr().err
    assert (
        to_hf.main(
            [
                "--megatron",
                str(tmp_path / "run" / "step_00000007"),
                "--out",
                str(tmp_path / "b"),
                "--hf-config",
                os.path.join(c["hf"], "config.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    original, again = hf_tensors(c["hf"]), hf_tensors(tmp_path / "b")
    assert all(torch.equal(again[n], t) for n, t in original.items())
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b")  # config.json from hf_config_dict


# ------------------------------------------------------------------------------------------- bad input
def test_unsupported_architecture_lists_the_supported_ones(tmp_path, capsys):
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    gpt2.save_pretrained(tmp_path / "gpt2")
    to_meg = load_tool("convert_hf_to_megatron")
    assert to_meg.main(["--hf", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture 'GPT2LMHeadModel'" in err
    assert (
        "supported: LlamaForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Qwen2MoeForCausalLM, "
        "Qwen3ForCausalLM, Qwen3MoeForCausalLM"
    ) in err
    assert not (tmp_path / "o").exists()  # refused before writing anything


def test_missing_truncated_and_inconsistent_shards(tmp_path):
    from gift_megatron.hf import ConversionError, HFCheckpoint

    make_hf(tmp_path / "sharded", "llama", shard="60KB")
    shards = sorted(glob.glob(str(tmp_path / "sharded" / "model-*.safetensors")))
    assert len(shards) > 2
    HFCheckpoint(tmp_path / "sharded")  # fine as saved
    os.remove(shards[1])
    with pytest.raises(
        ConversionError,
        match=rf"model.safetensors.index.json: names shard "
        rf"{os.path.basename(shards[1])}, which does not exist",
    ):
        HFCheckpoint(tmp_path / "sharded")

    make_hf(tmp_path / "trunc", "qwen2")
    f = tmp_path / "trunc" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # the last tensor loses its tail
    with pytest.raises(
        ConversionError,
        match=r"trunc/model.safetensors: truncated safetensors file: tensor '.+' "
        r"ends at byte",
    ):
        HFCheckpoint(tmp_path / "trunc")
    f.write_bytes(b"\x10\x00")
    with pytest.raises(ConversionError, match=r"model.safetensors: truncated safetensors file \(2 bytes, no header\)"):
        HFCheckpoint(tmp_path / "trunc")

    # Tensors the config does not imply (Llama's attention_bias also biases o_proj: Megatron cannot).
    model = make_hf(tmp_path / "bias", "llama")
    cfg = json.load(open(tmp_path / "bias" / "config.json"))
    cfg["attention_bias"] = True
    json.dump(cfg, open(tmp_path / "bias" / "config.json", "w"))
    with pytest.raises(ConversionError, match="attention_bias=true puts a bias on o_proj"):
        HFCheckpoint(tmp_path / "bias")
    # A tensor missing from the weights, and one with the wrong shape (config says otherwise).
    tensors = hf_tensors(tmp_path / "bias")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(65)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "bias" / "model.safetensors"))
    model.config.save_pretrained(tmp_path / "bias")
    with pytest.raises(
        ConversionError,
        match=r"missing tensors \[model.layers.1.mlp.up_proj.weight\]; shapes that "
        r"do not match config.json: \[model.norm.weight: \[65\]",
    ):
        HFCheckpoint(tmp_path / "bias")


def test_tokenizer_larger_than_the_model_vocabulary(converted, tmp_path, capsys):
    make_hf(tmp_path / "small", "llama", vocab=10)
    save_tokenizer(tmp_path / "small", 17)
    to_meg = load_tool("convert_hf_to_megatron")
    assert to_meg.main(["--hf", str(tmp_path / "small"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "the tokenizer has 17 tokens but the model's vocab_size is 10" in capsys.readouterr().err
    # The same check on the way back for --tokenizer.
    save_tokenizer(tmp_path / "tok", 17)
    make_hf(tmp_path / "small2", "qwen2", vocab=12)
    from gift_megatron.hf import hf_to_megatron

    hf_to_megatron(tmp_path / "small2", tmp_path / "meg", progress=False)
    to_hf = load_tool("convert_megatron_to_hf")
    assert (
        to_hf.main(
            [
                "--megatron",
                str(tmp_path / "meg"),
                "--out",
                str(tmp_path / "back"),
                "--tokenizer",
                str(tmp_path / "tok"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "--tokenizer" in (err := capsys.readouterr().err) and "17 tokens" in err and "vocab_size is 12" in err
    # A fitting tokenizer is copied from the conversion record when --tokenizer is not given.
    make_hf(tmp_path / "fits", "qwen2", vocab=20)
    save_tokenizer(tmp_path / "fits", 17)
    hf_to_megatron(tmp_path / "fits", tmp_path / "meg2", progress=False)
    assert to_hf.main(["--megatron", str(tmp_path / "meg2"), "--out", str(tmp_path / "back2"), "--no-progress"]) == 0
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "back2" / f).read_bytes() == (tmp_path / "fits" / f).read_bytes(), f


def test_impossible_tp_and_bad_flags(converted, capsys):
    c = converted["qwen2-tied-fp32"]
    verify = load_tool("verify_conversion")
    assert verify.main(["--hf", c["hf"], "--megatron", c["meg"], "--tp", "4"]) == 2
    assert (
        "--tp 4: parallel.tensor_model_parallel_size (4) does not divide model.num_query_groups (2 KV heads)"
        in capsys.readouterr().err
    )
    assert verify.main(["--hf", c["hf"], "--megatron", c["meg"], "--prompt-ids", "1,2,300"]) == 2
    assert "token ids must lie in [0, 100)" in capsys.readouterr().err
    to_hf = load_tool("convert_megatron_to_hf")
    assert to_hf.main(["--megatron", c["meg"], "--out", "/nonexistent/x", "--max-shard-size", "5 parsecs"]) == 2
    assert "--max-shard-size '5 parsecs': expected a size such as 5GB" in capsys.readouterr().err


def test_in_memory_loader_errors_name_the_tensor(converted):
    from gift_megatron.hf import ConversionError, build_cpu_model, load_hf_weights_into_model
    from gift_megatron.hf.convert import single_process_megatron
    from gift_megatron.megatron.model import ModelConfig

    c = converted["qwen3-untied-fp32"]
    cfg = ModelConfig.from_hf_config(json.load(open(os.path.join(c["hf"], "config.json"))))
    tensors = hf_tensors(c["hf"])
    with single_process_megatron():
        model = build_cpu_model(cfg, torch.float32)
        bad = dict(tensors, **{"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})
        with pytest.raises(
            ConversionError,
            match=r"'model.layers.0.self_attn.q_norm.weight' has shape \[16\], the "
            r"config implies \[24\]",
        ):
            load_hf_weights_into_model(model, cfg, bad)
        with pytest.raises(ConversionError, match=r"'model.layers.9.mlp.up_proj.weight' is not part of"):
            load_hf_weights_into_model(model, cfg, {**tensors, "model.layers.9.mlp.up_proj.weight": torch.ones(1)})
        partial = {n: t for n, t in tensors.items() if "k_proj" not in n}
        with pytest.raises(
            ConversionError,
            match=r"2 parameters were not set: the HF source has no "
            r"\['model.layers.0.self_attn.k_proj.weight'",
        ):
            load_hf_weights_into_model(model, cfg, partial)


def test_transformer_engine_norm_names_load_and_export(converted):
    """With the Transformer Engine spec the layer norms live inside the next linear layer
    (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``). TE does not run on CPU, so the
    local-spec model is re-spelled that way: its norms are moved into those attributes, and loading and
    exporting must go by the model's own names."""
    from gift_megatron.hf import build_cpu_model, iter_hf_tensors, load_hf_weights_into_model
    from gift_megatron.hf.convert import single_process_megatron
    from gift_megatron.megatron.model import ModelConfig

    c = converted["qwen2-untied-bf16"]
    cfg = ModelConfig.from_hf_config(json.load(open(os.path.join(c["hf"], "config.json"))))
    tensors = hf_tensors(c["hf"])
    with single_process_megatron():
        model = build_cpu_model(cfg, torch.bfloat16)
        for layer in model.decoder.layers:
            layer.self_attention.linear_qkv.register_parameter("layer_norm_weight", layer.input_layernorm.weight)
            layer.mlp.linear_fc1.register_parameter("layer_norm_weight", layer.pre_mlp_layernorm.weight)
            layer.input_layernorm, layer.pre_mlp_layernorm = torch.nn.Identity(), torch.nn.Identity()
        names = {n for n, _ in model.named_parameters()}
        assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
        assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        load_hf_weights_into_model(model, cfg, tensors)
        for i, layer in enumerate(model.decoder.layers):
            assert torch.equal(
                layer.self_attention.linear_qkv.layer_norm_weight, tensors[f"model.layers.{i}.input_layernorm.weight"]
            )
            assert torch.equal(
                layer.mlp.linear_fc1.layer_norm_weight, tensors[f"model.layers.{i}.post_attention_layernorm.weight"]
            )
        exported = dict(iter_hf_tensors(model, cfg))
    assert sorted(exported) == sorted(tensors)
    for name, t in tensors.items():
        assert torch.equal(exported[name], t), name


# ------------------------------------------------------------------------------------- --out and --force
def _tree_bytes(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


def test_non_empty_out_is_refused_without_force_and_replaced_safely_with_it(converted, tmp_path, capsys, monkeypatch):
    """A non-empty --out is refused (naming --force); with --force a failed conversion leaves the old
    output as it was, a successful one replaces it, and no staging directory is left behind."""
    import gift_megatron.hf.convert as convert

    qwen, llama = converted["qwen2-tied-fp32"], converted["llama-untied-fp32"]
    to_meg, to_hf = load_tool("convert_hf_to_megatron"), load_tool("convert_megatron_to_hf")
    out = tmp_path / "ckpt"
    assert to_meg.main(["--hf", qwen["hf"], "--out", str(out), "--no-progress"]) == 0
    before = _tree_bytes(out)
    assert to_meg.main(["--hf", llama["hf"], "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: directory is not empty" in err and "--force" in err
    assert json.loads((out / "gift_conversion.json").read_text())["hf_source"] == os.path.abspath(qwen["hf"])

    def broken(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    # Fails after the new weights are written (the tokenizer copy comes next): written in place, they
    # would already have replaced the old checkpoint's.
    monkeypatch.setattr(convert, "copy_tokenizer_files", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        to_meg.main(["--hf", llama["hf"], "--out", str(out), "--no-progress", "--force"])
    assert _tree_bytes(out) == before  # the old checkpoint is untouched
    monkeypatch.undo()
    assert to_meg.main(["--hf", llama["hf"], "--out", str(out), "--no-progress", "--force"]) == 0
    assert json.loads((out / "gift_conversion.json").read_text())["hf_source"] == os.path.abspath(llama["hf"])
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no .ckpt.partial-* / .ckpt.old-* left

    back = tmp_path / "back"
    back.mkdir()
    (back / "notes.txt").write_text("keep me")
    assert to_hf.main(["--megatron", str(out), "--out", str(back), "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err and (back / "notes.txt").read_text() == "keep me"
    assert to_hf.main(["--megatron", str(out), "--out", str(back), "--no-progress", "--force"]) == 0
    assert not (back / "notes.txt").exists()
    original, again = hf_tensors(llama["hf"]), hf_tensors(back)
    assert sorted(again) == sorted(original) and all(torch.equal(again[n], t) for n, t in original.items())
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []
    # An output that holds the input is refused even with --force (replacing it would delete the input).
    assert to_hf.main(["--megatron", str(out / "step_00000000"), "--out", str(out), "--no-progress", "--force"]) == 2
    assert "holds the input" in capsys.readouterr().err and (out / "latest").exists()
    # An empty directory is fine without --force (e.g. one made by a job script).
    (tmp_path / "empty").mkdir()
    assert to_hf.main(["--megatron", str(out), "--out", str(tmp_path / "empty"), "--no-progress"]) == 0


def _scaled_bf16_model(path, seed, head_scale):
    """A bf16 Qwen2 model whose logits are ``head_scale`` times the usual tiny model's (lm_head scaled)."""
    model = make_hf(path, "qwen2", dtype=torch.float32, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.to(torch.bfloat16).save_pretrained(str(path))


def _verify(verify, capsys, hf, meg) -> tuple[int, float, float]:
    """(exit code, max |diff|, largest |logit|) of tools/verify_conversion.py at TP=1 (in this process)."""
    import re

    code = verify.main(["--hf", str(hf), "--megatron", str(meg), "--prompt-ids", "5,9,13,2,77,31;7,2,40,41,99,0"])
    out = capsys.readouterr().out
    diff = float(re.search(r"max \|logit difference\| = (\S+) ", out).group(1))
    scale = float(re.search(r"largest \|logit\| (\S+);", out).group(1))
    return code, diff, scale


def test_bf16_verify_tolerance_is_relative_to_the_logits_scale(tmp_path, capsys):
    """Large logits: a correct bf16 conversion differs by more than the old absolute 0.5 and passes; small
    logits: another model's weights differ by less than 0.5 and fail."""
    from gift_megatron.hf import hf_to_megatron

    verify = load_tool("verify_conversion")
    _scaled_bf16_model(tmp_path / "big", 0, 40.0)
    hf_to_megatron(tmp_path / "big", tmp_path / "big-meg", progress=False)
    code, diff, scale = _verify(verify, capsys, tmp_path / "big", tmp_path / "big-meg")
    print(f"correct, large logits: max |diff| {diff:.3g}, scale {scale:.3g}, relative {diff / scale:.3g}")
    assert code == 0 and diff > 0.5
    _scaled_bf16_model(tmp_path / "small", 0, 0.1)
    _scaled_bf16_model(tmp_path / "small-other", 3, 0.1)
    hf_to_megatron(tmp_path / "small", tmp_path / "small-meg", progress=False)
    code, diff, scale = _verify(verify, capsys, tmp_path / "small-other", tmp_path / "small-meg")
    print(f"another model, small logits: max |diff| {diff:.3g}, scale {scale:.3g}, relative {diff / scale:.3g}")
    assert code == 1 and diff < 0.5
    assert (
        verify.main(["--hf", str(tmp_path / "small"), "--megatron", str(tmp_path / "small-meg"), "--tolerance", "0"])
        == 2
    )
    assert "--tolerance 0.0: must be > 0" in capsys.readouterr().err
