import os

import pytest

# Each test process uses few threads: CI has 2 cores and multi-rank tests start several processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NEMORUN_HOME", os.path.join(os.environ.get("TMPDIR", "/tmp"), "gift_megatron_nemorun"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
