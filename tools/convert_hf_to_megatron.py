"""Convert a Hugging Face checkpoint (Llama-2/3, Qwen2/2.5, Qwen3 dense) into a Megatron distributed checkpoint
that loads at any TP/PP.

    python tools/convert_hf_to_megatron.py --hf /models/Qwen2.5-7B-Instruct --out /ckpt/qwen2.5-7b
    python tools/verify_conversion.py --hf /models/Qwen2.5-7B-Instruct --megatron /ckpt/qwen2.5-7b --tp 2

Writes OUT/step_00000000 (the checkpoint, weights only), OUT/latest, OUT/gift_conversion.json (architecture,
dtype, source) and OUT/hf_files/ (the source's config.json and tokenizer files). Runs on the CPU in one
process; peak host memory: about 1.5 x the model's bytes in its dtype (bf16: about 23 GB for Qwen2.5-7B, 100 GB
for 32B). A non-empty OUT is refused unless --force; with it, the new checkpoint is written next to OUT
(.OUT.partial-*) and replaces OUT only once complete, so a failed conversion leaves the old one intact.
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
    p.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors [+ index])")
    p.add_argument("--out", required=True, help="output directory: the Megatron checkpoint root")
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="cast the weights (default: keep the checkpoint's dtype)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty --out (the new output is staged next to it and replaces it only once "
        "complete); without it a non-empty --out is refused",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    from gift_megatron.hf import ConversionError, hf_to_megatron

    try:
        path = hf_to_megatron(a.hf, a.out, dtype=a.dtype, progress=not a.no_progress, overwrite=a.force)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
