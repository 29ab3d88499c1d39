"""HF -> Megatron -> HF conversion throughput next to the raw safetensors read + write of the same bytes.

    python benchmarks/convert.py            # ~0.5 B parameters, Llama-shaped, bf16 (about 1 GB)
    python benchmarks/convert.py --small    # a quick run

The limit is what safetensors itself does with the same bytes on this machine (read every tensor, write it
back); the conversion reads and writes each byte twice (HF -> Megatron, Megatron -> HF), so its throughput
is reported per direction as bytes of the model / seconds, next to the limit. Goal: at least half of it.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def synthesize(path: str, small: bool) -> int:
    """A random Llama-shaped bf16 checkpoint written with transformers (meta init, then random tensors)."""
    import transformers

    if small:
        dims = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, vocab_size=8192)
    else:  # 0.49 B parameters (Qwen2.5-0.5B-like widths with untied Llama layers)
        dims = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=36, num_attention_heads=16,
                    num_key_value_heads=8, vocab_size=32000)
    cfg = transformers.LlamaConfig(**dims, max_position_embeddings=2048, tie_word_embeddings=False)
    cfg.torch_dtype = "bfloat16"
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    state = {n: (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16) for n, p in model.named_parameters()}
    from gift_megatron.checkpoint import write_safetensors_shards

    os.makedirs(path, exist_ok=True)
    write_safetensors_shards(iter(state.items()), path, 2 << 30)
    cfg.save_pretrained(path)
    return sum(t.numel() for t in state.values())


def raw_limit(src: str, dst: str) -> float:
    """Seconds to read every tensor of ``src`` with safetensors and write them back to ``dst``."""
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    t = time.perf_counter()
    for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        tensors = load_file(f)
        save_file(tensors, os.path.join(dst, os.path.basename(f)))
        del tensors
    os.sync()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    a = p.parse_args()
    from gift_megatron.checkpoint import hf_to_megatron, megatron_to_hf

    root = a.dir or tempfile.mkdtemp(prefix="bench_convert_")
    try:
        hf, meg, back, raw = (os.path.join(root, x) for x in ("hf", "meg", "back", "raw"))
        n = synthesize(hf, a.small)
        size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(hf, "*.safetensors")))
        os.sync()
        t_raw = raw_limit(hf, raw)
        t = time.perf_counter()
        hf_to_megatron(hf, meg, progress=False)
        os.sync()
        t_in = time.perf_counter() - t
        t = time.perf_counter()
        megatron_to_hf(meg, back, progress=False)
        os.sync()
        t_out = time.perf_counter() - t
        gb = size / 1e9
        limit = gb / t_raw
        print(f"model: {n / 1e9:.3f} B parameters, {gb:.2f} GB bf16, threads {torch.get_num_threads()}")
        print(f"| step | seconds | GB/s | vs raw safetensors read+write |")
        print(f"|---|---|---|---|")
        print(f"| raw safetensors read + write (the limit) | {t_raw:.2f} | {limit:.2f} | 1.00 |")
        print(f"| HF -> Megatron | {t_in:.2f} | {gb / t_in:.2f} | {gb / t_in / limit:.2f} |")
        print(f"| Megatron -> HF | {t_out:.2f} | {gb / t_out:.2f} | {gb / t_out / limit:.2f} |")
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
