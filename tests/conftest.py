"""Shared test set-up: pinned threads so timings and results do not depend on what else runs."""
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("DEEPSCOPE_TEST_THREADS", "2")))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def one_thread():
    """For tiny models: one thread is fastest and does not spin against other jobs for the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA; none is present here")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def write_tiny_dataset(folder, n_train: int = 96, n_test: int = 48, n_classes: int = 10, seed: int = 0, gz: bool = True):
    """Write the four MNIST-format IDX files of a small learnable dataset: each class is a bright square
    at its own position, plus noise. Returns the folder."""
    import numpy as np

    from deepscope.data.idx import write_idx

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def split(n):
        labels = rng.integers(0, n_classes, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 4)
            images[i, 2 + 6 * r:7 + 6 * r, 2 + 6 * col:7 + 6 * col] = 250
        return images, labels

    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = split(n)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return folder


@pytest.fixture
def tiny_data(tmp_path):
    return write_tiny_dataset(tmp_path / "data")
