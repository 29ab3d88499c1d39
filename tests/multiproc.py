"""Run a function on N local gloo ranks, with a hard timeout so a hang fails the test instead of the CI budget.

Why not torch.multiprocessing.spawn: its join() has no overall deadline and leaves children running when a
peer hangs in a collective; here the parent owns a deadline and kills every rank when it passes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any

_CONTEXT: Any = None


def _context() -> Any:
    """The multiprocessing context of every rank: a fork server that imported torch and Megatron-Core once.

    Why not plain spawn: each spawned rank imports torch and Megatron-Core again, about 6 s of CPU per
    rank, which over the suite's ~150 ranks was minutes of a 2-core CI machine. The fork server is a fresh
    single-threaded interpreter (no CUDA, no OpenMP pool yet) that forks each rank; what a rank needs from
    the test process (environment, arguments) reaches it through ``_entry``, as with spawn.
    """
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["torch", "torch.distributed", "megatron.core"])
    return _CONTEXT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, args, queue, env, backend):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Plain pickle bytes: a tensor sent through the queue as-is goes by shared memory, whose file
        # descriptor handoff fails once this process has exited.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    backend: str = "gloo",
    fresh_interpreter: bool = False,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` ranks (gloo, or nccl with one GPU per rank);
    return the per-rank results.

    ``fn`` must be importable at module level (it is pickled by reference); results must be picklable.
    The ranks inherit the environment the fork server started with; pass what a test changes in ``env``.
    ``fresh_interpreter``: spawn each rank in a new interpreter (for tests of what gets imported).
    Raises RuntimeError with the failing rank's traceback, or TimeoutError after ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn") if fresh_interpreter else _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, args, queue, dict(env or {}), backend), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        import queue as queue_mod
        import time

        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish within {timeout:.0f} s")
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and not errors:
                    # A rank died without reporting (segfault, OOM kill): its peers would wait forever.
                    raise RuntimeError(f"rank process exited with code {dead[0].exitcode} without a result") from None
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
        if errors:
            raise RuntimeError("\n".join(errors))
        return [results[r] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
