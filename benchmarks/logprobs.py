"""Token log-probs from vocab-parallel logits: peak memory and time of forward+backward, side by side.

Implementations (all at TP=1, one process, the same logits and labels, loss = sum(weight * logp)):
  ours            gift_megatron vocab_parallel_logprobs, chunk_size=None
  ours-chunk      the same with --chunk tokens per chunk (default 1024)
  ours-1block     chunk_size=None with the block caps disabled: one fp32 block of all tokens, to show what
                  the caps buy (on CPU both rows above run in ~8 MiB cache-sized blocks, on a GPU in 64 MiB)
  megatron        megatron.core.tensor_parallel.vocab_parallel_cross_entropy (logp = -loss), logits as
                  [s, b=1, V] as it documents, Megatron's parallel state initialized for TP=1 (CPU: gloo and
                  gift_megatron's CPU runtime; CUDA: a 1-rank NCCL world) and its TP group passed on.
                  With fp32 logits it subtracts the row max from its input in place (its .float() is then
                  no copy), so there it gets a fresh copy of the logits before every step, made outside the
                  timed and measured region (its memory then leaves out that copy, which it uses as its
                  fp32 softmax buffer); with bf16/fp16 logits its .float() is a copy and none is made.
  naive           all-gather (identity at TP=1) + torch.log_softmax(logits.float()) + gather

--device cuda (the default where CUDA is available; default shape there 16384 tokens x 152064 vocab, Qwen2.5's
padded vocabulary): each implementation runs alone in its own process, one after the other (each process's
caching allocator keeps what it freed, so processes computing side by side would add their peaks).
Time: CUDA events around one forward+backward after --warmup untimed steps, median of --repeats. Memory:
torch.cuda.max_memory_allocated during one step minus what was allocated before it (the logits, labels and
weights are not counted; the logits' gradient is). Bandwidth bound: the logits' bytes read once at the peak
HBM bandwidth measured here by a large device-to-device copy (bytes read + written / time); "bound/time" is
that bound over the implementation's time, the fraction of the memory-bound limit it reaches. The nominal
bandwidth of known GPUs is printed beside the measured one.

--device cpu (default shape 8192 tokens x 32768 vocab). Each implementation lives in its own subprocess
(no allocator state shared between them), which creates the inputs, runs one warm-up forward+backward and
drops its outputs. Then, one process at a time:
  1. tensor peak: one step under torch.profiler(profile_memory=True); the running sum of the recorded
     tensor allocations and frees gives the exact peak of live tensor bytes above the start (the logits,
     labels and weights exist before and are not counted; the logits' gradient is).
  2. RSS peak: reset the kernel's RSS high-water mark (write "5" to /proc/self/clear_refs), run one step,
     report VmHWM - VmRSS(before the step). This also sees malloc and page granularity; it cross-checks
     (1) and is the number the goals are judged on.
  3. time: --repeats rounds, each running one step of every implementation in turn (rotating the
     order), so load from elsewhere on a shared machine hits all alike; the median per implementation.
OpenMP: by default the workers run with OMP_WAIT_POLICY=PASSIVE. With libgomp's default spinning, one
descheduled thread stalls every parallel-region barrier whenever anything else runs on a 2-core machine,
and times of code with many regions (ours: a few per 8 MiB block) then vary up to 10x between runs,
while Megatron's few large ops are hit less. On an idle machine spinning is somewhat faster for every
implementation; pass --omp-wait-policy inherit to keep the environment's setting and see the difference.
"Beyond the logits" = everything the step allocates, including the returned gradient of the logits.
Per element = bytes / (tokens * vocab).

Run:  .venv/bin/python benchmarks/logprobs.py [--device auto|cpu|cuda] [--tokens N] [--vocab V] [--dtype bf16]
      [--chunk 1024] [--repeats 7] [--warmup W] [--impls ours,ours-chunk,ours-1block,megatron,naive]
      [--json results.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

IMPLS = ("ours", "ours-chunk", "ours-1block", "megatron", "naive")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
# Default shapes: on a GPU the real one (16k tokens of a Qwen2.5-sized, 128-padded 152064 vocabulary); on CPU
# one that the 2-core machine measures in about a minute.
DEFAULT_SHAPE = {"cuda": (16384, 152064), "cpu": (8192, 32768)}
# Nominal HBM bandwidth (bytes/s) from the vendors' data sheets, matched in this order (more specific names
# first) against torch's device name; only printed beside the measured peak, which is what the bound uses.
NOMINAL_BANDWIDTH = (
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),
    ("GH200", 4.0e12),
    ("H200", 4.8e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("B200", 8.0e12),
)


def nominal_bandwidth(device_name: str) -> float | None:
    for key, value in NOMINAL_BANDWIDTH:
        if key in device_name:
            return value
    return None


# ------------------------------------------------------------------------------------------- worker side


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make_step(impl: str, chunk: int, device) -> Callable:
    """Return step(logits, labels, weights) -> None that runs forward and backward of sum(weight * logp)."""
    import torch

    if impl in ("ours", "ours-chunk", "ours-1block"):
        from gift_megatron.parallel import logprobs as module
        from gift_megatron.parallel.logprobs import vocab_parallel_logprobs

        chunk_size = chunk if impl == "ours-chunk" else None
        if impl == "ours-1block":
            module.CPU_BLOCK_BYTES = 1 << 62
            module.DEVICE_BLOCK_BYTES = 1 << 62

        def step(logits, labels, weights):
            (vocab_parallel_logprobs(logits, labels, chunk_size=chunk_size) * weights).sum().backward()

        return step
    if impl == "megatron":
        ce = _megatron_cross_entropy(device)

        def step(logits, labels, weights):
            # Megatron documents [s, b, V]; a [N, 1, V] view costs nothing.
            loss = ce(logits.unsqueeze(1), labels.unsqueeze(1)).squeeze(1)
            (-loss * weights).sum().backward()

        return step
    if impl == "naive":

        def step(logits, labels, weights):
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(1)
            (logp * weights).sum().backward()

        return step
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def _megatron_cross_entropy(device) -> Callable:
    """Megatron-Core's vocab_parallel_cross_entropy with Megatron's parallel state set up for TP=1.

    A 1-rank world: gloo and gift_megatron's CPU runtime on CPU, NCCL on CUDA (an NCCL collective takes CUDA
    tensors only). 0.19 takes ``tp_group`` and gets parallel_state's TP group; 0.16 reads parallel_state itself.
    """
    import inspect
    import socket

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    cuda = device.type == "cuda"
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=0,
            world_size=1,
            **({"device_id": device} if cuda else {}),
        )
    if cuda:
        torch.cuda.set_device(device)
        parallel_state.initialize_model_parallel(1, 1)
    else:
        from gift_megatron.parallel import initialize_model_parallel_cpu

        initialize_model_parallel_cpu(1, 1)
    if "tp_group" in inspect.signature(vocab_parallel_cross_entropy).parameters:
        group = parallel_state.get_tensor_model_parallel_group()
        return lambda logits, labels: vocab_parallel_cross_entropy(logits, labels, tp_group=group)
    return vocab_parallel_cross_entropy


def _allocator_peak(step: Callable, *inputs) -> int:
    """Peak of live tensor bytes allocated during one step, from the profiler's memory records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(*inputs)
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


class Worker:
    """One implementation with its own inputs, in its own process; the driver calls it step by step."""

    def __init__(
        self, impl: str, tokens: int, vocab: int, dtype_name: str, chunk: int, device: str, warmup: int = 1
    ) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.cuda.set_device(self.device)
        dtype = getattr(torch, DTYPES[dtype_name])
        gen = torch.Generator(device=self.device).manual_seed(0)
        # Generated directly in the target dtype: an fp32 temporary would raise the RSS high-water mark.
        self.logits = torch.randn(tokens, vocab, generator=gen, dtype=dtype, device=self.device).requires_grad_()
        self.labels = torch.randint(0, vocab, (tokens,), generator=gen, device=self.device)
        self.weights = torch.randn(tokens, generator=gen, device=self.device)
        self.step = _make_step(impl, chunk, self.device)
        # Megatron's cross-entropy subtracts the row max in place from fp32 input logits: it gets a fresh copy
        # for every step (made before the timed / measured region), so every step sees the same input.
        self.fresh_copy = impl == "megatron" and dtype == torch.float32
        self._current = self.logits
        for _ in range(max(1, warmup)):  # kernels, thread pool, lazy imports, allocator caches
            self.timed_step()
        self._release()

    def _inputs(self) -> tuple:
        if self.fresh_copy:
            self._current = self.logits.detach().clone().requires_grad_()
            if self.cuda:
                import torch

                torch.cuda.synchronize()  # the copy's kernel must not run inside the timed region
        return self._current, self.labels, self.weights

    def _release(self) -> None:
        self.logits.grad = None
        self._current = self.logits
        gc.collect()

    def memory(self) -> dict:
        inputs = self._inputs()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            self.step(*inputs)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            self._release()
            return {"peak": peak, "alloc_peak": peak}
        alloc_peak = _allocator_peak(self.step, *inputs)
        self._release()
        inputs = self._inputs()
        rss_before = _status_kib("VmRSS")
        if not _reset_rss_peak():
            raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs is not writable)")
        self.step(*inputs)
        rss_peak = (_status_kib("VmHWM") - rss_before) * 1024
        self._release()
        return {"peak": rss_peak, "alloc_peak": alloc_peak}

    def timed_step(self) -> float:
        self.logits.grad = None
        inputs = self._inputs()
        if self.cuda:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.step(*inputs)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        self.step(*inputs)
        return time.perf_counter() - start


def serve(impl: str, args: argparse.Namespace) -> None:
    """Worker loop: one JSON reply on stdout per command line on stdin ("memory", "time", "quit")."""
    worker = Worker(impl, args.tokens, args.vocab, args.dtype, args.chunk, args.device, args.warmup)
    print(json.dumps({"ready": impl}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "memory":
            reply: dict = worker.memory()
        elif command == "time":
            reply = {"time": worker.timed_step()}
            worker._release()
        elif command == "quit":
            return
        else:
            reply = {"error": f"unknown command {command!r}"}
        print(json.dumps(reply), flush=True)


# --------------------------------------------------------------------------------------------- driver


class _WorkerProcess:
    def __init__(self, impl: str, args: argparse.Namespace) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        if args.omp_wait_policy != "inherit":
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
        # gift_megatron decides CPU or CUDA in one place (GIFT_MEGATRON_DEVICE, where the package has it); its
        # CPU runtime (Megatron's TP=1 state in the megatron worker) must agree with --device on a GPU host too.
        env["GIFT_MEGATRON_DEVICE"] = "cuda" if args.device.startswith("cuda") else "cpu"
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            impl,
            "--tokens",
            str(args.tokens),
            "--vocab",
            str(args.vocab),
            "--dtype",
            args.dtype,
            "--chunk",
            str(args.chunk),
            "--device",
            args.device,
            "--warmup",
            str(args.warmup),
        ]
        self.impl = impl
        # The profiler and Megatron print warnings to stderr: keep them out of the table unless it fails.
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env
        )

    def wait_ready(self) -> None:
        self._read()  # the "ready" line: inputs built and warmed up

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.seek(0)
            raise RuntimeError(f"{self.impl} worker exited with code {self.proc.wait()}:\n{self.stderr.read()[-4000:]}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"{self.impl}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def measure(impls: list[str], args: argparse.Namespace) -> list[dict]:
    """Memory of each implementation alone, then its times.

    CPU: all workers stay alive but only one computes at a time; interleaving the timed steps means a
    burst of load from elsewhere on the machine slows every implementation alike instead of one of them.
    CUDA: one worker at a time from start to exit, since a live process keeps its allocator's cached
    memory (naive's ~12 bytes per logit would stay reserved while the next implementation runs).
    """
    if args.device.startswith("cuda"):
        results = []
        for impl in impls:
            w = _WorkerProcess(impl, args)
            try:
                w.wait_ready()
                r = {"impl": impl, **w.ask("memory"), "times": [w.ask("time")["time"] for _ in range(args.repeats)]}
            finally:
                w.close()
            r["time"] = statistics.median(r["times"])
            results.append(r)
        return results
    workers = []
    try:
        for impl in impls:
            workers.append(_WorkerProcess(impl, args))
        for w in workers:  # started side by side: their imports overlap
            w.wait_ready()
        results = {w.impl: {"impl": w.impl, **w.ask("memory"), "times": []} for w in workers}
        for round_index in range(args.repeats):
            shift = round_index % len(workers)
            for w in workers[shift:] + workers[:shift]:
                results[w.impl]["times"].append(w.ask("time")["time"])
        for r in results.values():
            r["time"] = statistics.median(r["times"])
        return [results[i] for i in impls]
    finally:
        for w in workers:
            w.close()


def measure_bandwidth(device: str, nbytes: int | None = None, repeats: int = 10) -> float:
    """Peak memory bandwidth (bytes/s) of a large copy on ``device``: bytes read + written / median time.

    2 GiB per buffer on a GPU (far beyond L2, long enough that launch overhead is noise); 256 MiB on CPU.
    """
    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    nbytes = nbytes or ((2 << 30) if cuda else (256 << 20))
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: touches every page of dst
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    del src, dst
    if cuda:
        torch.cuda.empty_cache()  # give the memory back before the workers start
    return 2 * nbytes / statistics.median(times)


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:9.1f} MiB"


def summarize(results: list[dict], args: argparse.Namespace, bandwidth: dict) -> dict:
    """Everything the report prints, as JSON-friendly data (also written by --json)."""
    elements = args.tokens * args.vocab
    logits_bytes = elements * ITEMSIZE[args.dtype]
    bound_s = logits_bytes / bandwidth["measured"] if bandwidth.get("measured") else None
    meg = next((r for r in results if r["impl"] == "megatron"), None)
    rows = []
    for r in results:
        rows.append(
            {
                **r,
                "peak_per_element": r["peak"] / elements,
                "mem_vs_megatron": r["peak"] / meg["peak"] if meg and meg["peak"] else None,
                "time_vs_megatron": r["time"] / meg["time"] if meg else None,
                "bound_fraction": bound_s / r["time"] if bound_s else None,
            }
        )
    goals = []
    target = next((r for r in rows if r["impl"] == "ours-chunk"), None) or next(
        (r for r in rows if r["impl"] == "ours"), None
    )
    if meg and target:
        goals.append(
            {
                "goal": f"memory <= 0.5x megatron ({target['impl']})",
                "value": target["mem_vs_megatron"],
                "holds": target["peak"] <= 0.5 * meg["peak"],
            }
        )
        goals.append(
            {
                "goal": f"time <= 1.2x megatron ({target['impl']})",
                "value": target["time_vs_megatron"],
                "holds": target["time"] <= 1.2 * meg["time"],
            }
        )
    return {
        "device": args.device,
        "device_name": bandwidth.get("device_name"),
        "tokens": args.tokens,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "chunk": args.chunk,
        "repeats": args.repeats,
        "logits_bytes": logits_bytes,
        "bandwidth": bandwidth,
        "bound_s": bound_s,
        "results": rows,
        "goals": goals,
    }


def report(summary: dict) -> str:
    s = summary
    cuda = s["device"].startswith("cuda")
    bw = s["bandwidth"]
    nominal = f"{bw['nominal'] / 1e12:.2f} TB/s" if bw.get("nominal") else "unknown for this device"
    lines = [
        f"{s['tokens']} tokens x {s['vocab']} vocab shard, {s['dtype']} logits ({s['logits_bytes'] / 2**20:.0f} MiB),"
        f" TP=1, forward+backward, chunk={s['chunk']}, on {s['device_name'] or s['device']}",
        f"bandwidth: measured {bw['measured'] / 1e12:.3f} TB/s (large copy, read + write), nominal {nominal}; "
        f"logits read once: {s['bound_s'] * 1e3:.3f} ms",
    ]
    if cuda:
        lines.append(
            f"{'impl':<11} {'CUDA peak beyond logits':>24} {'B/elem':>7} {'time ms':>9} {'(min-max)':>17}"
            f" {'mem/meg':>8} {'time/meg':>9} {'bound/time':>10}"
        )
    else:
        lines.append(
            f"{'impl':<11} {'RSS peak beyond logits':>24} {'B/elem':>7} {'tensor peak':>14} {'B/elem':>7}"
            f" {'time s':>8} {'(min-max)':>13} {'mem/meg':>8} {'time/meg':>9} {'bound/time':>10}"
        )
    elements = s["tokens"] * s["vocab"]

    def ratio(v, width):
        return f"{v:{width}.2f}" if v is not None else f"{'-':>{width}}"

    for r in s["results"]:
        frac = f"{r['bound_fraction']:10.3f}" if r["bound_fraction"] is not None else f"{'-':>10}"
        if cuda:
            lines.append(
                f"{r['impl']:<11} {_fmt_bytes(r['peak']):>24} {r['peak'] / elements:7.2f} {r['time'] * 1e3:9.3f}"
                f" {min(r['times']) * 1e3:8.3f}-{max(r['times']) * 1e3:<8.3f} {ratio(r['mem_vs_megatron'], 8)}"
                f" {ratio(r['time_vs_megatron'], 9)} {frac}"
            )
        else:
            lines.append(
                f"{r['impl']:<11} {_fmt_bytes(r['peak']):>24} {r['peak'] / elements:7.2f} "
                f"{_fmt_bytes(r['alloc_peak']):>14} {r['alloc_peak'] / elements:7.2f} {r['time']:8.3f}"
                f" {min(r['times']):6.3f}-{max(r['times']):<6.3f} {ratio(r['mem_vs_megatron'], 8)}"
                f" {ratio(r['time_vs_megatron'], 9)} {frac}"
            )
    for g in s["goals"]:
        value = f"{g['value']:.2f}x" if g["value"] is not None else "megatron's peak is 0 at this shape"
        lines.append(f"goal {g['goal']}: {'HOLDS' if g['holds'] else 'MISSED'} ({value})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--tokens", type=int, help="default: 16384 on CUDA, 8192 on CPU")
    parser.add_argument(
        "--vocab", type=int, help="vocab shard size (logits' last dimension); default: 152064 on CUDA, 32768 on CPU"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--chunk", type=int, default=1024, help="chunk_size of the ours-chunk row")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps (median per implementation)")
    parser.add_argument("--warmup", type=int, help="untimed steps before measuring (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    parser.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active", "inherit"],
        default="passive",
        help="OMP_WAIT_POLICY for the workers (see the method notes); inherit keeps the environment's",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if kind == "cuda" and args.device == "cuda":
        args.device = f"cuda:{torch.cuda.current_device()}"
    args.tokens = args.tokens or DEFAULT_SHAPE[kind][0]
    args.vocab = args.vocab or DEFAULT_SHAPE[kind][1]
    args.warmup = args.warmup if args.warmup is not None else (3 if kind == "cuda" else 1)
    if args.worker:
        serve(args.worker, args)
        return
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        parser.error(f"unknown implementations {unknown}; choose from {IMPLS}")
    name = torch.cuda.get_device_name(args.device) if kind == "cuda" else "CPU"
    bandwidth = {
        "measured": measure_bandwidth(args.device),
        "nominal": nominal_bandwidth(name) if kind == "cuda" else None,
        "device_name": name,
    }
    results = measure(impls, args)
    summary = summarize(results, args, bandwidth)
    print(report(summary))
    if kind == "cpu":
        print(f"OMP_WAIT_POLICY={args.omp_wait_policy}, torch threads per worker: default ({os.cpu_count()} CPUs)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)


if __name__ == "__main__":
    main()
