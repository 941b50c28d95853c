"""Pre-flight: which layers count as BatchNorm (batch statistics in training) is decided by type, not name."""
import pytest
import torch
from torch import nn

from deepscope.diagnose.preflight import inspect_setup, is_batchnorm
from deepscope.norms import BatchNorm, RunningBatchNorm


class MyBatchNorm(nn.BatchNorm1d):  # a user's subclass of torch's BatchNorm is one
    pass


class BatchNormLogger(nn.Module):  # named like one, but normalises nothing
    def forward(self, x):
        return x


@pytest.mark.parametrize("module, expected", [
    (nn.BatchNorm1d(4), True), (nn.BatchNorm2d(4), True), (nn.SyncBatchNorm(4), True), (nn.LazyBatchNorm1d(), True),
    (BatchNorm(4), True), (MyBatchNorm(4), True),
    (RunningBatchNorm(4), False),  # built for tiny batches: its statistics pool many of them
    (BatchNormLogger(), False), (nn.InstanceNorm1d(4), False), (nn.LayerNorm(4), False),
])
def test_is_batchnorm_by_type(module, expected):
    assert is_batchnorm(module) is expected


def test_running_batchnorm_at_batch_size_two_is_not_reported_as_batchnorm():
    model = nn.Sequential(nn.Linear(3, 4), RunningBatchNorm(4), nn.ReLU(), nn.Linear(4, 2), BatchNorm(2))
    rec = inspect_setup(model, torch.randn(2, 3), torch.tensor([0, 1]), nn.CrossEntropyLoss())
    assert rec.batchnorms == ["4"] and rec.error is None
