"""What a person reads on the console of a run: third-party noise off by default, and a launcher that turns
worker failures into one line.

Why: a 12-step 2-rank CPU run printed 54 lines, 48 of them warnings from Megatron-Core, torch and
transformers, once per rank (``GPTModel IS DEPRECATED``, ``Apex is not installed``, ``No CUDA runtime is
found``, deprecation notices of torch.distributed). None of them is the user's to act on.

* :func:`quiet_third_party` ignores Python warnings from every module but ``gift_megatron``, and raises the
  level of third-party loggers to ERROR. ``run.show_warnings: true`` (or ``GIFT_MEGATRON_SHOW_WARNINGS=1``
  in the environment, which also covers what is printed before the config is read) shows them again.
* :func:`launch` runs torchrun inside this process (``gift-megatron train CONFIG --nproc-per-node N``): the
  workers print their own start-up error once (rank 0 only), and a failure becomes one line here instead
  of torchrun's error table.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

SHOW_WARNINGS_ENV = "GIFT_MEGATRON_SHOW_WARNINGS"
TRACEBACK_ENV = "GIFT_MEGATRON_TRACEBACK"

# Loggers of the libraries a run imports. Their WARNING records are advice for their own developers
# (deprecations, missing optional kernels); ERROR and above still show.
THIRD_PARTY_LOGGERS = (
    "megatron",
    "torch",
    "transformers",
    "datasets",
    "huggingface_hub",
    "urllib3",
    "filelock",
    "matplotlib",
    "PIL",
    "sentencepiece",
    "vllm",
    "nemo_run",
    "tensorboard",
)

_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TORCH_CPP_LOG_LEVEL": "ERROR"}

_saved: tuple[list, dict[str, int], list[str]] | None = None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def quiet_third_party() -> None:
    """Ignore third-party Python warnings and WARNING log records (idempotent; undone by
    :func:`show_third_party`). Call it before the libraries are imported: several warn at import."""
    global _saved
    if _saved is not None:
        return
    filters = list(warnings.filters)
    warnings.filterwarnings("ignore")
    # Our own warnings stay (filterwarnings puts this one first, so it wins for gift_megatron modules).
    warnings.filterwarnings("default", category=UserWarning, module=r"gift_megatron(\.|$)")
    # Read once by libraries at start-up, so they go into the environment (inherited by torchrun's workers
    # too): transformers resets its logger level from this variable when it configures itself, and c10's
    # C++ logging (TORCH_CPP_LOG_LEVEL, read when torch loads) never reaches Python.
    env = {k: v for k, v in _QUIET_ENV.items() if k not in os.environ}
    os.environ.update(env)
    # torch resets the level of its own loggers when it is imported (torch._logging), so it is imported
    # before the levels are set; `train` needs it anyway.
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    _saved = (filters, {n: logging.getLogger(n).level for n in THIRD_PARTY_LOGGERS}, list(env))
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def show_third_party() -> None:
    """Undo :func:`quiet_third_party`."""
    global _saved
    if _saved is None:
        return
    filters, levels, env = _saved
    for name in env:
        os.environ.pop(name, None)
    warnings.filters[:] = filters  # pyrefly: ignore[unsupported-operation]  (a list at run time)
    # Private but needed: Python caches its filter decisions and drops the cache only through this call.
    warnings._filters_mutated()  # pyrefly: ignore[missing-attribute]
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    _saved = None


def configure(show_warnings: bool | None = None) -> None:
    """Quiet or show third-party output: ``show_warnings`` (``run.show_warnings``; None before the config is
    read) or the environment variable, whichever asks to show."""
    if env_flag(SHOW_WARNINGS_ENV) or show_warnings:
        show_third_party()
    else:
        quiet_third_party()


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def print_error(exc: BaseException) -> None:
    """A start-up error on one line, on rank 0 only (every rank has read the same config and data)."""
    if rank() == 0:
        print(f"error: {exc}  [{TRACEBACK_ENV}=1 shows the traceback]", file=sys.stderr, flush=True)


def launch(nproc_per_node: int, worker_args: list[str], module: str = "gift_megatron.train") -> int:
    """``torchrun --standalone --nproc-per-node N -m MODULE WORKER_ARGS`` inside this process; returns the
    exit code. A failure is one line naming the first rank that failed and how (its own message, printed by
    the worker, is above it); torchrun's error table and its logging stay quiet."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun would set this too, with a warning: one thread per rank unless the user chose otherwise.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The agent logs every failure as an ERROR table of its own; the line below replaces it.
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(
        ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc_per_node), "-m", module, *worker_args]
    )
    try:
        run(args)
    except ChildFailedError as exc:
        failed_rank, failure = exc.get_first_failure()
        how = (
            f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
        )
        where = " (its error is above)" if failure.exitcode == 2 else ""  # 2: a start-up error, printed once
        print(
            f"error: training stopped: {len(exc.failures)} of {nproc_per_node} rank(s) failed, first rank "
            f"{failed_rank}, which {how}{where}",
            file=sys.stderr,
            flush=True,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
