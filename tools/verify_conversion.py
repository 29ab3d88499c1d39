"""Check a conversion: run the same tokens through the Hugging Face model (transformers) and the Megatron
checkpoint (loaded at --tp tensor-parallel ranks on the CPU, gloo), print the max absolute logit difference
relative to the largest |logit|, and exit 1 above --tolerance (2 for bad input).

    python tools/verify_conversion.py --hf /models/Qwen2.5-7B-Instruct --megatron /ckpt/qwen2.5-7b --tp 2
    python tools/verify_conversion.py --hf /models/Qwen3-30B-A3B --megatron /ckpt/qwen3-30b-a3b --ep 2
    python tools/verify_conversion.py --hf DIR --megatron DIR --prompt-ids "151644,872,198;9707,11,1879"

--tp N spawns N processes itself (no torchrun needed; they are killed after --timeout seconds). For a
Mixture-of-Experts checkpoint, --ep N splits the routed experts over N expert-parallel ranks and --etp M
each expert over M ranks (default: --tp); the processes are lcm(TP, ETP x EP), and TP > 1 runs with
sequence parallelism (Megatron's MoE layer needs it; the sequence length must be a multiple of TP).
Memory: the HF model plus the Megatron model, both in the checkpoint's dtype.

The tolerance is relative, max |Megatron - HF| / max |HF logit|, because bf16 round-off grows with the
logits' scale: an absolute 0.5 is loose for a model whose logits are small (another model's checkpoint of
the same architecture passed it by less than 2x) and tight for one whose logits are large. Measured on
random Llama / Qwen2 / Qwen3 models (2 layers x 64 and 8 layers x 256 wide, vocabulary 1000, 4 x 48-64
random tokens, TP 1 and 2):

    correct conversion, bf16             0.018 - 0.021     (max |diff| 0.07 - 0.08 on logits up to 3.5 - 4.4)
    correct conversion, fp16             0.0019 - 0.0023
    correct conversion, fp32             about 1e-6
    another model's weights, same arch   1.34 - 1.50       (bf16 and fp16 alike)

The ratio does not move with the logits' scale, the absolute difference does: the same bf16 Qwen2 with its
lm_head scaled by 0.1 and by 40 (tests/test_conversion.py, 2 x 6 tokens) gives, for a correct conversion,
max |diff| 0.0046 on logits up to 0.32 and 1.9 on logits up to 128 (relative 0.0145 both), and for another
model's weights 0.35 (passes an absolute 0.5) and 139 (relative 1.17 both).

Defaults: 0.1 for bf16 / fp16 (5x above the worst correct conversion, 13x below the closest wrong model) and
1e-4 for fp32 (100x above correct; a wrong model is 4 orders of magnitude further). A checkpoint of a
fine-tune of the same model differs by much less than a random one and may pass: this checks the
conversion (names, layouts, fusions), not which weights were converted.
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


def default_tolerance(dtype) -> float:
    """Relative tolerance for weights of ``dtype`` (see the module docstring for the measurements)."""
    import torch

    return 1e-4 if dtype == torch.float32 else 0.1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--hf", required=True, help="the Hugging Face model folder")
    p.add_argument("--megatron", required=True, help="converted checkpoint root or step_* directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to load the checkpoint with")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (Mixture-of-Experts checkpoints)")
    p.add_argument(
        "--etp", type=int, default=None, help="expert tensor-parallel ranks (Mixture-of-Experts; default: --tp)"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max |logit difference| / max |logit| allowed (default: 1e-4 for fp32 weights, 0.1 for "
        "bf16/fp16; measurements in the module docstring)",
    )
    p.add_argument("--prompt-ids", default=None, help="token ids to run, e.g. '1,2,3;4,5,6' (default: random)")
    p.add_argument("--seq-length", type=int, default=32, help="random tokens per sequence")
    p.add_argument("--batch", type=int, default=2, help="random sequences")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the TP ranks are killed")
    a = p.parse_args(argv)
    import torch

    from gift_megatron.hf import ConversionError
    from gift_megatron.hf.verify import compare_logits
    from gift_megatron.megatron.checkpoint import CheckpointError

    try:
        tokens = None
        if a.prompt_ids:
            try:
                tokens = torch.tensor(parse_prompt_ids(a.prompt_ids))
            except ValueError as exc:
                raise ConversionError(f"--prompt-ids {a.prompt_ids!r}: {exc}") from exc
        if a.tolerance is not None and not a.tolerance > 0:
            raise ConversionError(f"--tolerance {a.tolerance}: must be > 0 (a relative difference)")
        for flag, value in (("--tp", a.tp), ("--ep", a.ep), ("--etp", a.etp)):
            if value is not None and value < 1:
                raise ConversionError(f"{flag} {value}: must be >= 1")
        r = compare_logits(
            a.hf,
            a.megatron,
            tp=a.tp,
            ep=a.ep,
            etp=a.etp,
            tokens=tokens,
            batch=a.batch,
            seq_length=a.seq_length,
            seed=a.seed,
            timeout=a.timeout,
        )
    except (ConversionError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tol = a.tolerance if a.tolerance is not None else default_tolerance(r.dtype)
    b, s = r.tokens.shape
    layout = f"TP={r.tp}" + (f", EP={r.ep}" if r.ep > 1 else "") + (f", ETP={r.etp}" if r.etp is not None else "")
    print(
        f"max |logit difference| = {r.max_abs_diff:.3e} over {b}x{s} tokens, {layout}, {r.dtype}; largest "
        f"|logit| {r.logit_scale:.3g}; relative {r.relative_diff:.3e} (tolerance {tol:g})"
    )
    if not r.relative_diff <= tol:  # NaN logits fail too
        print(f"FAILED: the relative difference {r.relative_diff:.3e} exceeds --tolerance {tol:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
