"""HF -> Megatron -> HF conversion throughput next to the raw safetensors read + write of the same bytes.

    python benchmarks/convert.py            # ~0.5 B parameters, Llama-shaped, bf16 (about 1 GB)
    python benchmarks/convert.py --small    # a quick smoke run (~20 M parameters; fixed per-conversion
                                            # costs of ~0.2 s dominate it)

The limit is what safetensors itself does with the same bytes in the same run (``load_file`` every shard,
``save_file`` it back): reading and writing each byte once. Each conversion direction also reads and
writes each byte once (HF shards -> Megatron checkpoint, Megatron checkpoint -> HF shards), so its
throughput (model bytes / seconds, process set-up and model building included, imports excluded) is
directly comparable. Goal: at least half of the limit. Files are in the page cache in every step (each
step reads what the previous one just wrote); an fsync of every file a step wrote is inside its timing. The
steps run ``--repeat`` times, interleaved in rotating order, and the fastest run of each counts (page-cache writes on a
shared machine vary by 2x between runs). Fixed per-process costs are measured apart, on a tiny model converted first: imports and
Megatron's checkpoint writer start-up (a spawned helper process that imports torch when the first results
reach it); a command-line conversion pays them once.

Peak memory per step is the process's VmHWM (reset before each step): anonymous memory plus the pages of
memory-mapped files it touched.
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# torch and Megatron are imported inside main(): Megatron's checkpoint writer starts a helper process
# with the spawn method, which imports this module again.

SMALL = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=32000,
)
# 0.49 B parameters: Qwen2.5-0.5B-like widths, Llama layout, untied embeddings.
FULL = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=8,
    vocab_size=32000,
)


def synthesize(path: str, dims: dict, shard_bytes: int) -> int:
    """A random Llama-shaped bf16 checkpoint (names and shapes from a transformers model on the meta
    device), written tensor by tensor as HF safetensors shards + index; returns the parameter count."""
    import torch
    import transformers

    from gift_megatron.hf import write_safetensors_shards

    cfg = transformers.LlamaConfig(**dims, max_position_embeddings=2048, tie_word_embeddings=False)
    cfg.dtype = "bfloat16"
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in transformers.LlamaForCausalLM(cfg).named_parameters()}
    g = torch.Generator().manual_seed(0)
    tensors = ((n, (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)) for n, s in shapes.items())
    write_safetensors_shards(tensors, path, shard_bytes)
    cfg.save_pretrained(path)
    return sum(s.numel() for s in shapes.values())


def raw_read_write(src: str, dst: str) -> None:
    """safetensors itself: load every shard of ``src`` and save it back into ``dst``."""
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        tensors = load_file(f)
        save_file(tensors, os.path.join(dst, os.path.basename(f)), metadata={"format": "pt"})
        del tensors


def timed(out_dir: str, fn, *args, **kwargs) -> tuple[float, float]:
    """(seconds, peak resident GB) of ``fn(*args, **kwargs)`` followed by an fsync of every file it wrote
    under ``out_dir`` (not os.sync(): that would also wait for other processes' writes)."""
    _reset_peak_rss()
    t = time.perf_counter()
    fn(*args, **kwargs)
    _fsync_tree(out_dir)
    return time.perf_counter() - t, _peak_rss_gb()


def _fsync_tree(path: str) -> None:
    for parent, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(parent, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:  # "5" resets VmHWM (Linux >= 4.0)
            fh.write("5")
    except OSError:
        pass


def _status_gb(field: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return float("nan")


def _peak_rss_gb() -> float:
    return _status_gb("VmHWM")


def _rss_gb() -> float:
    return _status_gb("VmRSS")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a ~20 M parameter model instead of ~0.5 B")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one, removed after)")
    p.add_argument("--shard-size", default="500MB", help="HF shard size of the synthesized and converted model")
    p.add_argument("--repeat", type=int, default=4, help="runs per step (interleaved); the fastest counts")
    a = p.parse_args()
    t0 = time.perf_counter()
    import torch

    from gift_megatron.hf import hf_to_megatron, megatron_to_hf, parse_size

    shard = parse_size(a.shard_size)
    root = a.dir or tempfile.mkdtemp(prefix="bench_convert_")
    try:
        hf, meg, meg_new, back, raw = (os.path.join(root, x) for x in ("hf", "meg", "meg_new", "back", "raw"))
        # Fixed costs: imports and a first conversion of a tiny model (Megatron's writer start-up).
        tiny = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
        synthesize(os.path.join(root, "tiny"), tiny, shard)
        hf_to_megatron(os.path.join(root, "tiny"), os.path.join(root, "tiny_meg"), progress=False)
        megatron_to_hf(os.path.join(root, "tiny_meg"), os.path.join(root, "tiny_back"), progress=False)
        fixed = time.perf_counter() - t0

        # In a child process, so that this one's memory does not keep the synthesized tensors' pages.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            n = pool.apply(synthesize, (hf, SMALL if a.small else FULL, shard))
        files = glob.glob(os.path.join(hf, "*.safetensors"))
        size = sum(os.path.getsize(f) for f in files)
        os.sync()
        baseline = _rss_gb()
        hf_to_megatron(hf, meg, progress=False)  # the checkpoint the Megatron -> HF step reads
        steps = {
            "raw": (raw, raw_read_write, (hf, raw), {}),
            "in": (meg_new, hf_to_megatron, (hf, meg_new), {"progress": False}),
            "out": (back, megatron_to_hf, (meg, back), {"max_shard_bytes": shard, "progress": False}),
        }
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in steps}
        for r in range(a.repeat):
            # The order rotates, so no step always follows another's writes; each starts with its output
            # deleted (not conversion work) and the disk synced.
            order = list(steps)[r % 3 :] + list(steps)[: r % 3]
            for key in order:
                out, fn, args, kwargs = steps[key]
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                runs[key].append(timed(out, fn, *args, **kwargs))
        (t_raw, m_raw), (t_in, m_in), (t_out, m_out) = (min(runs[k]) for k in ("raw", "in", "out"))
        gb = size / 1e9
        limit = gb / t_raw
        print(
            f"model: {n / 1e9:.3f} B parameters, {gb:.2f} GB bf16 in {len(files)} shard(s); torch threads "
            f"{torch.get_num_threads()}, {os.cpu_count()} CPUs; best of {a.repeat} runs per step"
        )
        print(f"fixed per-process costs, excluded below (imports, tiny model, writer start-up): {fixed:.1f} s")
        print(
            f"memory: resident before the steps {baseline:.2f} GB (libraries); the last column is the peak above "
            "that (touched pages of memory-mapped files included), in GB and in model sizes"
        )

        def mem(peak: float) -> str:
            return f"{peak - baseline:.2f} ({(peak - baseline) / gb:.1f}x)"

        print("| step | seconds | GB/s | vs the limit | peak memory GB |")
        print("|---|---|---|---|---|")
        print(f"| raw safetensors read + write (the limit) | {t_raw:.2f} | {limit:.2f} | 1.00 | {mem(m_raw)} |")
        print(f"| HF -> Megatron | {t_in:.2f} | {gb / t_in:.2f} | {gb / t_in / limit:.2f} | {mem(m_in)} |")
        print(f"| Megatron -> HF | {t_out:.2f} | {gb / t_out:.2f} | {gb / t_out / limit:.2f} | {mem(m_out)} |")
        print(
            f"| HF -> Megatron -> HF | {t_in + t_out:.2f} | {2 * gb / (t_in + t_out):.2f} | "
            f"{2 * gb / (t_in + t_out) / limit:.2f} | |"
        )
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
