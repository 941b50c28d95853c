import pytest

from deepscope.config import TrainConfig
from deepscope.errors import ConfigError


def test_defaults_round_trip():
    config = TrainConfig()
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("changes, message", [
    ({"epochs": 0}, "epochs must be positive"),
    ({"batch_size": 0}, "batch size must be positive"),
    ({"lr": -1.0}, "lr must be positive"),
    ({"lr": "fast"}, "'lr' must be float"),
    ({"epochs": 2.5}, "'epochs' must be int"),
    ({"epochs": True}, "'epochs' must be int"),
    ({"nfs": [8, "x"]}, "'nfs' must be list"),
    ({"limit_batches": 0}, "limit batches must be positive"),
    ({"schedule": "step"}, "schedule must be one of"),
    ({"weight_decay": -0.1}, "weight decay must be >= 0"),
    ({"norm": "bogus"}, "norm must be one of"),
    ({"model": "vgg"}, "model must be one of"),
    ({"stats_sample": -1}, "stats sample must be a number of values, or 0 for all of them"),
])
def test_bad_values_are_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match=r"unknown config keys \['epoch'\]"):
        TrainConfig.from_dict({"epoch": 3})
