"""HF <-> Megatron conversion against transformers' own models (random tiny ones, no downloads):
logits equal at TP=1 and TP=2, HF -> Megatron -> HF bit-exact, the streaming export at TP=2 and PP=2 equal
to the HF tensors in bounded buckets, the CPU rollout engine fed by the export decoding exactly like the
Megatron model, and bad input."""

from __future__ import annotations

import glob
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

# family -> (config class, model class, extra config): heads 4, KV groups 2, head_dim 16.
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}, "max_position_embeddings": 16384}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 24}),
}


def make_hf(path, family, *, tie=False, dtype=torch.float32, seed=0, vocab=100):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=tie,
                     rms_norm_eps=1e-6, **{"max_position_embeddings": 64, **extra})
    model = model_cls(cfg).to(dtype)
    with torch.no_grad():  # norms are ones at init: make them informative so a mix-up would show
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path))
    return model


def hf_tensors(path):
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def tool(name, *args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args, "--no-progress"] if name !=
                          "verify_conversion.py" else [sys.executable, os.path.join(ROOT, "tools", name), *args],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check and proc.returncode:
        raise AssertionError(proc.stdout[-2000:] + proc.stderr[-4000:])
    return proc


def _layout_worker(rank, world, ckpt, tp, pp, tokens, bucket_bytes):
    """Load the converted checkpoint at (tp, pp); TP-gathered logits (pp == 1) and the export on rank 0."""
    from gift_megatron.checkpoint import iter_hf_weights, resolve_checkpoint
    from gift_megatron.checkpoint.convert import model_config_from_info, read_conversion_info
    from gift_megatron.megatron.checkpoint import load_checkpoint
    from gift_megatron.megatron.model import ParallelConfig, PrecisionConfig, build_model
    from gift_megatron.parallel import destroy_model_parallel_cpu, initialize_model_parallel_cpu

    import torch.distributed as dist

    initialize_model_parallel_cpu(tp, pp)
    info = read_conversion_info(ckpt)
    cfg = model_config_from_info(info)
    dtype = {"float32": "fp32", "bfloat16": "bf16"}[info["dtype"]]
    model = build_model(cfg, ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                        PrecisionConfig(dtype=dtype))
    load_checkpoint(resolve_checkpoint(ckpt), [model], restore_rng=False)
    logits = None
    if pp == 1:
        with torch.no_grad():
            local = model(tokens, torch.arange(tokens.shape[1])[None].expand_as(tokens), None).float()
            parts = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(parts, local.contiguous())
            logits = torch.cat(parts, -1)[..., :cfg.vocab_size]
    buckets = [[(n, t.clone()) for n, t in b] for b in iter_hf_weights(model, cfg, bucket_bytes=bucket_bytes,
                                                                        dst_rank=0)]
    destroy_model_parallel_cpu()
    return logits, buckets


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family, tie, dtype", [("llama", False, torch.float32), ("qwen2", True, torch.float32),
                                                ("qwen3", False, torch.float32), ("qwen2", False, torch.bfloat16)])
def test_hf_megatron_hf_round_trip_logits_and_export(tmp_path, family, tie, dtype):
    hf_dir, meg, back = tmp_path / "hf", tmp_path / "meg", tmp_path / "back"
    model = make_hf(hf_dir, family, tie=tie, dtype=dtype)
    tool("convert_hf_to_megatron.py", "--hf", str(hf_dir), "--out", str(meg))
    tool("convert_megatron_to_hf.py", "--megatron", str(meg), "--out", str(back), "--max-shard-size", "100KB")
    original, again = hf_tensors(hf_dir), hf_tensors(back)
    assert sorted(again) == sorted(original)
    for name, t in original.items():  # bit-exact, dtype included
        assert again[name].dtype == t.dtype and torch.equal(again[name], t), name
    assert len(glob.glob(str(back / "*.safetensors"))) > 1 and (back / "model.safetensors.index.json").is_file()
    assert transformers.AutoConfig.from_pretrained(back).to_dict()["tie_word_embeddings"] == tie

    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.float()(tokens).logits if dtype == torch.float32 else None
    bucket = 20_000
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        if dtype != torch.float32 and (tp, pp) != (2, 1):
            continue
        results = run_ranks(_layout_worker, tp * pp, str(meg), tp, pp, tokens, bucket, timeout=240)
        logits, buckets = results[0]
        if ref is not None and logits is not None:
            diff = (logits - ref).abs().max().item()
            print(f"{family} tie={tie} TP={tp}: max |logit diff| vs transformers = {diff:.2e}")
            assert diff < 1e-5
        exported = {n: t for b in buckets for n, t in b}
        assert sorted(exported) == sorted(original), (tp, pp)
        for name, t in original.items():
            assert torch.equal(exported[name], t), (tp, pp, name)
        for b in buckets[:-1]:
            # A bucket closes once it reaches bucket_bytes, after the HF parts (at most 3: q, k, v) of the
            # Megatron tensor that crossed the line: bounded by bucket_bytes + one fused tensor.
            sizes = [t.numel() * t.element_size() for _, t in b]
            assert sum(sizes[:-3]) < bucket <= sum(sizes)
        if tp * pp > 1:
            assert all(not b for b in results[1][1]), "non-destination ranks received tensors"


def test_engine_fed_by_the_export_decodes_like_the_megatron_model(tmp_path):
    from gift_megatron.checkpoint import hf_config_dict, hf_to_megatron, iter_hf_weights, resolve_checkpoint
    from gift_megatron.checkpoint.convert import single_process_megatron
    from gift_megatron.megatron.checkpoint import load_checkpoint
    from gift_megatron.megatron.model import ModelConfig, ParallelConfig, PrecisionConfig, build_model
    from gift_megatron.rollout import HFRolloutEngine, SamplingParams

    make_hf(tmp_path / "hf", "qwen2", seed=3)
    hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "meg"), progress=False)
    cfg = ModelConfig.from_hf_config(json.load(open(tmp_path / "hf" / "config.json")))
    prompts = [[5, 9, 13], [7, 2, 40, 41]]
    with single_process_megatron():
        model = build_model(cfg, ParallelConfig(), PrecisionConfig(dtype="fp32")).eval()
        load_checkpoint(resolve_checkpoint(str(tmp_path / "meg")), [model], restore_rng=False)
        torch.manual_seed(123)  # a different random model: every weight must come from the stream
        fresh = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**hf_config_dict(cfg, torch.float32)), dtype=torch.float32)
        engine = HFRolloutEngine(fresh, eos_token_id=None, pad_token_id=0)
        engine.update_weights(t for b in iter_hf_weights(model, cfg, bucket_bytes=1 << 16) for t in b)
        outs = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=6))
        worst = 0.0
        for prompt, out in zip(prompts, outs):
            ids = list(prompt)
            for _ in range(6):  # the Megatron model's own greedy decode, full recompute each step
                with torch.no_grad():
                    t = torch.tensor([ids])
                    logits = model(t, torch.arange(len(ids))[None], None)[0, -1, :cfg.vocab_size].float()
                ids.append(int(logits.argmax()))
            assert out.response_ids.tolist() == ids[len(prompt):]
            with torch.no_grad():
                t = torch.tensor([ids[:-1]])
                lp = torch.log_softmax(model(t, torch.arange(t.shape[1])[None], None)[0, :, :cfg.vocab_size].float(), -1)
            ours = lp[len(prompt) - 1:].gather(-1, torch.tensor(ids[len(prompt):])[:, None])[:, 0]
            worst = max(worst, (ours - out.logprobs).abs().max().item())
        print(f"engine vs Megatron greedy log-probs: max |diff| = {worst:.2e}")
        assert worst < 1e-5


def test_bad_inputs_name_the_problem(tmp_path):
    from gift_megatron.checkpoint import ConversionError, HFCheckpoint

    # Unsupported architecture: the error lists the supported ones.
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    gpt2.save_pretrained(tmp_path / "gpt2")
    proc = tool("convert_hf_to_megatron.py", "--hf", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o1"), check=False)
    assert proc.returncode == 2 and "unsupported architecture 'GPT2LMHeadModel'" in proc.stderr
    assert "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in proc.stderr

    # A sharded checkpoint whose index names a missing shard; a truncated shard.
    model = make_hf(tmp_path / "sharded", "llama")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted(glob.glob(str(tmp_path / "sharded" / "model-*.safetensors")))
    assert len(shards) > 1
    os.remove(shards[1])
    with pytest.raises(ConversionError, match=rf"names shard {os.path.basename(shards[1])}, which does not exist"):
        HFCheckpoint(str(tmp_path / "sharded"))
    make_hf(tmp_path / "trunc", "llama")
    f = tmp_path / "trunc" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ConversionError, match="model.safetensors: unreadable safetensors file"):
        HFCheckpoint(str(tmp_path / "trunc"))

    # A tokenizer with more tokens than the model's vocabulary.
    from gift_megatron.data.toy import build_tokenizer

    make_hf(tmp_path / "small", "llama", vocab=10)
    build_tokenizer().save_pretrained(tmp_path / "small")  # 17 tokens
    proc = tool("convert_hf_to_megatron.py", "--hf", str(tmp_path / "small"), "--out", str(tmp_path / "o2"), check=False)
    assert proc.returncode == 2 and "the tokenizer has 17 tokens but the model's vocab_size is 10" in proc.stderr

    # A TP size that does not divide the KV heads (verify refuses it before loading anything).
    make_hf(tmp_path / "ok", "qwen2")
    proc = tool("verify_conversion.py", "--hf", str(tmp_path / "ok"), "--megatron", str(tmp_path / "none"), "--tp", "4",
                check=False)
    assert proc.returncode == 2 and "does not divide model.num_query_groups (2 KV heads)" in proc.stderr


@pytest.mark.timeout(300)
def test_verify_tool_at_tp2_and_its_failure_exit(tmp_path):
    make_hf(tmp_path / "hf", "qwen3")
    tool("convert_hf_to_megatron.py", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "meg"))
    proc = tool("verify_conversion.py", "--hf", str(tmp_path / "hf"), "--megatron", str(tmp_path / "meg"), "--tp", "2")
    assert "max |logit difference|" in proc.stdout and "TP=2" in proc.stdout
    # Another model's weights under the same architecture: verification must fail.
    make_hf(tmp_path / "other", "qwen3", seed=7)
    proc = tool("verify_conversion.py", "--hf", str(tmp_path / "other"), "--megatron", str(tmp_path / "meg"), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
