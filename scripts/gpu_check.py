#!/usr/bin/env python3
"""One prepared check of gift_megatron on ONE CUDA GPU (H100/H200) without Transformer Engine or vLLM.

    python scripts/gpu_check.py --prepare    # here, where pip can download: the wheels the GPU machine lacks -> .whl/
    scripts/gpu_check.sh                     # there (also `make gpu-check`): the check, one table at the end
    python scripts/gpu_check.py --cpu-dry    # here: the same stages at tiny shapes on CPU (catches trivial bugs)

Stages, each in its own process group with its own timeout, inside a total budget (--budget, 490 s by
default, so the whole script ends well inside 9 minutes). A stage that fails or times out puts its error
in the table and the check goes on with the next stage; the exit code is 1 when any stage did not pass.

  setup      installs the carried wheels (.whl/*.whl) into /tmp/site (dry run: a scratch dir), then imports
             torch, megatron.core, transformers and gift_megatron from there; reports versions and device.
  gpu-tests  pytest -m gpu over the test files that carry the marker; counts from its JUnit XML.
  trainer    gift_megatron's Trainer, a 1-rank NCCL world, examples/gpu_check_0.5b.yaml: ~0.5B Llama-shaped
             bf16 model from random weights, 5 GIFT steps on the toy task with the CPU rollout engine
             (transformers' generate, on the GPU) and an eval set; tokens/s, peak memory, host syncs per step.
  logprobs   benchmarks/logprobs.py at 16384 tokens x 152064 vocab, bf16: ours, Megatron's
             vocab_parallel_cross_entropy and naive; time, peak memory, fraction of the HBM-bandwidth bound.
  step       benchmarks/step.py: our SFT/GFT/GIFT steps against plain Megatron-Core, time and memory.
  packing    benchmarks/packing.py: a GIFT step on rows padded to seq_length, padded per micro-batch, and
             packed under a 16k-token budget (per-sequence attention of the local spec: no TE here);
             step time, peak memory, computed / real tokens.

Host syncs are counted with torch.cuda.set_sync_debug_mode("warn"): torch then raises a Python warning
("called a synchronizing CUDA operation") at every synchronizing call it makes (.item(), .tolist(), .cpu(),
nonzero(), blocking copies to the host, synchronize()); a warnings.showwarning hook counts them per phase
of the step and per source line instead of printing them. torch does not see syncs made inside
torch.distributed or by other libraries' own CUDA calls, so the count is a lower bound.

Results: the table on stdout; with $OUT set (or --out DIR) also gpu_check.md, gpu_check.json and the
stages' log tails in gpu_check_logs.txt, rewritten after every stage so a cut-off run still returns what it
finished.
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import dataclasses
import datetime
import functools
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL_DIR = os.path.join(ROOT, ".whl")
GPU_SITE = "/tmp/site"
TRAINER_CONFIG = os.path.join("examples", "gpu_check_0.5b.yaml")
BUDGET_S = 490
# The dry run's budget: its shapes are tiny, but on a loaded shared 2-core machine imports alone can take
# minutes; it guards against hangs, not against slowness.
DRY_BUDGET_S = 900
MIN_STAGE_S = 5  # with less than this left of the budget a stage is skipped: it could not even import torch
SYNC_WARNING = "called a synchronizing CUDA operation"

# What the GPU machine lacks, carried as wheels at the versions the CPU stack pins (constraints/dev-py312.txt):
# megatron-core, and math-verify (an install_requires of ours, for the math_verify reward) with its two
# dependencies. Everything else setup.py and these wheels require is on the machine already (GPU_PACKAGES).
CARRIED = ("megatron-core", "math-verify", "latex2sympy2_extended", "antlr4-python3-runtime", "omegaconf")
CONSTRAINTS = os.path.join(ROOT, "constraints", "dev-py312.txt")
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# The GPU machine's Python packages (image 'cuda', read 2026-11-17; /work/.library/device/KINDS.md): python3 is
# 3.12 with torch 2.11 (CUDA 13), transformers 5.17, triton, safetensors, pytest, and these.
GPU_PACKAGES = frozenset(
    """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp pygments
pyparsing pyproject-hooks
""".split()
)

# Stage timeouts (seconds) on the GPU and in the CPU dry run. GPU: 45 + 100 + 125 + 80 + 75 + 60 = 485 <= BUDGET_S.
# setup pays the first imports of torch and its CUDA libraries on a fresh machine (cold page cache); gpu-tests
# gets the most after the trainer: each test that starts ranks or a trainer pays its own imports.
TIMEOUTS = {
    "gpu": {"setup": 45, "gpu-tests": 100, "trainer": 125, "logprobs": 80, "step": 75, "packing": 60},
    # Generous: on a loaded shared 2-core machine the dry run's imports alone took minutes (logprobs: 100 s).
    "cpu-dry": {"setup": 120, "gpu-tests": 150, "trainer": 240, "logprobs": 240, "step": 240, "packing": 240},
}
STAGE_NAMES = ("setup", "gpu-tests", "trainer", "logprobs", "step", "packing")
# The dry run's trainer: the recipe shrunk to a 2-layer model and 4 prompts a step (32 members, 4 micro-batches).
DRY_TRAINER_OVERRIDES = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "train.prompts_per_step=4",
    "train.micro_batch_size=8",
    "train.eval_prompts=4",
]
LOGPROBS_ARGS = {
    "gpu": [
        "--device",
        "cuda",
        "--tokens",
        "16384",
        "--vocab",
        "152064",
        "--dtype",
        "bf16",
        "--impls",
        "ours,megatron,naive",
        "--repeats",
        "10",
        "--warmup",
        "3",
    ],
    "cpu-dry": [
        "--device",
        "cpu",
        "--tokens",
        "256",
        "--vocab",
        "2048",
        "--dtype",
        "bf16",
        "--impls",
        "ours,megatron,naive",
        "--repeats",
        "2",
        "--warmup",
        "1",
    ],
}
PACKING_ARGS = {
    "gpu": [
        "--device",
        "cuda",
        "--groups",
        "2",
        "--layers",
        "4",
        "--hidden",
        "1024",
        "--vocab",
        "32768",
        "--repeats",
        "2",
        "--plan-steps",
        "5",
    ],
    "cpu-dry": [
        "--device",
        "cpu",
        "--groups",
        "1",
        "--layers",
        "1",
        "--hidden",
        "64",
        "--vocab",
        "256",
        "--repeats",
        "1",
        "--plan-steps",
        "2",
        "--scale",
        "0.05",
        "--budget",
        "1024",
    ],
}
STEP_ARGS = {
    "gpu": ["--device", "cuda", "--repeats", "5"],  # benchmarks/step.py's CUDA defaults (its docstring)
    "cpu-dry": [
        "--device",
        "cpu",
        "--layers",
        "2",
        "--hidden",
        "64",
        "--vocab",
        "256",
        "--seq",
        "32",
        "--mbs",
        "2",
        "--micro",
        "2",
        "--repeats",
        "2",
        "--threads",
        "1",
    ],
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ----------------------------------------------------------------------------------------------- --prepare
def _pins() -> dict[str, str]:
    pins = {}
    with open(CONSTRAINTS) as fh:
        for line in fh:
            m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
            if m:
                pins[_norm(m.group(1))] = m.group(2)
    missing = [n for n in CARRIED if _norm(n) not in pins]
    if missing:
        raise SystemExit(f"--prepare: {CONSTRAINTS} pins no version of {missing}")
    return pins


def _install_requires() -> list[str]:
    """setup.py's install_requires, read without running setup.py."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [ast.literal_eval(e) for e in node.value.elts]
    raise SystemExit("--prepare: setup.py has no install_requires")


def _requirement_name(spec: str) -> str:
    return _norm(re.match(r"^\s*([A-Za-z0-9_.\-]+)", spec).group(1))


def _wheel_project(path: str) -> tuple[str, str]:
    name, version = os.path.basename(path).split("-")[:2]
    return _norm(name), version


def _wheel_requires(path: str) -> list[str]:
    """A wheel's Requires-Dist names that apply on the GPU machine's Python (3.12, Linux x86_64, no extras)."""
    from packaging.requirements import Requirement

    target = {
        "python_version": "3.12",
        "python_full_version": "3.12.3",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(target):
                out.append(_norm(req.name))
    return out


def prepare() -> int:
    """Download the carried wheels (cp312, manylinux x86_64) into .whl/, check that nothing the package or the
    wheels require is missing on the GPU machine, print the list and the total size."""
    pins = _pins()
    os.makedirs(WHEEL_DIR, exist_ok=True)
    wanted = {_norm(n): pins[_norm(n)] for n in CARRIED}
    for path in glob.glob(os.path.join(WHEEL_DIR, "*.whl")):  # two versions of one project stop the install there
        name, version = _wheel_project(path)
        if wanted.get(name) != version:
            print(f"removing {os.path.basename(path)} (not a pinned carried wheel)")
            os.remove(path)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *[a for p in PLATFORMS for a in ("--platform", p)],
        "-d",
        WHEEL_DIR,
        *[f"{n}=={pins[_norm(n)]}" for n in CARRIED],
    ]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wheels = sorted(glob.glob(os.path.join(WHEEL_DIR, "*.whl")))
    have = collections.Counter(_wheel_project(w)[0] for w in wheels)
    problems = [f"{n}: {have[n]} wheels" for n in wanted if have[n] != 1]
    provided = set(wanted) | GPU_PACKAGES
    for spec in _install_requires():
        if _requirement_name(spec) not in provided:
            problems.append(f"setup.py needs {spec!r}, which neither the GPU machine nor .whl has")
    for w in wheels:
        for req in _wheel_requires(w):
            if req not in provided:
                problems.append(f"{os.path.basename(w)} needs {req}, which neither the GPU machine nor .whl has")
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(WHEEL_DIR, "x.whl")], cwd=ROOT).returncode == 0
    if not ignored:
        problems.append(".whl/ is not ignored by git: it would travel as part of the working tree, not through carry")
    total = 0
    for w in wheels:
        size = os.path.getsize(w)
        total += size
        print(f"{size / 2**20:8.2f} MiB  {os.path.basename(w)}")
    print(
        f"{total / 2**20:8.2f} MiB  total in {os.path.relpath(WHEEL_DIR, ROOT)}/ (the device call carries at most 64 MiB)"
    )
    if problems:
        print("problems:\n  " + "\n  ".join(problems))
        return 1
    return 0


# ------------------------------------------------------------------------------------------ stage side
class StageResult:
    """Rows (what, value) a stage reports, rewritten to its result file after every change: a stage that is
    killed at its timeout still leaves what it had measured."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"rows": [], "error": None}
        self.save()

    def add(self, what: str, value: str) -> None:
        self.data["rows"].append([what, value])
        self.save()
        print(f"[row] {what}: {value}", flush=True)

    def fail(self, error: str) -> None:
        self.data["error"] = error
        self.save()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.data, fh)
        os.replace(tmp, self.path)


@dataclasses.dataclass
class Context:
    dry: bool
    workdir: str
    site: str
    deadline: float | None = None  # time.time() at which the driver kills this stage


def _run_child(cmd: list[str]) -> int:
    """A child process whose output goes to the stage's log (inherited stdout); returns its exit code."""
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def stage_setup(res: StageResult, ctx: Context) -> None:
    import importlib
    import importlib.util
    import platform

    wheels = sorted(glob.glob(os.path.join(WHEEL_DIR, "*.whl")))
    if wheels:
        t = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            ctx.site,
            *wheels,
        ]
        if _run_child(cmd):
            raise RuntimeError(f"pip install of {len(wheels)} wheels into {ctx.site} failed (see the log)")
        names = ", ".join("{} {}".format(*_wheel_project(w)) for w in wheels)
        res.add("wheels", f"{names} into {ctx.site} ({time.perf_counter() - t:.1f} s)")
    elif ctx.dry:
        res.add("wheels", "none in .whl/ (`--prepare` fetches them); the dry run uses this environment's packages")
    else:
        if importlib.util.find_spec("megatron") is None:
            raise RuntimeError(
                "no wheels in .whl/ and megatron-core is not installed: run "
                "`python scripts/gpu_check.py --prepare` where pip can download, and carry .whl"
            )
        res.add("wheels", "none in .whl/; megatron-core is installed already")
    if ctx.site not in sys.path:
        sys.path.insert(0, ctx.site)
    importlib.invalidate_caches()  # the site dir may not have existed when this process started
    import megatron.core
    import torch
    import transformers

    import gift_megatron  # noqa: F401 - the package imports against these versions

    res.add(
        "python / torch",
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, transformers {transformers.__version__}",
    )
    res.add(
        "megatron-core",
        f"{megatron.core.__version__} from {os.path.dirname(os.path.dirname(os.path.dirname(megatron.core.__file__)))}",
    )
    absent = [m for m in ("transformer_engine", "vllm", "apex") if importlib.util.find_spec(m) is None]
    present = [m for m in ("transformer_engine", "vllm", "apex") if m not in absent]
    res.add("not installed", ", ".join(absent) + (f"; installed: {', '.join(present)}" if present else ""))
    if ctx.dry:
        res.add("device", "CPU (dry run: CUDA hidden)")
        return
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device: this check needs one GPU (use --cpu-dry on a CPU machine)")
    p = torch.cuda.get_device_properties(0)
    res.add(
        "device",
        f"{p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, compute "
        f"capability {p.major}.{p.minor}, {torch.cuda.device_count()} visible",
    )


def _gpu_test_files() -> list[str]:
    files = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        with open(path) as fh:
            if re.search(r"pytest\.mark\.gpu\b", fh.read()):
                files.append(os.path.relpath(path, ROOT))
    return files


def parse_junit(path: str) -> dict[str, Any]:
    """Counts and per-test outcomes from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    out: dict[str, Any] = {"passed": [], "failed": [], "skipped": []}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            text_lines = (child.text or "").strip().splitlines()
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message") or (text_lines[-1] if text_lines else child.tag)
            elif child.tag == "skipped":
                outcome, message = "skipped", child.get("message") or ""
        out[outcome].append((test, message))
    return out


def parse_verbose(text: str) -> tuple[dict[str, list], str | None]:
    """Outcomes so far from ``pytest -v`` output, and the test it was running (None when between tests):
    what is left of a run stopped at the stage's deadline, which never writes its JUnit XML."""
    out: dict[str, list] = {"passed": [], "failed": [], "skipped": []}
    running = None
    for line in text.splitlines():
        m = re.match(r"^(tests/\S+::\S+)(?: (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b(.*))?", line)
        if not m:
            continue
        test, word = m.group(1), m.group(2)
        if word is None:
            running = test
            continue
        running = None
        kind = {"PASSED": "passed", "XPASS": "passed", "SKIPPED": "skipped", "XFAIL": "skipped"}.get(word, "failed")
        reason = re.sub(r"\s*\[\s*\d+%\]\s*$", "", m.group(3)).strip()  # drop pytest's " [ 40%]"
        out[kind].append((test, reason[1:-1] if reason.startswith("(") and reason.endswith(")") else reason))
    return out, running


def stage_gpu_tests(res: StageResult, ctx: Context) -> None:
    files = _gpu_test_files()
    if not files:
        res.add("summary", "no test file carries pytest.mark.gpu")
        return
    xml = os.path.join(ctx.workdir, "gpu_tests.xml")
    out_path = os.path.join(ctx.workdir, "gpu_tests.out")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *files, f"--junitxml={xml}", "-o", "junit_family=xunit2", "-v"]
    # Stopped 10 s before the stage's deadline, so the tests that finished are still reported.
    limit = max(ctx.deadline - time.time() - 10, 1) if ctx.deadline else None
    print("$ " + " ".join(cmd), flush=True)
    start = time.monotonic()
    with open(out_path, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    with open(out_path, errors="replace") as fh:
        text = fh.read()
    print(text[-20000:], flush=True)  # into the stage's log
    running = None
    if rc is None:
        r, running = parse_verbose(text)
    elif os.path.exists(xml):
        r = parse_junit(xml)
    else:
        raise RuntimeError(f"pytest exited with code {rc} and wrote no JUnit XML (see the log)")
    res.add(
        "summary",
        f"{len(r['passed'])} passed, {len(r['failed'])} failed, {len(r['skipped'])} skipped "
        f"(pytest -m gpu over {len(files)} files: {', '.join(os.path.basename(f) for f in files)})",
    )
    for test, message in r["failed"]:
        res.add("FAILED " + test, message[:300])
    for test, _ in r["passed"]:
        res.add("passed", test)
    reasons = collections.Counter(message for _, message in r["skipped"])
    for message, n in reasons.most_common():
        res.add("skipped", f"{n} x {message[:200]}")
    if rc is None:
        res.fail(
            f"pytest stopped at the stage's deadline after {time.monotonic() - start:.0f} s"
            + (f", while running {running}" if running else "")
            + "; the tests above had finished"
        )
    elif rc not in (0, 5) or r["failed"]:
        res.fail(f"pytest exit code {rc}: {len(r['failed'])} gpu tests failed")


# -------------------------------------------------------------------------------------- the trainer stage
class SyncCounter:
    """Counts torch's sync-debug warnings by phase and by source line instead of printing them."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.sites: collections.Counter = collections.Counter()
        self.owners: collections.Counter = collections.Counter()
        self.current = "outside"
        self._saved: Any = None

    def install(self) -> None:
        import warnings

        self._saved = warnings.showwarning
        self.refresh_filter()
        warnings.showwarning = self._show

    @staticmethod
    def refresh_filter() -> None:
        """Put the "always" filter first. The default one shows a warning once per source line, and every sync
        must count; called again at every step because a module imported later may put an "ignore" first."""
        import warnings

        warnings.filterwarnings("always", message=re.escape(SYNC_WARNING))

    def uninstall(self) -> None:
        import warnings

        if self._saved is not None:
            warnings.showwarning = self._saved
            self._saved = None

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING in str(message):
            self.counts[self.current] += 1
            filename, lineno = _caller_outside_torch(filename, lineno)
            self.sites[f"{_short_path(filename)}:{lineno}"] += 1
            self.owners[_owner(filename)] += 1
            return
        self._saved(message, category, filename, lineno, file, line)

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous


def _caller_outside_torch(filename: str, lineno: int) -> tuple[str, int]:
    """The first frame on the stack outside torch, the warnings module and this file: whose code asked for
    the sync (a warning raised inside torch's own Python code names a torch line otherwise)."""
    skip = [
        os.path.abspath(__file__),
        os.path.dirname(os.path.abspath(__import__("warnings").__file__)) + os.sep + "warnings.py",
    ]
    torch_module = sys.modules.get("torch")
    if torch_module is not None:
        skip.append(os.path.dirname(os.path.abspath(torch_module.__file__)) + os.sep)
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not any(path == s or (s.endswith(os.sep) and path.startswith(s)) for s in skip):
            return path, frame.f_lineno
        frame = frame.f_back
    return filename, lineno


def _owner(filename: str) -> str:
    path = filename.replace(os.sep, "/")
    for marker, owner in (
        ("/gift_megatron/", "gift_megatron"),
        ("/megatron/core/", "megatron-core"),
        ("/transformers/", "transformers"),
    ):
        if marker in path:
            return owner
    return "other"


def _short_path(filename: str) -> str:
    for marker in ("/site-packages/", "/tmp/site/", ROOT + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# The ObjectiveStep methods that prepare a step's micro-batches (moving them to the device and running the
# reference / old-policy log-prob passes): ``prepare``, and ``fill_reference_logprobs`` (which ``prepare``
# runs) when a caller calls it on its own. Their syncs are the "prepare" phase.
PREPARE_METHODS = ("prepare", "fill_reference_logprobs")
STEP_PHASES = ("rollout", "prepare", "update", "metrics", "weight sync", "other")


class _PhaseProxy:
    """Stands in for the trainer's ObjectiveStep: its call is the "update" phase, its PREPARE_METHODS the
    "prepare" phase; every other attribute is the step's own."""

    def __init__(self, target: Any, counter: SyncCounter) -> None:
        self._target, self._counter = target, counter

    def __call__(self, *args, **kwargs):
        with self._counter.phase("update"):
            return self._target(*args, **kwargs)

    def __getattr__(self, name: str):
        attr = getattr(self._target, name)
        if name not in PREPARE_METHODS or not callable(attr):
            return attr

        @functools.wraps(attr)
        def wrapped(*args, **kwargs):
            with self._counter.phase("prepare"):
                return attr(*args, **kwargs)

        return wrapped


def _instrument(trainer: Any, counter: SyncCounter, timings: dict, missing: list) -> None:
    """Wrap the trainer's phases (private methods, looked up by name: a renamed one is reported as missing and
    its syncs count as "other")."""

    def wrap(name: str, phase: str) -> None:
        original = getattr(trainer, name, None)
        if original is None:
            missing.append(name)
            return

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            t = time.perf_counter()
            with counter.phase(phase):
                try:
                    return original(*args, **kwargs)
                finally:
                    timings.setdefault(phase, []).append(time.perf_counter() - t)

        setattr(trainer, name, wrapped)

    wrap("rollout", "rollout")
    wrap("rollout_metrics", "metrics")
    wrap("sync_weights", "weight sync")
    wrap("evaluate", "eval")
    wrap("save", "checkpoint")
    step = getattr(trainer, "train_step", None)
    if step is None:
        missing.append("train_step")
        return
    if not any(hasattr(step, m) for m in PREPARE_METHODS):
        missing.append(f"train_step.{'/'.join(PREPARE_METHODS)}")
    trainer.train_step = _PhaseProxy(step, counter)


def _gib(n: float) -> str:
    """Bytes as GiB, or MiB below 1 GiB (the dry run's sizes)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def stage_trainer(res: StageResult, ctx: Context) -> None:
    import resource

    import torch

    cuda = not ctx.dry
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    from gift_megatron.config import load_config
    from gift_megatron.data.toy import write_toy_task

    paths = write_toy_task(os.path.join(ctx.workdir, "toy_task"))
    overrides = [
        f"data.train_files={paths['train']}",
        f"data.eval_files={paths['eval']}",
        f"data.tokenizer={paths['tokenizer']}",
        f"run.output_dir={os.path.join(ctx.workdir, 'trainer_run')}",
    ]
    cfg = load_config(os.path.join(ROOT, TRAINER_CONFIG), overrides + (DRY_TRAINER_OVERRIDES if ctx.dry else []))
    m, t, r = cfg.model, cfg.train, cfg.rollout
    res.add(
        "config",
        f"{TRAINER_CONFIG}{' (dry: shrunk)' if ctx.dry else ''}: {_count(m.parameter_count())} "
        f"parameters ({m.num_layers} layers, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, vocab "
        f"{m.vocab_size}), {cfg.precision.dtype}, {cfg.objective.name}, {t.steps} steps x "
        f"{t.prompts_per_step} prompts x {r.n} rollouts, engine {r.engine}, eval on {t.eval_prompts} prompts",
    )

    from gift_megatron.trainer.loop import Trainer

    counter, timings, missing, steps = SyncCounter(), {}, [], []
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    try:
        init_s = time.perf_counter() - t0
        after_init = torch.cuda.memory_allocated() if cuda else None
        res.add(
            "init",
            f"{init_s:.1f} s (process group, data, model, optimizer, rollout engine, first weight sync)"
            + (f"; {_gib(after_init)} allocated after it" if cuda else ""),
        )
        _instrument(trainer, counter, timings, missing)
        original_step = trainer.train_one_step

        def counted_step():
            counter.refresh_filter()
            before = collections.Counter(counter.counts)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with counter.phase("other"):
                metrics = original_step()
            wall = time.perf_counter() - start
            syncs = {p: counter.counts[p] - before[p] for p in STEP_PHASES}
            peak = torch.cuda.max_memory_allocated() if cuda else None
            steps.append({"wall": wall, "metrics": metrics, "syncs": syncs, "peak": peak})
            detail = ", ".join(f"{p} {n}" for p, n in syncs.items() if n)
            res.add(
                f"step {len(steps)}",
                f"{wall:.2f} s, {metrics.get('perf/tokens_per_s', float('nan')):.0f} tokens/s, "
                f"loss {metrics.get('loss', float('nan')):.4f}, reward "
                f"{metrics.get('rollout/reward_mean', float('nan')):.3f}"
                + (f", peak {_gib(peak)}, {sum(syncs.values())} host syncs ({detail or 'none'})" if cuda else ""),
            )
            return metrics

        trainer.train_one_step = counted_step
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        counter.install()
        try:
            out = trainer.run()
        finally:
            counter.uninstall()
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        trainer.close()

    res.add(
        "eval reward",
        f"{out['first_eval']:.3f} -> {out['last_eval']:.3f} (greedy, start and end)"
        if out["first_eval"] is not None
        else "no eval set",
    )
    tps = [s["metrics"].get("perf/tokens_per_s", 0.0) for s in steps]
    later = tps[1:] or tps
    res.add(
        "tokens/s",
        f"{statistics.median(later):.0f} median of steps 2-{len(steps)} (step 1: {tps[0]:.0f}); the "
        "trainer's perf/tokens_per_s: prompt + response tokens / step wall time",
    )
    parts = {
        k: statistics.median(s["metrics"].get(f"perf/{k}_s", 0.0) for s in steps[1:] or steps)
        for k in ("rollout", "train", "sync")
    }
    res.add(
        "step time",
        f"{statistics.median(s['wall'] for s in steps[1:] or steps):.2f} s median: rollout "
        f"{parts['rollout']:.2f}, train {parts['train']:.2f}, weight sync {parts['sync']:.2f}",
    )
    if timings.get("eval") or timings.get("checkpoint"):
        res.add(
            "eval / checkpoint",
            f"eval {statistics.median(timings.get('eval') or [0]):.2f} s a call; final "
            f"checkpoint save {sum(timings.get('checkpoint') or [0]):.2f} s",
        )
    if cuda:
        res.add(
            "peak memory",
            f"{_gib(max(s['peak'] for s in steps))} during steps (max_memory_allocated), "
            f"{_gib(after_init)} after init, {_gib(torch.cuda.max_memory_reserved())} reserved peak",
        )
        per_step = [sum(s["syncs"].values()) for s in steps]
        by_phase = {p: statistics.median(s["syncs"][p] for s in steps) for p in STEP_PHASES}
        evals = len(timings.get("eval") or []) or 1
        res.add(
            "host syncs/step",
            f"{statistics.median(per_step):.0f} median ({min(per_step)}-{max(per_step)}): "
            + ", ".join(f"{p} {v:.0f}" for p, v in by_phase.items())
            + f"; eval {counter.counts['eval'] / evals:.0f} a call; checkpoint {counter.counts['checkpoint']}",
        )
        # Owners and sites over the whole run (steps, evals, the save): the first caller outside torch.
        res.add("sync owners (whole run)", ", ".join(f"{o} {n}" for o, n in counter.owners.most_common()) or "none")
        res.add(
            "top sync sites (whole run)",
            "; ".join(f"{site} x{n}" for site, n in counter.sites.most_common(6)) or "none",
        )
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        res.add("peak memory", f"host RSS high-water mark {_gib(rss)} (CPU run)")
        res.add("host syncs/step", "not counted on CPU (no CUDA); on a GPU: torch.cuda.set_sync_debug_mode('warn')")
    if missing:
        res.add("not instrumented", f"Trainer has no {', '.join(missing)}: those syncs count as 'other'")


# ----------------------------------------------------------------------------------- the benchmark stages
def stage_logprobs(res: StageResult, ctx: Context) -> None:
    out = os.path.join(ctx.workdir, "logprobs.json")
    mode = "cpu-dry" if ctx.dry else "gpu"
    rc = _run_child(
        [sys.executable, os.path.join(ROOT, "benchmarks", "logprobs.py"), *LOGPROBS_ARGS[mode], "--json", out]
    )
    if rc or not os.path.exists(out):
        raise RuntimeError(f"benchmarks/logprobs.py exited with code {rc} (see the log)")
    with open(out) as fh:
        s = json.load(fh)
    bw = s["bandwidth"]
    nominal = f"{bw['nominal'] / 1e12:.2f} TB/s nominal" if bw.get("nominal") else "nominal unknown"
    res.add(
        "shape",
        f"{s['tokens']} tokens x {s['vocab']} vocab, {s['dtype']} logits ({_gib(s['logits_bytes'])}), "
        f"TP=1, forward+backward, on {s['device_name']}",
    )
    res.add(
        "bandwidth bound",
        f"{bw['measured'] / 1e12:.3f} TB/s measured (device-to-device copy), {nominal}; "
        f"logits read once: {s['bound_s'] * 1e3:.3f} ms",
    )
    cuda = s["device"].startswith("cuda")
    label = "CUDA peak" if cuda else "RSS peak"
    for r in s["results"]:
        rel = (
            f"; x{r['time_vs_megatron']:.2f} time, x{r['mem_vs_megatron']:.2f} memory of megatron"
            if r.get("mem_vs_megatron") is not None
            else ""
        )
        frac = f", {r['bound_fraction']:.1%} of the bound" if r.get("bound_fraction") is not None else ""
        # On CPU the RSS peak is what the benchmark judges; at the dry run's tiny shapes malloc's reuse of
        # freed pages hides it, so the profiler's tensor peak is shown beside it.
        tensors = "" if cuda else f", tensor peak {_gib(r['alloc_peak'])}"
        res.add(
            r["impl"],
            f"{r['time'] * 1e3:.2f} ms{frac}; {label} {_gib(r['peak'])} beyond the logits "
            f"({r['peak_per_element']:.2f} B/elem{tensors}){rel}",
        )
    for g in s["goals"]:
        res.add(
            "goal",
            f"{g['goal']}: {'HOLDS' if g['holds'] else 'MISSED'}"
            + (f" ({g['value']:.2f}x)" if g["value"] is not None else ""),
        )


def stage_step(res: StageResult, ctx: Context) -> None:
    out = os.path.join(ctx.workdir, "step.json")
    mode = "cpu-dry" if ctx.dry else "gpu"
    rc = _run_child([sys.executable, os.path.join(ROOT, "benchmarks", "step.py"), *STEP_ARGS[mode], "--json", out])
    if not os.path.exists(out):
        raise RuntimeError(f"benchmarks/step.py exited with code {rc} and wrote no results (see the log)")
    with open(out) as fh:
        s = json.load(fh)
    sh = s["shape"]
    res.add(
        "shape",
        f"{sh['layers']} layers, hidden {sh['hidden']}, vocab {sh['vocab']}, {sh['dtype']}, "
        f"{sh['micro']} x {sh['mbs']} x {sh['seq']} tokens a step, Adam, median of {sh['repeats']}, "
        f"on {s['device_name']}",
    )
    for r in s["rows"]:
        if "error" in r:
            res.add(r["variant"], "FAILED: " + r["error"])
            continue
        mem = f", peak {_gib(r['peak_bytes'])}" if r.get("peak_bytes") is not None else ""
        mem_rel = f", x{r['peak_vs_plain']:.2f} memory" if r.get("peak_vs_plain") is not None else ""
        rel = f", x{r['time_vs_plain']:.3f} time of plain" if r.get("time_vs_plain") is not None else ""
        res.add(r["variant"], f"{r['s_per_step']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s{mem}{rel}{mem_rel}")
    for g in s["goals"]:
        res.add(
            "goal",
            f"{g['goal']}: "
            + (
                f"{'HOLDS' if g['holds'] else 'MISSES'} ({g['value']:.3f}x)"
                if g["value"] is not None
                else f"NOT MEASURED ({g['why_not']})"
            ),
        )
    if rc:
        res.fail(f"benchmarks/step.py exited with code {rc}: {', '.join(s['errors']) or 'see the log'} failed")


def stage_packing(res: StageResult, ctx: Context) -> None:
    out = os.path.join(ctx.workdir, "packing.json")
    mode = "cpu-dry" if ctx.dry else "gpu"
    rc = _run_child(
        [sys.executable, os.path.join(ROOT, "benchmarks", "packing.py"), *PACKING_ARGS[mode], "--json", out]
    )
    if rc or not os.path.exists(out):
        raise RuntimeError(f"benchmarks/packing.py exited with code {rc} (see the log)")
    with open(out) as fh:
        s = json.load(fh)
    for case, (lo, hi) in s["plan"]["computed_over_real"].items():
        res.add(f"plan {case}", f"computed/real {lo:.2f}-{hi:.2f}")
    base = s["steps"].get("a", {}).get("seconds")
    for case, r in s["steps"].items():
        rel = f", x{r['seconds'] / base:.2f} time of (a)" if base else ""
        res.add(
            f"step {case}",
            f"{r['seconds']:.3f} s, peak {_gib(r['peak_bytes'])}, computed/real "
            f"{r['computed'] / r['real']:.3f}, {r['micro_batches']} micro-batches, "
            f"{r['stats_source']}, {r['backend']} spec{rel}",
        )


STAGES: dict[str, Callable[[StageResult, Context], None]] = {
    "setup": stage_setup,
    "gpu-tests": stage_gpu_tests,
    "trainer": stage_trainer,
    "logprobs": stage_logprobs,
    "step": stage_step,
    "packing": stage_packing,
}


def stage_main(name: str, result_path: str, ctx: Context) -> int:
    res = StageResult(result_path)
    try:
        STAGES[name](res, ctx)
    except BaseException as exc:
        traceback.print_exc()
        text = str(exc).strip()
        res.fail(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
        return 1
    return 1 if res.data["error"] else 0


# ------------------------------------------------------------------------------------------ driver side
@dataclasses.dataclass
class Stage:
    """A stage to run as a subprocess: in ``argv``, "{result}" becomes its result file's path and "{deadline}"
    the time.time() at which it will be killed."""

    name: str
    argv: list[str]
    timeout: float


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the stage's process group (it was started in its own session), children included."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _log_tail(path: str, lines: int) -> list[str]:
    try:
        with open(path, errors="replace") as fh:
            return [l.rstrip("\n") for l in fh.readlines()[-lines:]]
    except OSError:
        return []


def run_stage(stage: Stage, timeout: float, env: dict, workdir: str) -> dict:
    result_path = os.path.join(workdir, f"{stage.name}.result.json")
    log_path = os.path.join(workdir, f"{stage.name}.log")
    if os.path.exists(result_path):
        os.remove(result_path)
    deadline = f"{time.time() + timeout:.1f}"
    argv = [a.replace("{result}", result_path).replace("{deadline}", deadline) for a in stage.argv]
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, timed_out = None, True
        else:
            # The stage is done; children it left behind (a benchmark worker, a checkpoint writer) go too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - start
    data: dict[str, Any] = {"rows": [], "error": None}
    if os.path.exists(result_path):
        with contextlib.suppress(json.JSONDecodeError, OSError):
            with open(result_path) as fh:
                data = json.load(fh)
    tail = _log_tail(log_path, 200)
    if timed_out:
        status = "TIMEOUT"
        error = f"killed after its {timeout:.0f} s timeout" + (f"; last log line: {_last_line(tail)}" if tail else "")
    elif rc == 0 and not data.get("error"):
        status, error = "ok", None
    else:
        status = "FAILED"
        error = data.get("error") or f"exit code {rc}; last log line: {_last_line(tail) or '(no output)'}"
    return {
        "name": stage.name,
        "status": status,
        "seconds": round(seconds, 1),
        "timeout": round(timeout, 1),
        "rows": data.get("rows", []),
        "error": error,
        "log_tail": tail,
    }


def _last_line(lines: list[str]) -> str:
    return next((l.strip() for l in reversed(lines) if l.strip()), "")


def run_stages(
    stages: list[Stage], budget: float, env: dict, workdir: str, on_stage: Callable[[list[dict]], None] | None = None
) -> list[dict]:
    """Run ``stages`` in order, each under min(its timeout, what is left of ``budget``); never stops early."""
    start = time.monotonic()
    results: list[dict] = []
    for stage in stages:
        left = budget - (time.monotonic() - start)
        timeout = min(stage.timeout, left)
        print(
            f"[{time.monotonic() - start:6.1f} s] {stage.name}: running (timeout {max(timeout, 0):.0f} s)", flush=True
        )
        if left < MIN_STAGE_S:
            result = {
                "name": stage.name,
                "status": "SKIPPED",
                "seconds": 0.0,
                "timeout": round(max(timeout, 0), 1),
                "rows": [],
                "error": f"the check's {budget:.0f} s budget is spent",
                "log_tail": [],
            }
        else:
            result = run_stage(stage, timeout, env, workdir)
        results.append(result)
        print(
            f"[{time.monotonic() - start:6.1f} s] {stage.name}: {result['status']} ({result['seconds']:.1f} s)"
            + (f": {result['error']}" if result["error"] else ""),
            flush=True,
        )
        if on_stage:
            on_stage(results)
    return results


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " / ")


def render_table(results: list[dict], title: str) -> str:
    lines = [f"## {title}", "", "| stage | status | what | result |", "|---|---|---|---|"]
    for r in results:
        status = f"{r['status']} ({r['seconds']:.1f} s)"
        rows = list(r["rows"])
        if r["error"]:
            rows.append(["error", r["error"][:600]])
        if not rows:
            rows = [["", ""]]
        for i, (what, value) in enumerate(rows):
            lines.append(
                f"| {r['name'] if i == 0 else ''} | {status if i == 0 else ''} | {_cell(what)} | {_cell(value)} |"
            )
    return "\n".join(lines)


def _write_outputs(out_dir: str | None, results: list[dict], meta: dict, title: str) -> str:
    table = render_table(results, title)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "gpu_check.md"), "w") as fh:
            fh.write(table + "\n")
        with open(os.path.join(out_dir, "gpu_check.json"), "w") as fh:
            json.dump(
                {**meta, "stages": [{k: v for k, v in r.items() if k != "log_tail"} for r in results]}, fh, indent=1
            )
        with open(os.path.join(out_dir, "gpu_check_logs.txt"), "w") as fh:
            for r in results:
                fh.write(f"===== {r['name']}: {r['status']} ({r['seconds']} s), last {len(r['log_tail'])} log lines\n")
                fh.write("\n".join(r["log_tail"]) + "\n")
    return table


def _git_commit() -> str | None:
    """The checkout's commit, or None: the device machine gets the working tree, maybe without .git or git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def build_stages(mode: str, names: list[str], workdir: str, site: str) -> list[Stage]:
    common = ["--workdir", workdir, "--site", site] + (["--dry"] if mode == "cpu-dry" else [])
    return [
        Stage(
            n,
            [
                sys.executable,
                os.path.abspath(__file__),
                "--stage",
                n,
                "--result",
                "{result}",
                "--deadline",
                "{deadline}",
                *common,
            ],
            TIMEOUTS[mode][n],
        )
        for n in names
    ]


def run_check(args: argparse.Namespace) -> int:
    mode = "cpu-dry" if args.cpu_dry else "gpu"
    if args.budget is None:
        args.budget = DRY_BUDGET_S if args.cpu_dry else BUDGET_S
    names = [n.strip() for n in args.stages.split(",") if n.strip()] if args.stages else list(STAGE_NAMES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        print(f"unknown stages {unknown}; choose from {', '.join(STAGE_NAMES)}", file=sys.stderr)
        return 2
    if "setup" not in names:
        names.insert(0, "setup")  # every other stage imports what setup installs
    if mode == "gpu" and shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
        print(
            "no NVIDIA GPU on this machine (no nvidia-smi, no /dev/nvidia0): run this check on the GPU machine, "
            "or `python scripts/gpu_check.py --cpu-dry` here",
            file=sys.stderr,
        )
        return 2
    workdir = tempfile.mkdtemp(prefix="gift_gpu_check_")
    site = GPU_SITE if mode == "gpu" else os.path.join(workdir, "site")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, ROOT, os.environ.get("PYTHONPATH")) if p)
    # gift_megatron decides CPU or CUDA from GIFT_MEGATRON_DEVICE (auto by default), and the test suite runs
    # the gpu-marked tests only in a process where it is cuda: every stage gets the mode's value.
    env["GIFT_MEGATRON_DEVICE"] = "cpu" if mode == "cpu-dry" else "cuda"
    if mode == "cpu-dry":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run, also on a machine with a GPU
        env.setdefault("OMP_NUM_THREADS", "1")
    out_dir = args.out or os.environ.get("OUT")
    started = datetime.datetime.now(datetime.UTC)
    meta = {
        "mode": mode,
        "started_utc": started.isoformat(timespec="seconds"),
        "budget_s": args.budget,
        "git": _git_commit(),
    }
    t0 = time.monotonic()

    def title(done: bool) -> str:
        return (
            f"gift_megatron GPU check ({mode}, commit {meta['git'] or 'unknown (no git here)'}, {started:%Y-%m-%d %H:%M} UTC, "
            f"{time.monotonic() - t0:.0f} s of a {args.budget:.0f} s budget{'' if done else ', running'})"
            + (
                ": tiny shapes on CPU, a smoke test of the script; its numbers and goals mean nothing"
                if mode == "cpu-dry"
                else ""
            )
        )

    try:
        results = run_stages(
            build_stages(mode, names, workdir, site),
            args.budget,
            env,
            workdir,
            on_stage=lambda rs: _write_outputs(out_dir, rs, meta, title(False)),
        )
        meta["total_s"] = round(time.monotonic() - t0, 1)
        table = _write_outputs(out_dir, results, meta, title(True))
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table)
    if out_dir:
        print(
            f"\nwritten: {', '.join(os.path.join(out_dir, f) for f in ('gpu_check.md', 'gpu_check.json', 'gpu_check_logs.txt'))}"
        )
    return 0 if all(r["status"] == "ok" for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="download the carried wheels into .whl/ (needs pip access)")
    p.add_argument("--cpu-dry", action="store_true", help="the same stages at tiny shapes on CPU")
    p.add_argument("--out", help="write gpu_check.md/.json and the logs here (default: $OUT when set)")
    p.add_argument(
        "--budget", type=float, help=f"total seconds for all stages (default {BUDGET_S}; {DRY_BUDGET_S} with --cpu-dry)"
    )
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGE_NAMES)} (setup always runs)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the scratch directory (logs, run dirs)")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--site", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--dry", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prepare:
        return prepare()
    if args.stage:
        return stage_main(
            args.stage, args.result, Context(dry=args.dry, workdir=args.workdir, site=args.site, deadline=args.deadline)
        )
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
