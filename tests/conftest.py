"""Test setup: without a GPU, Triton kernels run under the Triton interpreter (set before any kernel import),
tests marked ``gpu`` are skipped, and the tuning cache lives in a temporary folder (a test never reads or writes
the user's own cache)."""

import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_CACHE_DIR = tempfile.mkdtemp(prefix="blockfp8-test-cache-")
os.environ["BLOCKFP8_CACHE_DIR"] = _CACHE_DIR
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
