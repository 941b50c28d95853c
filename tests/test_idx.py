import gzip

import numpy as np
import pytest

from deepscope.data.idx import parse_idx, read_idx, write_idx
from deepscope.errors import DataError


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_round_trip(tmp_path, suffix, dtype):
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


def test_header_is_big_endian_and_matches_the_format(tmp_path):
    write_idx(tmp_path / "l.idx", np.array([3, 1, 4], dtype=np.uint8))
    raw = (tmp_path / "l.idx").read_bytes()
    assert raw[:4] == bytes([0, 0, 0x08, 1]) and raw[4:8] == (3).to_bytes(4, "big") and raw[8:] == bytes([3, 1, 4])


def test_wrong_magic_number_is_named(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(DataError, match=r"bad\.idx: wrong magic number 0x12340801"):
        read_idx(path)


def test_unknown_dtype_code_is_rejected():
    with pytest.raises(DataError, match="wrong magic number"):
        parse_idx(bytes([0, 0, 0x07, 1]) + (1).to_bytes(4, "big") + b"x")


def test_size_mismatch_with_header(tmp_path):
    path = tmp_path / "short.idx"
    write_idx(path, np.zeros((4, 5), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"declares shape \(4, 5\) of uint8 \(32 bytes in all\) but the file holds 29 bytes"):
        read_idx(path)


def test_header_shorter_than_its_dimensions():
    with pytest.raises(DataError, match="declares 3 dimensions"):
        parse_idx(bytes([0, 0, 8, 3, 0, 0]))


def test_truncated_gzip_is_reported(tmp_path):
    path = tmp_path / "cut.idx.gz"
    write_idx(path, np.zeros((100, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match=r"cut\.idx\.gz: the gzip stream is truncated or corrupt"):
        read_idx(path)


def test_corrupt_gzip_is_reported(tmp_path):
    path = tmp_path / "junk.idx.gz"
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_idx(tmp_path / "nope.gz")


def test_reads_gzip_written_by_gzip_module(tmp_path):
    body = bytes([0, 0, 8, 2]) + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes([1, 2, 3, 4])
    (tmp_path / "m.gz").write_bytes(gzip.compress(body))
    np.testing.assert_array_equal(read_idx(tmp_path / "m.gz"), [[1, 2], [3, 4]])
