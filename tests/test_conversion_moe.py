"""Mixture-of-Experts conversion against transformers' own Qwen3-MoE, Qwen2-MoE and Mixtral (random tiny models
built here with transformers' config classes; no downloads).

- HF -> Megatron -> HF is bit-exact for the three families, from per-expert files (what save_pretrained
  writes) and from fused files (transformers 5's in-memory ``mlp.experts.gate_up_proj`` / ``down_proj``);
- the converted checkpoints give transformers' logits at TP=1 (this process), at TP=2 (sequence parallel,
  expert-TP 2) and at EP=2 (2 gloo ranks), and through ``tools/verify_conversion.py --ep 2``;
- the streaming export at TP=2 (experts split over ETP), EP=2 and PP=2, to every rank or to one, equals the
  single-process export (names, order, bits) in bounded buckets; the in-memory loader fills those layouts
  from per-expert and from fused tensors; the CPU rollout engine fed by the EP=2 export decodes greedily
  like the Megatron model and reports its log-probs;
- conversion holds one layer's experts at a time: its peak memory (measured) grows from 4 to 16 experts by
  about one layer's worth, not by the whole model's;
- bad input: an expert count other than config.json's (per-expert or fused HF files, a Megatron
  checkpoint), an unsupported MoE architecture, impossible --ep / --tp.

The tiny models: 2 layers, hidden 64, 4 heads in 2 query groups, 4 experts of width 32, top-2, vocabulary
100. Qwen3-MoE keeps layer 1 dense (mlp_only_layers) with head_dim 24; Qwen2-MoE has the gated shared expert
(width 48), Q/K/V biases and pre-softmax routing (norm_topk_prob false).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.multiproc import run_ranks  # noqa: E402
from tests.test_conversion import load_tool  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral")
VOCAB = 100
BUCKET = 12_000  # bytes: between the tiny models' tensor sizes, so buckets hold one to a few tensors
PROMPTS = [[5, 9, 13, 2], [7, 2, 40, 41]]


def make_moe(path, family, *, experts=4, layers=2, hidden=64, width=32, seed=0, fused=False, shard=None):
    """A random transformers MoE model of ``family`` saved into ``path`` (per-expert names as save_pretrained
    writes them, or ``fused``: its in-memory state dict as is); returns the model. Norms and biases are
    randomized too (they start at ones / zeros, which would hide a mix-up)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        max_position_embeddings=64,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            intermediate_size=96,
            moe_intermediate_size=width,
            num_experts=experts,
            head_dim=24,
            mlp_only_layers=[1] if layers > 1 else [],
            norm_topk_prob=True,
            **common,
        )
        model = transformers.Qwen3MoeForCausalLM(cfg)
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            intermediate_size=96,
            moe_intermediate_size=width,
            num_experts=experts,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
            **common,
        )
        model = transformers.Qwen2MoeForCausalLM(cfg)
    else:
        cfg = transformers.MixtralConfig(intermediate_size=width, num_local_experts=experts, **common)
        model = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    if fused:
        model.config.architectures = [type(model).__name__]  # what save_pretrained records
        model.config.save_pretrained(str(path))
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(str(path), "model.safetensors"),
            metadata={"format": "pt"},
        )
    else:
        model.save_pretrained(str(path), **({"max_shard_size": shard} if shard else {}))
    return model


def hf_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(str(path), "*.safetensors"))):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> paths (hf: per-expert files, fused: fused files, meg, back) and the transformers model."""
    from gift_megatron.hf import hf_to_megatron, megatron_to_hf

    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        model = make_moe(root / "hf", family, shard="40KB" if family == "qwen3_moe" else None)
        make_moe(root / "fused", family, fused=True)
        hf_to_megatron(root / "hf", root / "meg", progress=False)
        megatron_to_hf(root / "meg", root / "back", max_shard_bytes=60_000, progress=False)
        out[family] = {k: str(root / k) for k in ("hf", "fused", "meg", "back")}
        out[family]["model"] = model
    # The fused spelling end to end for the family whose names also move (block_sparse_moe <-> mlp).
    root = tmp_path_factory.mktemp("mixtral-fused")
    hf_to_megatron(out["mixtral"]["fused"], root / "meg", progress=False)
    megatron_to_hf(root / "meg", root / "back", progress=False)
    out["mixtral"]["fused_back"] = str(root / "back")
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_megatron_hf_is_bit_exact(converted, family):
    c = converted[family]
    original, again = hf_tensors(c["hf"]), hf_tensors(c["back"])
    assert any(".experts.3." in n for n in original) and not any("gate_up_proj" in n for n in again)
    assert sorted(again) == sorted(original)
    for name, t in original.items():
        assert again[name].dtype == t.dtype and torch.equal(again[name], t), name
    written, source = (json.load(open(os.path.join(c[k], "config.json"))) for k in ("back", "hf"))
    assert written == source
    if family == "qwen3_moe":  # the sharded input path
        assert os.path.isfile(os.path.join(c["hf"], "model.safetensors.index.json"))


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_files_read_as_per_expert_tensors(converted, family):
    """A file with transformers' in-memory names gives exactly the per-expert tensors save_pretrained writes."""
    from gift_megatron.hf import HFCheckpoint

    c = converted[family]
    fused_names = load_file(os.path.join(c["fused"], "model.safetensors")).keys()
    assert any(n.endswith("experts.gate_up_proj") for n in fused_names)
    hf = HFCheckpoint(c["fused"])
    per_expert = hf_tensors(c["hf"])
    got = dict(hf.iter_tensors())
    assert sorted(got) == sorted(per_expert) == sorted(hf.names)
    for name, t in per_expert.items():
        assert torch.equal(got[name], t), name
    assert torch.equal(
        hf.tensor(
            "model.layers.0."
            + ("block_sparse_moe.experts.3.w3.weight" if family == "mixtral" else "mlp.experts.3.up_proj.weight")
        ),
        per_expert[
            "model.layers.0."
            + ("block_sparse_moe.experts.3.w3.weight" if family == "mixtral" else "mlp.experts.3.up_proj.weight")
        ],
    )
    if family == "mixtral":  # and end to end through a Megatron checkpoint
        again = hf_tensors(c["fused_back"])
        assert sorted(again) == sorted(per_expert) and all(torch.equal(again[n], t) for n, t in per_expert.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_at_tp1(converted, family):
    from gift_megatron.hf.verify import compare_logits

    r = compare_logits(converted[family]["hf"], converted[family]["meg"], tp=1, batch=2, seq_length=12, seed=1)
    print(
        f"{family} TP=1 EP=1: max |logit diff| vs transformers = {r.max_abs_diff:.2e} (logits up to "
        f"{r.logit_scale:.2f})"
    )
    assert r.max_abs_diff < 1e-5


# ------------------------------------------------------------------------------- 2 gloo ranks, 3 layouts
def _gathered_logits(model, cfg, tokens):
    """[b, s, vocab] fp32 logits of a TP-sharded model (every rank of the TP group gets all of them)."""
    from megatron.core import parallel_state as ps

    from gift_megatron.comm import all_gather_tensors

    with torch.no_grad():
        local = model(tokens, torch.arange(tokens.shape[1])[None].expand_as(tokens), None).float()
    return torch.cat(all_gather_tensors(local, ps.get_tensor_model_parallel_group()), -1)[..., : cfg.vocab_size]


def _megatron_greedy(model, cfg, prompt, steps):
    """The Megatron model's own greedy decode (full recompute per token) and the log-softmax of each chosen
    token. Every rank of an EP group runs the same forwards (the token dispatch is collective)."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(_gathered_logits(model, cfg, torch.tensor([ids]))[0, -1].argmax()))
    lp = torch.log_softmax(_gathered_logits(model, cfg, torch.tensor([ids[:-1]]))[0], -1)
    new = ids[len(prompt) :]
    return new, lp[len(prompt) - 1 :].gather(-1, torch.tensor(new)[:, None])[:, 0]


def _ranks_worker(rank, world, cases, tokens):
    """Per layout (TP=2 with sequence parallelism and ETP=2; EP=2; PP=2) and family: logits (not at PP=2),
    the in-memory loader from per-expert and fused HF tensors, the export to every rank and to each rank,
    and (EP=2) a CPU rollout engine on rank 0 fed by the export."""
    from gift_megatron.hf import (
        hf_config_dict,
        iter_hf_tensors,
        iter_hf_weights,
        load_hf_weights_into_model,
        model_config_from_info,
        read_conversion_info,
        resolve_checkpoint,
    )
    from gift_megatron.megatron.checkpoint import load_checkpoint
    from gift_megatron.megatron.model import ParallelConfig, PrecisionConfig, build_model
    from gift_megatron.parallel import destroy_model_parallel_cpu, initialize_model_parallel_cpu

    results = {family: {} for family in cases}
    for name, tp, pp, ep in (("tp2", 2, 1, 1), ("ep2", 1, 1, 2), ("pp2", 1, 2, 1)):
        initialize_model_parallel_cpu(tp, pp, expert_model_parallel_size=ep, expert_tensor_parallel_size=tp)
        for family, c in cases.items():
            r = results[family]
            cfg = model_config_from_info(read_conversion_info(c["meg"]))
            parallel = ParallelConfig(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                expert_model_parallel_size=ep,
                sequence_parallel=tp > 1,
            )
            model = build_model(cfg, parallel, PrecisionConfig(dtype="fp32")).eval()  # the trainer's builder
            load_checkpoint(resolve_checkpoint(c["meg"]), [model], restore_rng=False)
            for source in ("hf", "fused"):
                again = build_model(cfg, parallel, PrecisionConfig(dtype="fp32"))
                tensors = hf_tensors(c[source]) if source == "hf" else c["fused_state"]
                load_hf_weights_into_model(again, cfg, tensors)
                r[f"loader_{source}_{name}"] = all(
                    torch.equal(a, b)
                    for a, b in zip(model.state_dict().values(), again.state_dict().values())
                    if isinstance(a, torch.Tensor)
                )
            r[f"export_{name}"] = {
                dst: [
                    [(n, t.clone()) for n, t in b]
                    for b in iter_hf_weights(model, cfg, bucket_bytes=BUCKET, dst_rank=dst)
                ]
                for dst in (None, 0, 1)
            }
            # Every replica to its own destination at once, as the trainer syncs each replica's engine owner:
            # at EP=2 each rank is a replica (and holds half of the other's experts); at TP=2 the two ranks are
            # one replica, so two destinations are an error.
            try:
                r[f"export_own_{name}"] = [
                    [(n, t.clone()) for n, t in b]
                    for b in iter_hf_weights(model, cfg, bucket_bytes=BUCKET, dst_rank=rank)
                ]
            except ValueError as exc:
                r[f"export_own_{name}"] = str(exc)
            if pp == 1:
                r[f"logits_{name}"] = _gathered_logits(model, cfg, tokens)
            if name == "ep2":
                engine = None
                if rank == 0:
                    from gift_megatron.rollout import HFRolloutEngine

                    torch.manual_seed(123)
                    fresh = transformers.AutoModelForCausalLM.from_config(
                        transformers.AutoConfig.for_model(
                            **hf_config_dict(cfg, torch.float32, eos_token_id=None, bos_token_id=None, pad_token_id=0)
                        ),
                        dtype=torch.float32,
                    )
                    engine = HFRolloutEngine(fresh, eos_token_id=None, pad_token_id=0)
                stream = iter_hf_tensors(model, cfg, bucket_bytes=BUCKET, dst_rank=0)
                if engine is not None:
                    engine.update_weights(stream)
                else:
                    for _ in stream:
                        pass
                ours = [_megatron_greedy(model, cfg, p, 6) for p in PROMPTS]
                if engine is not None:
                    from gift_megatron.rollout import SamplingParams

                    outs = engine.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_tokens=6))
                    r["engine"] = [(o.response_ids.tolist(), o.logprobs.clone()) for o in outs]
                    r["megatron_greedy"] = ours
        destroy_model_parallel_cpu()
    return results


@pytest.fixture(scope="module")
def two_ranks(converted):
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    cases = {
        f: {
            "hf": c["hf"],
            "fused": c["fused"],
            "meg": c["meg"],
            "fused_state": {k: v.clone() for k, v in c["model"].state_dict().items()},
        }
        for f, c in converted.items()
    }
    return tokens, run_ranks(_ranks_worker, 2, cases, tokens, timeout=420)


@pytest.fixture(scope="module")
def single_process_exports(converted):
    """family -> the export of the checkpoint at TP=1 / EP=1 / PP=1 in this process: [(name, tensor)]."""
    from gift_megatron.hf import (
        build_cpu_model,
        iter_hf_tensors,
        model_config_from_info,
        read_conversion_info,
        resolve_checkpoint,
    )
    from gift_megatron.hf.convert import single_process_megatron
    from gift_megatron.megatron.checkpoint import load_checkpoint

    out = {}
    with single_process_megatron():
        for family, c in converted.items():
            cfg = model_config_from_info(read_conversion_info(c["meg"]))
            model = build_cpu_model(cfg, torch.float32)
            load_checkpoint(resolve_checkpoint(c["meg"]), [model], restore_rng=False)
            out[family] = [(n, t.clone()) for n, t in iter_hf_tensors(model, cfg)]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_at_tp2_and_ep2(converted, two_ranks, family):
    tokens, results = two_ranks
    with torch.no_grad():
        ref = converted[family]["model"](tokens).logits
    for layout in ("tp2", "ep2"):
        for rank in (0, 1):
            diff = (results[rank][family][f"logits_{layout}"] - ref).abs().max().item()
            print(f"{family} {layout} rank {rank}: max |logit diff| vs transformers = {diff:.2e}")
            assert diff < 1e-5, (layout, rank, diff)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_at_tp2_ep2_pp2_equals_the_single_process_export(converted, two_ranks, single_process_exports, family):
    reference = single_process_exports[family]
    original = hf_tensors(converted[family]["hf"])
    assert sorted(n for n, _ in reference) == sorted(original)  # the single-process export: the HF files' names
    assert all(torch.equal(t, original[n]) for n, t in reference)
    _, results = two_ranks
    for layout in ("tp2", "ep2", "pp2"):
        for rank in (0, 1):
            r = results[rank][family]
            for source in ("hf", "fused"):
                assert r[f"loader_{source}_{layout}"], (
                    f"in-memory {source} loading differs from the checkpoint at {layout}"
                )
            for dst, buckets in r[f"export_{layout}"].items():
                where = (layout, f"dst_rank={dst}", f"rank {rank}")
                if dst is not None and dst != rank:
                    assert buckets == [], where  # took part in the collectives, received nothing
                    continue
                exported = [(n, t) for b in buckets for n, t in b]
                if layout != "pp2":  # the same order too (PP=2 sends stage 0's tensors, then stage 1's)
                    assert [n for n, _ in exported] == [n for n, _ in reference], where
                assert sorted(n for n, _ in exported) == sorted(n for n, _ in reference), where
                got = dict(exported)
                for name, t in reference:
                    assert got[name].dtype == t.dtype and torch.equal(got[name], t), (*where, name)
                for b in buckets:  # bounded: at most bucket_bytes, or one larger tensor alone
                    sizes = [t.numel() * t.element_size() for _, t in b]
                    assert sum(sizes) <= BUCKET or len(sizes) == 1, (where, sizes)
            own = r[f"export_own_{layout}"]
            if layout == "ep2":
                assert [(n, t.dtype) for b in own for n, t in b] == [(n, t.dtype) for n, t in reference], rank
                assert all(torch.equal(t, dict(reference)[n]) for b in own for n, t in b), rank
            else:
                assert isinstance(own, str) and "must pass the dst_rank of its own model replica" in own, own


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_rollout_engine_fed_by_the_ep2_export_decodes_like_megatron(two_ranks, family):
    _, results = two_ranks
    r = results[0][family]
    worst = 0.0
    for (engine_ids, engine_lp), (megatron_ids, megatron_lp) in zip(r["engine"], r["megatron_greedy"]):
        assert engine_ids == megatron_ids
        worst = max(worst, (engine_lp - megatron_lp).abs().max().item())
    print(f"{family}: CPU engine vs Megatron (EP=2) greedy log-probs, max |diff| = {worst:.2e}")
    assert worst < 1e-5


def test_verify_tool_at_ep2(converted, capsys):
    c = converted["qwen2_moe"]
    verify = load_tool("verify_conversion")
    assert (
        verify.main(
            [
                "--hf",
                c["hf"],
                "--megatron",
                c["meg"],
                "--ep",
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
    assert "over 2x4 tokens, TP=1, EP=2" in out


def test_training_checkpoint_with_stacked_layers_converts_back(converted, tmp_path):
    """A trainer's checkpoint stacks the layers' tensors under one key each (Mixtral: every layer alike); the
    converter's has per-layer keys and is read a layer at a time, a stacked one is read whole: both exactly."""
    from gift_megatron.hf import (
        build_cpu_model,
        megatron_to_hf,
        model_config_from_info,
        read_conversion_info,
        resolve_checkpoint,
    )
    from gift_megatron.hf.convert import single_process_megatron
    from gift_megatron.megatron.checkpoint import load_checkpoint, read_manifest, save_checkpoint

    c = converted["mixtral"]
    cfg = model_config_from_info(read_conversion_info(c["meg"]))
    with single_process_megatron():
        model = build_cpu_model(cfg, torch.float32)
        load_checkpoint(resolve_checkpoint(c["meg"]), [model], restore_rng=False)
        path = save_checkpoint(str(tmp_path / "run"), 7, [model])
    assert "decoder.layers.self_attention.linear_qkv.weight" in read_manifest(path)["model"]["tensors"]  # stacked
    megatron_to_hf(path, tmp_path / "back", model_config=cfg, progress=False)
    original, again = hf_tensors(c["hf"]), hf_tensors(tmp_path / "back")
    assert sorted(again) == sorted(original) and all(torch.equal(again[n], t) for n, t in original.items())


# ---------------------------------------------------------------------------------------------- memory
_MEASURE = r"""
import json, os, sys, threading, time
os.environ["GIFT_MEGATRON_DEVICE"] = "cpu"
import torch
from gift_megatron.hf import hf_to_megatron, megatron_to_hf
SHARD = 4 << 20  # the HF writer holds up to one output shard: smaller than the model here

def rss_anon():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

def peak_of(fn):
    base, peak, done = rss_anon(), [0], []
    def sample():
        while not done:
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.001)
    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.append(1)
        t.join()
    return max(peak[0], rss_anon()) - base

if __name__ == "__main__":
    out = {}
    # The first conversion of a process also pays one-time costs (lazy imports, Megatron's writer helpers):
    # a warm-up conversion of the small model goes first and is not measured.
    for k, d in enumerate([sys.argv[1]] + sys.argv[1:]):
        tag = str(k)
        out[d] = {"to_megatron": peak_of(lambda: hf_to_megatron(d + "/hf", d + "/meg" + tag, progress=False)),
                  "to_hf": peak_of(lambda: megatron_to_hf(d + "/meg" + tag, d + "/back" + tag, progress=False,
                                                          max_shard_bytes=SHARD))}
    print("PEAKS " + json.dumps(out))
"""


def test_conversion_peak_memory_grows_by_one_layer_of_experts(tmp_path):
    """4 -> 16 experts in each of 4 layers (fp32, hidden 256, expert width 384: 1.18 MB per expert): holding the
    model would add 12 x 4 experts (57 MB, and Megatron's writer copies the fc1 halves on top); converting one
    layer at a time adds 12 experts of one layer (14 MB) and their copies. Measured: the process's peak
    anonymous memory above where it started, sampled every millisecond (file-backed pages of the memory-mapped
    shards are not counted; malloc returns large blocks to the system at once: fixed mmap threshold). The
    way back writes 4 MB output shards (the writer holds one shard's tensors; the default is 5 GB)."""
    per_expert = 3 * 256 * 384 * 4
    for experts in (4, 16):
        make_moe(tmp_path / f"e{experts}" / "hf", "qwen3_moe", experts=experts, layers=4, hidden=256, width=384)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path / "e4"), str(tmp_path / "e16")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next((x for x in run.stdout.splitlines() if x.startswith("PEAKS ")), None)
    assert run.returncode == 0 and line, run.stderr[-3000:]
    peaks = json.loads(line[len("PEAKS ") :])
    small, large = peaks[str(tmp_path / "e4")], peaks[str(tmp_path / "e16")]
    one_layer, whole = 12 * per_expert, 4 * 12 * per_expert
    for way in ("to_megatron", "to_hf"):
        growth = large[way] - small[way]
        print(
            f"{way}: peak {small[way] / 1e6:.1f} MB (4 experts) -> {large[way] / 1e6:.1f} MB (16 experts): +"
            f"{growth / 1e6:.1f} MB; one layer's 12 more experts {one_layer / 1e6:.1f} MB, the whole model's "
            f"{whole / 1e6:.1f} MB"
        )
        # One layer's experts and the writer's / reader's copies of their fc1 halves: about 1.7 x one_layer
        # (measured 1.8 x); the whole model would be 4 x one_layer before any copy.
        assert growth < 3 * one_layer, (way, growth, one_layer)


# ------------------------------------------------------------------------------------------- bad input
def test_expert_count_other_than_the_config_is_named_with_the_file(converted, tmp_path):
    from gift_megatron.hf import ConversionError, HFCheckpoint

    for source in ("hf", "fused"):
        bad = tmp_path / source
        make_moe(bad, "qwen2_moe", fused=source == "fused")
        cfg = json.load(open(bad / "config.json"))
        cfg["num_experts"] = 8
        json.dump(cfg, open(bad / "config.json", "w"))
        with pytest.raises(ConversionError) as err:
            HFCheckpoint(bad)
        message = str(err.value)
        print(message)
        assert str(bad / "model.safetensors") in message and "num_experts=8" in message
        assert ("has 4 experts" if source == "hf" else "holds 4 experts") in message


def test_megatron_checkpoint_with_another_expert_count(converted, tmp_path, capsys):
    """The way back with an architecture whose expert count differs from the checkpoint's: refused before
    anything is read, with both numbers."""
    c = converted["mixtral"]
    cfg = json.load(open(os.path.join(c["hf"], "config.json")))
    cfg["num_local_experts"] = 8
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    to_hf = load_tool("convert_megatron_to_hf")
    assert (
        to_hf.main(
            [
                "--megatron",
                os.path.join(c["meg"], "step_00000000"),
                "--out",
                str(tmp_path / "o"),
                "--hf-config",
                str(tmp_path / "config.json"),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "the checkpoint has 4 experts per MoE layer, the model 8" in err and "step_00000000" in err


def test_unsupported_moe_architecture_lists_the_supported_ones(tmp_path, capsys):
    os.makedirs(tmp_path / "ds")
    json.dump(
        {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "n_routed_experts": 8},
        open(tmp_path / "ds" / "config.json", "w"),
    )
    to_meg = load_tool("convert_hf_to_megatron")
    assert to_meg.main(["--hf", str(tmp_path / "ds"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unsupported Mixture-of-Experts architecture 'DeepseekV3ForCausalLM'" in err
    assert "Mixture-of-Experts: MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM" in err
    assert not (tmp_path / "o").exists()


def test_impossible_expert_layouts_are_refused(converted, capsys):
    verify = load_tool("verify_conversion")
    c = converted["qwen3_moe"]
    assert verify.main(["--hf", c["hf"], "--megatron", c["meg"], "--ep", "3"]) == 2
    assert (
        "--ep 3: parallel.expert_model_parallel_size (3) does not divide model.num_experts (4)"
        in capsys.readouterr().err
    )
    assert verify.main(["--hf", c["hf"], "--megatron", c["meg"], "--tp", "2", "--prompt-ids", "1,2,3"]) == 2
    assert "sequence length 3 must be a multiple of 2" in capsys.readouterr().err
