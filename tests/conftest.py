import os

import pytest

# Each test process uses few threads: CI has 2 cores and multi-rank tests start several processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NEMORUN_HOME", os.path.join(os.environ.get("TMPDIR", "/tmp"), "gift_megatron_nemorun"))
# CPU tests are CPU tests on a GPU host too: the CPU runtime, gloo and the CPU model (inherited by spawned
# ranks). `make test` runs the `gpu`-marked tests in a second pytest process with GIFT_MEGATRON_DEVICE=cuda,
# because the CPU runtime patches Megatron-Core's modules for the rest of the process.
os.environ.setdefault("GIFT_MEGATRON_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    import torch

    on_gpu = torch.cuda.is_available() and os.environ["GIFT_MEGATRON_DEVICE"] != "cpu"
    if on_gpu:
        skip = pytest.mark.skip(
            reason="a CPU test: this process runs the gpu-marked tests (GIFT_MEGATRON_DEVICE"
            f"={os.environ['GIFT_MEGATRON_DEVICE']}); `make test` runs both"
        )
        for item in items:
            if "gpu" not in item.keywords:
                item.add_marker(skip)
        return
    reason = (
        "needs a CUDA GPU"
        if not torch.cuda.is_available()
        else "gpu test in a CPU process: run `make test` or GIFT_MEGATRON_DEVICE=cuda pytest -m gpu"
    )
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
