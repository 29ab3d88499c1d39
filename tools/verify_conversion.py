"""Check a conversion: run the same tokens through the Hugging Face model (transformers) and the Megatron
checkpoint (loaded at --tp tensor-parallel ranks on the CPU, gloo), print the max absolute logit difference,
and exit 1 above --tolerance (2 for bad input).

    python tools/verify_conversion.py --hf /models/Qwen2.5-7B-Instruct --megatron /ckpt/qwen2.5-7b --tp 2
    python tools/verify_conversion.py --hf DIR --megatron DIR --prompt-ids "151644,872,198;9707,11,1879"

--tp N spawns N processes itself (no torchrun needed; they are killed after --timeout seconds). Memory: the
HF model plus the Megatron model, both in the checkpoint's dtype.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Conversion runs on the CPU even on a GPU node (it holds the model in host memory; see checkpoint/convert.py).
os.environ.setdefault("GIFT_MEGATRON_DEVICE", "cpu")


def parse_prompt_ids(text: str):
    """'1,2,3;4,5,6' -> [[1, 2, 3], [4, 5, 6]] (sequences of equal length)."""
    rows = [[int(x) for x in row.replace(" ", "").split(",") if x] for row in text.split(";") if row.strip()]
    if not rows or len({len(r) for r in rows}) != 1 or not rows[0]:
        raise ValueError("expected comma-separated ids, sequences of equal length separated by ';'")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--hf", required=True, help="the Hugging Face model folder")
    p.add_argument("--megatron", required=True, help="converted checkpoint root or step_* directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to load the checkpoint with")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |logit difference| allowed (default: 1e-3 for fp32 weights, 0.5 for bf16/fp16)")
    p.add_argument("--prompt-ids", default=None, help="token ids to run, e.g. '1,2,3;4,5,6' (default: random)")
    p.add_argument("--seq-length", type=int, default=32, help="random tokens per sequence")
    p.add_argument("--batch", type=int, default=2, help="random sequences")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the TP ranks are killed")
    a = p.parse_args(argv)
    import torch

    from gift_megatron.checkpoint import ConversionError
    from gift_megatron.checkpoint.verify import compare_logits
    from gift_megatron.megatron.checkpoint import CheckpointError

    try:
        tokens = None
        if a.prompt_ids:
            try:
                tokens = torch.tensor(parse_prompt_ids(a.prompt_ids))
            except ValueError as exc:
                raise ConversionError(f"--prompt-ids {a.prompt_ids!r}: {exc}") from exc
        if a.tp < 1:
            raise ConversionError(f"--tp {a.tp}: must be >= 1")
        r = compare_logits(a.hf, a.megatron, tp=a.tp, tokens=tokens, batch=a.batch, seq_length=a.seq_length,
                           seed=a.seed, timeout=a.timeout)
    except (ConversionError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tol = a.tolerance if a.tolerance is not None else (1e-3 if r.dtype == torch.float32 else 0.5)
    b, s = r.tokens.shape
    print(f"max |logit difference| = {r.max_abs_diff:.3e} over {b}x{s} tokens, TP={r.tp}, {r.dtype} "
          f"(tolerance {tol:g}; largest |logit| {r.logit_scale:.3g})")
    if r.max_abs_diff > tol:
        print(f"FAILED: the difference exceeds --tolerance {tol:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
