"""Shared test set-up: pinned threads so timings and results do not depend on what else runs."""
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("DEEPSCOPE_TEST_THREADS", "2")))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA; none is present here")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
