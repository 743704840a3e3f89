import os
import tempfile

import pytest
import torch

# No test may reach the network: every Hub-loading path is exercised against local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Code that tests load with trust_remote_code is copied into HF_MODULES_CACHE: one folder per test process, since
# parallel workers copying the same file into the shared ~/.cache could execute each other's half-written copies.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf_modules_"))


def pytest_collection_modifyitems(config, items):
    """`slow` tests need RUN_SLOW=1 and `gpu` tests need RUN_GPU=1 (plus a CUDA device)."""
    run_slow = os.environ.get("RUN_SLOW") == "1"
    run_gpu = os.environ.get("RUN_GPU") == "1" and torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set RUN_SLOW=1 to run"))
        if "gpu" in item.keywords and not run_gpu:
            item.add_marker(pytest.mark.skip(reason="gpu: set RUN_GPU=1 on a machine with CUDA to run"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
