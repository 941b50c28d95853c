"""Built-in callbacks."""
from .device import DeviceCallback, default_device, to_device
from .limits import LimitBatches, SingleBatch
from .metrics import MetricsCallback
from .progress import ProgressCallback
from .recorder import Recorder
from .checkpoint import Checkpoint, EarlyStopping, SaveBest
from .distributed import Distributed
from .training import Compile, CompiledStep, GradClip, MixedPrecision, MixedPrecisionStep
from .schedule import CosineSchedule, OneCycle, ParamScheduler, combine_scheds, sched_cos, sched_lin
from .timing import PhaseTimer

__all__ = ["DeviceCallback", "default_device", "to_device", "LimitBatches", "SingleBatch", "MetricsCallback",
           "ProgressCallback", "Recorder", "CosineSchedule", "OneCycle", "ParamScheduler", "combine_scheds",
           "sched_cos", "sched_lin", "default_callbacks", "Checkpoint", "Distributed", "EarlyStopping", "SaveBest", "GradClip", "MixedPrecision",
           "MixedPrecisionStep", "Compile", "CompiledStep", "PhaseTimer"]


def default_callbacks(device: str = "auto", progress: bool = True) -> list:
    """What most fits want: device placement, loss/accuracy per epoch, a per-batch record, progress."""
    cbs = [DeviceCallback(device), MetricsCallback(), Recorder()]
    if progress:
        cbs.append(ProgressCallback())
    return cbs
