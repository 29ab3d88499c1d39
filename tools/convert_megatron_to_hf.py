"""Convert a Megatron checkpoint (from tools/convert_hf_to_megatron.py or a training run) to a Hugging Face
folder: config.json, safetensors shards with their index, and the tokenizer files.

    python tools/convert_megatron_to_hf.py --megatron /results/run/checkpoints --out /models/run-hf \
        --tokenizer /models/Qwen2.5-7B-Instruct

A training run's checkpoint carries no conversion record: pass --hf-config (the original model folder or its
config.json) so the architecture is known.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megatron", required=True, help="checkpoint root (with `latest`) or a step_* directory")
    p.add_argument("--out", required=True, help="output Hugging Face folder")
    p.add_argument("--tokenizer", default=None, help="folder with the tokenizer files (default: the HF source)")
    p.add_argument("--hf-config", default=None, help="HF folder or config.json giving the architecture")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from gift_megatron.checkpoint import ConversionError, megatron_to_hf

    units = {"GB": 1 << 30, "MB": 1 << 20, "KB": 1 << 10, "B": 1}
    size = a.max_shard_size.upper()
    unit = next((u for u in units if size.endswith(u)), None)
    try:
        max_bytes = int(float(size[:-len(unit)]) * units[unit]) if unit else int(size)
    except ValueError:
        print(f"error: --max-shard-size {a.max_shard_size!r}: expected e.g. 5GB or 500MB", file=sys.stderr)
        return 2
    model_config = None
    try:
        if a.hf_config:
            from gift_megatron.config import ConfigError, _hf_model_section
            from gift_megatron.megatron.model import ModelConfig

            try:
                model_config = ModelConfig(**_hf_model_section(a.hf_config, "--hf-config"))
            except ConfigError as exc:
                raise ConversionError(str(exc)) from exc
        out = megatron_to_hf(a.megatron, a.out, tokenizer_dir=a.tokenizer, dtype=a.dtype, max_shard_bytes=max_bytes,
                             model_config=model_config, progress=not a.no_progress)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
