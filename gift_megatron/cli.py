"""``gift-megatron``: the command line.

    gift-megatron train CONFIG.yaml [key=value ...]     train (under torchrun for several ranks)
    gift-megatron validate CONFIG.yaml [key=value ...] [--world-size N]   check a config, run nothing
    gift-megatron plot RUN_DIR                           PNG plots of a run's metrics
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
    v.add_argument("--world-size", type=int, default=None, help="also check the parallel layout for this many ranks "
                   "and print the per-GPU memory plan")
    v.add_argument("--gpus-per-node", type=int, default=None,
                   help="ranks (GPUs) per node for the rollout engines' placement (default: min(world size, 8))")
    v.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="memory of one GPU in GiB for the plan (default: 79.6, an H100 80 GB)")
    pl = sub.add_parser("plot", help="write PNG plots of RUN_DIR/metrics.jsonl to RUN_DIR/plots")
    pl.add_argument("run_dir")
    pl.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from gift_megatron.config import ConfigError, check_world_size, layout_plan, load_config

    if args.command == "plot":
        from gift_megatron.trainer.metrics import plot_run

        try:
            files = plot_run(args.run_dir, args.out)
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
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "validate":
        if args.world_size:
            from gift_megatron.config import H100_GPU_GIB

            try:
                plan = layout_plan(cfg, args.world_size, gpu_memory_gib=args.gpu_memory_gib or H100_GPU_GIB,
                                   gpus_per_node=args.gpus_per_node)
            except ConfigError as exc:
                print(f"config error: {exc}", file=sys.stderr)
                return 2
            print(f"{args.config}: ok")
            print("  per GPU, in GiB (docs/cluster.md explains every line):")
            for k, v in plan.items():
                print(f"  {k:40s} {v:.2f}" if isinstance(v, float) else f"  {k:40s} {v}")
        else:
            print(f"{args.config}: ok")
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
