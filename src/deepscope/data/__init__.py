"""Data: IDX files, dataset discovery and verification, and in-memory batching."""
from .datasets import DATASETS, FASHION_MNIST, MNIST, DatasetSpec, load_raw
from .idx import read_idx, write_idx
from .loaders import DataLoaders, TensorBatches, image_dls

__all__ = ["DATASETS", "FASHION_MNIST", "MNIST", "DatasetSpec", "load_raw", "read_idx", "write_idx",
           "DataLoaders", "TensorBatches", "image_dls"]
