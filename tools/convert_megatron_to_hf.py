r"""Convert a Megatron checkpoint (from tools/convert_hf_to_megatron.py or a training run) into a Hugging Face
folder: config.json, safetensors shards with model.safetensors.index.json, and the tokenizer files.

    python tools/convert_megatron_to_hf.py --megatron /ckpt/qwen2.5-7b --out /models/back --max-shard-size 5GB
    python tools/convert_megatron_to_hf.py --megatron runs/x/checkpoints --out /models/x-hf \
        --hf-config /models/Qwen2.5-7B-Instruct --tokenizer /models/Qwen2.5-7B-Instruct

A converted checkpoint knows its architecture and tokenizer (OUT/gift_conversion.json, OUT/hf_files/); a
training run's checkpoint does not: pass --hf-config (the original model folder or its config.json) and
--tokenizer. The dtype is the checkpoint's unless --dtype casts it. Runs on the CPU in one process; peak host
memory: about 1.4 x the model's bytes in its dtype (bf16: about 21 GB for Qwen2.5-7B, 92 GB for 32B). A
non-empty --out is refused unless --force, which replaces it only once the new folder is complete.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Conversion runs on the CPU even on a GPU node (it holds the model in host memory; see checkpoint/convert.py).
os.environ.setdefault("GIFT_MEGATRON_DEVICE", "cpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--megatron", required=True, help="checkpoint root (with `latest`) or a step_* directory")
    p.add_argument("--out", required=True, help="output Hugging Face folder")
    p.add_argument(
        "--tokenizer", default=None, help="folder with the tokenizer files (default: those recorded at conversion)"
    )
    p.add_argument("--hf-config", default=None, help="HF folder or config.json giving the architecture")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="cast the weights")
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="most tensor bytes per safetensors shard: 5GB (10^9), 2GiB (2^30), 500MB, ... (default 5GB)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty --out (the new output is staged next to it and replaces it only once "
        "complete); without it a non-empty --out is refused",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    from gift_megatron.hf import ConversionError, megatron_to_hf, parse_size
    from gift_megatron.hf.hf_io import model_config_from_hf, read_hf_config
    from gift_megatron.megatron.checkpoint import CheckpointError

    try:
        max_bytes = parse_size(a.max_shard_size, "--max-shard-size")
        model_config = None
        if a.hf_config:
            model_config = model_config_from_hf(read_hf_config(a.hf_config), f"--hf-config {a.hf_config}")
        out = megatron_to_hf(
            a.megatron,
            a.out,
            tokenizer_dir=a.tokenizer,
            dtype=a.dtype,
            max_shard_bytes=max_bytes,
            model_config=model_config,
            progress=not a.no_progress,
            overwrite=a.force,
        )
    except (ConversionError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
