"""``gift-megatron``: the command line.

    gift-megatron train CONFIG.yaml [key=value ...]     train (under torchrun for several ranks)
    gift-megatron validate CONFIG.yaml [key=value ...] [--world-size N]   check a config, run nothing
    gift-megatron plot RUN_DIR                           PNG plots of a run's metrics
    gift-megatron plot RUN_A RUN_B ... --out DIR         the runs overlaid (legend: name and objective)
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gift-megatron", description="GIFT / GFT post-training on Megatron-Core")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with a YAML config (launch under torchrun for several ranks)")
    t.add_argument("config", help="YAML config file (see examples/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 objective.name=grpo")
    t.add_argument("--resume", choices=["auto", "none"], help="shorthand for run.resume=auto|none")
    v = sub.add_parser("validate", help="load and validate a config without training")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--world-size", type=int, default=None, help="also check the parallel layout for this many ranks")
    pl = sub.add_parser("plot", help="write PNG plots of RUN_DIR/metrics.jsonl to RUN_DIR/plots; several runs: "
                                     "overlaid, to --out")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", default=None, help="output directory (one run: default RUN_DIR/plots; several: required)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after options too (`validate X --world-size 2 optimizer.lr=3e-4`): argparse stops
    # collecting a positional list at the first option, so key=value words it left over join the overrides.
    args, extra = parser.parse_known_args(argv)
    stray = [w for w in extra if w.startswith("-") or "=" not in w]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", [])) + extra
    from gift_megatron.config import ConfigError, check_inputs, check_world_size, layout_plan, load_config

    if args.command == "plot":
        from gift_megatron.trainer.metrics import plot_run, plot_runs

        if len(args.run_dirs) > 1 and not args.out:
            print("error: plot: --out DIR is required with several run directories (where the overlay goes)",
                  file=sys.stderr)
            return 2
        try:
            files = plot_run(args.run_dirs[0], args.out) if len(args.run_dirs) == 1 else plot_runs(args.run_dirs, args.out)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print("\n".join(files))
        return 0
    overrides = list(args.overrides)
    if getattr(args, "resume", None):
        overrides.append(f"run.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
        world = getattr(args, "world_size", None) or int(os.environ.get("WORLD_SIZE", "0") or 0)
        if world:
            check_world_size(cfg, world)
        if args.command == "validate":
            check_inputs(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"{args.config}: ok")
        if args.world_size:
            for k, v in layout_plan(cfg, args.world_size).items():
                print(f"  {k:40s} {v:.2f}" if isinstance(v, float) else f"  {k:40s} {v}")
        return 0
    from gift_megatron.trainer import train

    try:
        result = train(cfg)
    except (ValueError, FileNotFoundError) as exc:
        # Start-up errors (dataset, tokenizer, checkpoint, layout) are the user's to fix: no traceback wall.
        if os.environ.get("GIFT_MEGATRON_TRACEBACK"):
            raise
        print(f"error: {type(exc).__name__}: {exc}\n(GIFT_MEGATRON_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        first, last = result["first_eval"], result["last_eval"]
        if first is not None and last is not None:
            print(f"reward (greedy eval): start {first:.3f} -> end {last:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
