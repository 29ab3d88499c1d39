"""Time a 7B-shaped weight sync into a colocated vLLM engine (GPU only).

    python benchmarks/weight_sync.py [--model-dims 7b|8b] [--tp 1] [--bucket-mb 1024] [--separate-process]

A random Qwen2.5-7B-shaped (or Llama-3-8B-shaped) bf16 state dict on the GPU stands for the trainer's
export stream; the engine starts with dummy weights and ``update_weights`` is timed (median of 3), printing
seconds and GB/s. By default the engine core runs in this process (tensors by reference); with
``--separate-process`` it runs in its own process as inside a torchrun job (CUDA IPC handles with TP 1).
Also times sleep (level 1) and wake. Goal: under 2 s on one H100 (NeMo-RL reports about 5 s for 8B).
Not measured yet: no GPU was available where this was written.
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

import torch  # noqa: E402

DIMS = {
    "7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944,
               num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dims", choices=list(DIMS), default="7b")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--bucket-mb", type=int, default=1024)
    p.add_argument("--separate-process", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/weight_sync.py needs a CUDA GPU (and vLLM); nothing to measure on this machine.")
    import transformers

    from gift_megatron.rollout.vllm_engine import VLLMRolloutEngine, import_vllm

    import_vllm()  # a clear message before building 15 GB of tensors

    d = tempfile.mkdtemp(prefix="weight_sync_")
    cfg = dict(DIMS[a.model_dims], max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6,
               hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16")
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    config = transformers.AutoConfig.from_pretrained(d)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config)
    state = [(n, torch.randn(p.shape, dtype=torch.bfloat16, device="cuda") * 0.02) for n, p in meta.named_parameters()]
    nbytes = sum(t.numel() * t.element_size() for _, t in state)
    engine = VLLMRolloutEngine(d, tensor_parallel_size=a.tp, gpu_memory_utilization=0.6, enable_sleep_mode=True,
                               dtype="bf16", skip_tokenizer_init=True, max_model_len=4096,
                               separate_process=a.separate_process)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.update_weights(iter(state), bucket_bytes=a.bucket_mb << 20)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    s = statistics.median(times)
    t = time.perf_counter()
    engine.sleep()
    slept = time.perf_counter() - t
    t = time.perf_counter()
    engine.wake()
    woke = time.perf_counter() - t
    mode = "separate engine process" if a.separate_process else "in-process engine"
    print(f"{a.model_dims}-shaped ({nbytes / 1e9:.1f} GB bf16), rollout TP {a.tp}, {mode}: weight sync {s:.2f} s "
          f"({nbytes / 1e9 / s:.1f} GB/s); runs {[round(x, 2) for x in times]}; sleep {slept:.2f} s, wake {woke:.2f} s")


if __name__ == "__main__":
    main()
