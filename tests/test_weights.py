import pytest
import torch

from deepscope.errors import CheckpointError
from deepscope.models import cnn
from deepscope.weights import load_weights, save_weights


def test_round_trip_including_channels_last(tmp_path):
    model = cnn(nfs=(4, 8), norm="batch").to(memory_format=torch.channels_last)
    save_weights(model, tmp_path / "w.safetensors")
    other = cnn(nfs=(4, 8), norm="batch")
    load_weights(other, tmp_path / "w.safetensors")
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_from_another_model(tmp_path):
    save_weights(cnn(nfs=(4, 8)), tmp_path / "w.safetensors")
    target = cnn(nfs=(4, 16))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="different model.*shape mismatch"):
        load_weights(target, tmp_path / "w.safetensors")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half-loaded


def test_damaged_or_missing_checkpoint(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_weights(cnn(), tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_weights(cnn(), tmp_path / "none.safetensors")
