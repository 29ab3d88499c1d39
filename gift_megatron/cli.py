"""``gift-megatron``: the command line.

gift-megatron train CONFIG.yaml [key=value ...] [--nproc-per-node N]
                                                     train (--nproc-per-node: starts torchrun itself)
gift-megatron validate CONFIG.yaml [key=value ...] [--world-size N] [--layout-only]   check a config, run nothing
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
    t.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="start N ranks on this machine (torchrun --standalone, run inside this process): a "
        "failure is one line instead of torchrun's error table",
    )
    v = sub.add_parser("validate", help="load and validate a config without training")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    v.add_argument(
        "--layout-only",
        action="store_true",
        help="check the config, layout and memory plan only, not the checkpoint / data / tokenizer paths "
        "and the reward (for a machine that does not see the job's filesystems)",
    )
    v.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="also check the parallel layout for this many ranks and print the per-GPU memory plan",
    )
    v.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="ranks (GPUs) per node for the rollout engines' placement (default: min(world size, 8))",
    )
    v.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=None,
        help="memory of one GPU in GiB for the plan (default: 79.6, an H100 80 GB)",
    )
    pl = sub.add_parser(
        "plot", help="write PNG plots of RUN_DIR/metrics.jsonl to RUN_DIR/plots; several runs: overlaid, to --out"
    )
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", default=None, help="output directory (one run: default RUN_DIR/plots; several: required)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may also follow an option (`train CONFIG --nproc-per-node 2 train.steps=5`): argparse stops
    # filling a positional list at the first option, so the rest arrive as extras.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command == "plot" or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from gift_megatron import console

    if args.command == "train":
        # Before any library is imported (Megatron-Core and torch warn at import); the config may show
        # them again below. Only `train` runs the libraries: validate and plot keep Python's defaults.
        console.configure()
        if "LOCAL_RANK" in os.environ:  # a torchrun worker: stop with the launcher, even while importing
            from gift_megatron.trainer.run_dir import watch_launcher

            watch_launcher()
    from gift_megatron.config import ConfigError, check_inputs, check_world_size, load_config

    if args.command == "plot":
        from gift_megatron.trainer.metrics import plot_run, plot_runs

        if len(args.run_dirs) > 1 and not args.out:
            print(
                "error: plot: --out DIR is required with several run directories (where the overlay goes)",
                file=sys.stderr,
            )
            return 2
        try:
            files = (
                plot_run(args.run_dirs[0], args.out) if len(args.run_dirs) == 1 else plot_runs(args.run_dirs, args.out)
            )
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
        world = (
            getattr(args, "world_size", None)
            or getattr(args, "nproc_per_node", None)
            or int(os.environ.get("WORLD_SIZE", "0") or 0)
        )
        if world:
            check_world_size(cfg, world)
        if args.command == "validate" and not args.layout_only:
            check_inputs(cfg)
    except ConfigError as exc:
        if console.rank() == 0:  # under torchrun every rank reads the same config: say it once
            print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "validate":
        if args.world_size:
            from gift_megatron.layout_plan import H100_GPU_GIB, layout_plan

            try:
                plan = layout_plan(
                    cfg,
                    args.world_size,
                    gpu_memory_gib=args.gpu_memory_gib or H100_GPU_GIB,
                    gpus_per_node=args.gpus_per_node,
                )
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
    console.configure(cfg.run.show_warnings)
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:  # the launcher, not one of its workers
        from gift_megatron.trainer.run_dir import RunDirLock, RunDirLocked

        try:  # a run directory in use: say so now, not after N workers have imported Megatron
            RunDirLock.check_free(cfg.run.output_dir)
        except RunDirLocked as exc:
            console.print_error(exc)
            return 2
        if cfg.run.show_warnings:  # the workers show what they print before they read the config, too
            os.environ[console.SHOW_WARNINGS_ENV] = "1"
        return console.launch(args.nproc_per_node, [args.config, *overrides])
    from gift_megatron.errors import StartupError
    from gift_megatron.megatron import CheckpointError
    from gift_megatron.trainer import train
    from gift_megatron.trainer.run_dir import RunDirLocked

    try:
        train(cfg)  # the run prints its own summary (output dir, checkpoint, steps, time, eval reward)
    except (StartupError, CheckpointError, RunDirLocked) as exc:
        # What the start-up checks found (dataset, tokenizer, reward, checkpoint, layout, a run directory in
        # use) is the user's to fix: one line, no traceback wall. Any other exception, a ValueError from a
        # bug at step 500 included, keeps its traceback.
        if console.env_flag(console.TRACEBACK_ENV):
            raise
        console.print_error(exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
