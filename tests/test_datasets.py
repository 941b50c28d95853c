import hashlib

import numpy as np
import pytest

from deepscope.data import datasets
from deepscope.data.datasets import FASHION_MNIST, DatasetSpec, IdxFile, find_files, load_raw
from deepscope.data.idx import write_idx
from deepscope.errors import DataError
from conftest import write_tiny_dataset


@pytest.fixture(autouse=True)
def isolated_search(tmp_path, monkeypatch):
    """No test may see the real cache, $DEEPSCOPE_DATA or the system folder, nor touch the network."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DEEPSCOPE_DATA", raising=False)
    monkeypatch.setattr(datasets, "fetch_url", lambda url, timeout=60.0: pytest.fail(f"network access: {url}"))


def spec_without_system_dir(**changes) -> DatasetSpec:
    fields = dict(name=FASHION_MNIST.name, files=FASHION_MNIST.files, mirrors=FASHION_MNIST.mirrors,
                  system_dirs=(), classes=FASHION_MNIST.classes)
    fields.update(changes)
    return DatasetSpec(**fields)


def test_explicit_path_wins(tmp_path):
    write_tiny_dataset(tmp_path / "mine", n_train=10, n_test=5)
    raw = load_raw("fashion_mnist", tmp_path / "mine", verify_checksums=False, download_missing=False)
    assert raw.x_train.shape == (10, 28, 28) and raw.y_test.shape == (5,)
    assert raw.source["train_images"].parent == tmp_path / "mine"


def test_search_order_env_then_cache_then_system(tmp_path, monkeypatch):
    spec = spec_without_system_dir(system_dirs=(str(tmp_path / "system"),))
    write_tiny_dataset(tmp_path / "system", n_train=3, n_test=2)
    assert find_files(spec)["train_images"].parent == tmp_path / "system"
    write_tiny_dataset(tmp_path / "cache" / "deepscope" / "fashion_mnist", n_train=3, n_test=2)
    assert find_files(spec)["train_images"].parent == tmp_path / "cache" / "deepscope" / "fashion_mnist"
    write_tiny_dataset(tmp_path / "env", n_train=3, n_test=2)
    monkeypatch.setenv("DEEPSCOPE_DATA", str(tmp_path / "env"))
    assert find_files(spec)["train_images"].parent == tmp_path / "env"


def test_raw_uncompressed_files_are_found(tmp_path):
    write_tiny_dataset(tmp_path / "raw", n_train=4, n_test=2, gz=False)
    raw = load_raw("fashion_mnist", tmp_path / "raw", verify_checksums=False)
    assert len(raw.x_train) == 4


def test_missing_data_folder_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"data folder .*nowhere does not exist; point --data-dir"):
        load_raw("fashion_mnist", tmp_path / "nowhere")


def test_folder_lacking_a_file_names_it(tmp_path):
    write_tiny_dataset(tmp_path / "d", n_train=4, n_test=2)
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte.gz"):
        load_raw("fashion_mnist", tmp_path / "d")


def test_nothing_found_and_no_download(monkeypatch):
    monkeypatch.setattr(datasets, "get_spec", lambda name: spec_without_system_dir())
    with pytest.raises(DataError, match="not found; searched"):
        load_raw("fashion_mnist", download_missing=False)


def test_image_label_count_mismatch(tmp_path):
    folder = write_tiny_dataset(tmp_path / "d", n_train=8, n_test=4)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8))
    with pytest.raises(DataError, match="holds 8 images but .*holds 7 labels"):
        load_raw("fashion_mnist", folder, verify_checksums=False)


def test_label_out_of_range(tmp_path):
    folder = write_tiny_dataset(tmp_path / "d", n_train=8, n_test=4)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 10, 3], dtype=np.uint8))
    with pytest.raises(DataError, match=r"label 10 at index 2 is out of range for 10 classes"):
        load_raw("fashion_mnist", folder, verify_checksums=False)


def test_checksum_mismatch_on_local_file(tmp_path):
    folder = write_tiny_dataset(tmp_path / "d", n_train=8, n_test=4)
    with pytest.raises(DataError, match="checksum mismatch.*--no-verify"):
        load_raw("fashion_mnist", folder)


def _spec_for(files_bytes: dict[str, bytes]) -> DatasetSpec:
    files = {part: IdxFile(name, hashlib.md5(data).hexdigest(), None) for part, (name, data) in files_bytes.items()}
    return spec_without_system_dir(name="fake", files=files, mirrors=("http://mirror.invalid/",))


def _gz_files(tmp_path):
    folder = write_tiny_dataset(tmp_path / "src", n_train=6, n_test=3)
    return {part: (f.name, (folder / f.name).read_bytes()) for part, f in FASHION_MNIST.files.items()}


def test_download_verifies_and_keeps_good_files(tmp_path, monkeypatch):
    payload = _gz_files(tmp_path)
    spec = _spec_for(payload)
    served = {f"http://mirror.invalid/{name}": data for name, data in payload.values()}
    monkeypatch.setattr(datasets, "fetch_url", lambda url, timeout=60.0: served[url])
    monkeypatch.setattr(datasets, "get_spec", lambda name: spec)
    raw = load_raw("fake")
    assert len(raw.x_train) == 6
    assert raw.source["train_images"].parent == tmp_path / "cache" / "deepscope" / "fake"


def test_download_checksum_mismatch_keeps_nothing(tmp_path, monkeypatch):
    payload = _gz_files(tmp_path)
    spec = _spec_for(payload)
    monkeypatch.setattr(datasets, "fetch_url", lambda url, timeout=60.0: b"tampered bytes")
    monkeypatch.setattr(datasets, "get_spec", lambda name: spec)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_raw("fake")
    cache = tmp_path / "cache" / "deepscope" / "fake"
    assert not any(cache.iterdir())  # no half-written or unverified file left behind


def test_download_network_error_is_reported(tmp_path, monkeypatch):
    spec = _spec_for(_gz_files(tmp_path))

    def refuse(url, timeout=60.0):
        raise OSError("connection refused")

    monkeypatch.setattr(datasets, "fetch_url", refuse)
    monkeypatch.setattr(datasets, "get_spec", lambda name: spec)
    with pytest.raises(DataError, match="could not download .*connection refused"):
        load_raw("fake")


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_raw("cifar")


REAL = "/usr/share/datasets/fashion-mnist"


@pytest.mark.realdata
@pytest.mark.skipif(not (__import__("pathlib").Path(REAL) / "train-images-idx3-ubyte.gz").is_file(),
                    reason="real Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist_verifies(monkeypatch):
    monkeypatch.setattr(datasets, "get_spec", lambda name: spec_without_system_dir(system_dirs=(REAL,)))
    raw = load_raw("fashion_mnist", download_missing=False)
    assert raw.x_train.shape == (60000, 28, 28) and raw.x_test.shape == (10000, 28, 28)
    assert np.bincount(raw.y_train).tolist() == [6000] * 10
