"""deepscope: train a neural network while looking inside it."""
__version__ = "0.1.0"

from .callback import (
    EVENTS, Callback, CallbackError, CancelBatchException, CancelEpochException, CancelFitException,
    CancelTrainException, CancelValidateException,
)
from .callbacks import (
    Checkpoint, Compile, CosineSchedule, DeviceCallback, Distributed, EarlyStopping, GradClip, LimitBatches,
    MetricsCallback, MixedPrecision, OneCycle, ParamScheduler, ProgressCallback, Recorder, SaveBest, SingleBatch,
    default_callbacks,
)
from .checkpoint import load_checkpoint, save_checkpoint
from .cpu_memory import keep_freed_memory
from .data import DataLoaders, TensorBatches, image_dls
from .diagnose import Diagnose, Finding, diagnose
from .export import export_model, export_run
from .hooks import Hook, Hooks, select_modules
from .learner import Learner, TrainStep
from .lr_find import LRFindResult, lr_find
from .models import cnn, get_model, resnet
from .seed import set_seed
from .stats import ActivationStats, Stats, StatsRecorder, load_stats
from .watch import Watch, watch

__all__ = [
    "EVENTS", "Callback", "CallbackError", "CancelBatchException", "CancelEpochException", "CancelFitException",
    "CancelTrainException", "CancelValidateException", "DeviceCallback", "LimitBatches", "MetricsCallback",
    "OneCycle", "ParamScheduler", "ProgressCallback", "Recorder", "SingleBatch", "default_callbacks",
    "DataLoaders", "TensorBatches", "image_dls", "Learner", "TrainStep", "cnn", "get_model", "resnet", "set_seed",
    "diagnose", "Diagnose", "Finding", "Hook", "Hooks", "select_modules", "LRFindResult", "lr_find",
    "ActivationStats", "Stats", "StatsRecorder", "load_stats", "watch", "Watch", "keep_freed_memory", "CosineSchedule", "EarlyStopping", "GradClip", "MixedPrecision", "SaveBest",
    "Checkpoint", "load_checkpoint", "save_checkpoint", "export_model", "export_run", "Compile", "Distributed",
]
