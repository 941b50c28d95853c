"""Find, verify and (when asked) download MNIST-format datasets.

Search order for a dataset's four IDX files: an explicit path, `$DEEPSCOPE_DATA`, the user cache folder,
the system folder (Debian's `dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist), and
finally a download of the official files into the cache. Files are identified by MD5: the official `.gz`
sum, or the sum of the uncompressed content (Debian recompressed its `.gz` files, so only the content sum
matches there).
"""
from __future__ import annotations

import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .idx import md5_of, parse_idx, read_bytes

PARTS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True)
class IdxFile:
    name: str  # file name as published, e.g. "train-images-idx3-ubyte.gz"
    gz_md5: str  # MD5 of the official .gz download
    content_md5: str | None  # MD5 of the uncompressed IDX content, where known


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: dict[str, IdxFile]  # part (see PARTS) -> file
    mirrors: tuple[str, ...]  # base URLs tried in order
    system_dirs: tuple[str, ...]
    classes: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.classes)


FASHION_MNIST = DatasetSpec(
    name="fashion_mnist",
    files={
        "train_images": IdxFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train_labels": IdxFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        "test_images": IdxFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        "test_labels": IdxFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    },
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
)

MNIST = DatasetSpec(
    name="mnist",
    files={
        "train_images": IdxFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", None),
        "train_labels": IdxFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", None),
        "test_images": IdxFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", None),
        "test_labels": IdxFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", None),
    },
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",),
    system_dirs=("/usr/share/datasets/mnist",),
    classes=tuple(str(d) for d in range(10)),
)

DATASETS = {spec.name: spec for spec in (FASHION_MNIST, MNIST)}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}") from None


def cache_dir(spec: DatasetSpec) -> Path:
    """The user cache folder for a dataset: $XDG_CACHE_HOME/deepscope/NAME (default ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepscope" / spec.name


def candidate_dirs(spec: DatasetSpec, path: str | Path | None = None) -> list[tuple[str, Path]]:
    """Folders to search, in order, each with the reason it is searched (for error messages)."""
    dirs: list[tuple[str, Path]] = []
    if path is not None:
        dirs.append(("the given path", Path(path)))
    env = os.environ.get("DEEPSCOPE_DATA")
    if env:
        dirs.append(("$DEEPSCOPE_DATA", Path(env)))
    dirs.append(("the cache", cache_dir(spec)))
    dirs.extend(("the system folder", Path(d)) for d in spec.system_dirs)
    return dirs


def _file_in(folder: Path, idx_file: IdxFile) -> Path | None:
    """The file in `folder`, gzipped or raw, or None."""
    for name in (idx_file.name, idx_file.name.removesuffix(".gz")):
        for candidate in (folder / name, folder / idx_file.name.split("-")[0] / name):
            if candidate.is_file():
                return candidate
    return None


def find_files(spec: DatasetSpec, path: str | Path | None = None) -> dict[str, Path] | None:
    """The first searched folder holding all four files, or None. An explicit path must hold them."""
    for reason, folder in candidate_dirs(spec, path):
        found = {part: _file_in(folder, f) for part, f in spec.files.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
        if reason == "the given path":
            missing = [spec.files[p].name for p, f in found.items() if f is None]
            what = "does not exist" if not folder.exists() else f"lacks {', '.join(missing)}"
            raise DataError(
                f"data folder {folder} {what}; point --data-dir at a folder holding the {spec.name} IDX "
                f"files ({', '.join(f.name for f in spec.files.values())}, .gz or raw)"
            )
    return None


def verify(path: Path, content: bytes, idx_file: IdxFile) -> None:
    """Check a file against its published MD5 (of the .gz, or of the uncompressed content)."""
    sums = {md5_of(content)}
    if path.suffix == ".gz":
        sums.add(md5_of(path.read_bytes()))
    known = {idx_file.gz_md5, idx_file.content_md5} - {None}
    if not sums & known:
        raise DataError(
            f"{path}: checksum mismatch (MD5 {md5_of(content)} of the content); this is not the official "
            f"{idx_file.name}. Delete it and fetch it again, or pass verify=False / --no-verify to use your own files"
        )


def fetch_url(url: str, timeout: float = 60.0) -> bytes:
    """Download one URL. A separate function so tests replace it and never touch the network."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def download(spec: DatasetSpec, dest: Path | None = None) -> dict[str, Path]:
    """Download the official files into `dest` (default: the cache), verifying each MD5 before keeping it."""
    dest = Path(dest) if dest is not None else cache_dir(spec)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data cache {dest} ({e.strerror}); set $DEEPSCOPE_DATA") from None
    paths = {}
    for part, idx_file in spec.files.items():
        target = dest / idx_file.name
        if not target.is_file():
            _download_one(spec, idx_file, target)
        paths[part] = target
    return paths


def _download_one(spec: DatasetSpec, idx_file: IdxFile, target: Path) -> None:
    errors = []
    for mirror in spec.mirrors:
        url = mirror + idx_file.name
        try:
            data = fetch_url(url)
        except OSError as e:
            errors.append(f"{url}: {e}")
            continue
        if md5_of(data) != idx_file.gz_md5:
            errors.append(f"{url}: checksum mismatch (MD5 {md5_of(data)}, expected {idx_file.gz_md5})")
            continue
        # Write to a temporary name and rename, so an interrupted download leaves nothing half-written.
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as tmp:
            tmp.write(data)
        os.replace(tmp.name, target)
        return
    raise DataError(f"could not download {idx_file.name} for {spec.name}: " + "; ".join(errors))


@dataclass
class RawSplits:
    """The dataset as numpy arrays, straight from the files."""
    x_train: np.ndarray  # (N, 28, 28) uint8
    y_train: np.ndarray  # (N,) uint8
    x_test: np.ndarray
    y_test: np.ndarray
    spec: DatasetSpec
    source: dict[str, Path]


def load_raw(
    name: str = "fashion_mnist",
    path: str | Path | None = None,
    *,
    download_missing: bool = True,
    verify_checksums: bool = True,
) -> RawSplits:
    """Locate (or download) a dataset, read its four IDX files and check that they fit together."""
    spec = get_spec(name)
    paths = find_files(spec, path)
    if paths is None:
        if not download_missing:
            searched = ", ".join(f"{why} ({d})" for why, d in candidate_dirs(spec, path))
            raise DataError(
                f"{spec.name} not found; searched {searched}. Install Debian's dataset-fashion-mnist, set "
                f"$DEEPSCOPE_DATA, pass --data-dir, or allow the download"
            )
        paths = download(spec)
    arrays = {}
    for part, file_path in paths.items():
        content = read_bytes(file_path)
        if verify_checksums:
            verify(file_path, content, spec.files[part])
        arrays[part] = parse_idx(content, name=str(file_path))
    check_split(arrays["train_images"], arrays["train_labels"], paths["train_images"], paths["train_labels"], spec)
    check_split(arrays["test_images"], arrays["test_labels"], paths["test_images"], paths["test_labels"], spec)
    return RawSplits(arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"], spec, paths)


def check_split(images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path, spec: DatasetSpec) -> None:
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected images of shape (N, rows, cols), got {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of shape (N,), got {labels.shape}")
    if len(images) == 0:
        raise DataError(f"{images_path} holds no images: a split needs at least one; check the file (or the "
                        f"--data-dir it came from)")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(f"{images_path}: images of {images.shape[1]}x{images.shape[2]} pixels hold nothing to learn from")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            f"the two files of a split must have the same count"
        )
    if len(labels) and int(labels.max()) >= spec.n_classes:
        bad = int(np.argmax(labels >= spec.n_classes))
        raise DataError(
            f"{labels_path}: label {int(labels[bad])} at index {bad} is out of range for {spec.n_classes} classes"
        )
