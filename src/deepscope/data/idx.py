"""Read IDX files, the format of MNIST and Fashion-MNIST, with numpy.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions), one
big-endian uint32 per dimension, then the values in C order. Every field is checked against the file's
length so a truncated or foreign file is reported, never silently misread.
"""
from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

# dtype code (third byte of the magic number) -> big-endian numpy dtype
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_bytes(path: str | Path) -> bytes:
    """The file's content, gunzipped when the name ends in `.gz`; damage is a DataError naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: the gzip stream is truncated or corrupt ({e}); delete the file and fetch it again"
        ) from None


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode an IDX buffer into an array of its declared shape and dtype (native byte order)."""
    if len(data) < 4:
        raise DataError(f"{name}: {len(data)} bytes is too short for an IDX header")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES or ndim == 0:
        magic = int.from_bytes(data[:4], "big")
        raise DataError(
            f"{name}: wrong magic number 0x{magic:08x}; an IDX file starts with 0x0000, a dtype code "
            f"(one of {sorted(hex(c) for c in IDX_DTYPES)}) and a dimension count. Is this the right file?"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: header declares {ndim} dimensions but the file ends after {len(data)} bytes")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{name}: header declares shape {shape} of {dtype.name} ({expected} bytes in all) but the file "
            f"holds {len(data)} bytes; it is truncated or not an IDX file"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (`.gz` or raw) into a numpy array."""
    return parse_idx(read_bytes(path), name=str(path))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an array as IDX (gzipped when the name ends in `.gz`); used by tests and data tools."""
    array = np.ascontiguousarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise DataError(f"IDX cannot store dtype {array.dtype}; use one of {[str(d) for d in codes]}")
    header = bytes([0, 0, codes[native], array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    body = header + array.astype(native.newbyteorder(">")).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(body) if path.suffix == ".gz" else body)
