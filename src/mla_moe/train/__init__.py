"""Training: optimizer, the pure train step, checkpoints, metrics and the training loop."""

from mla_moe.train.config import ConfigError, run_config, validate
from mla_moe.train.trainer import (
    IncompatibleWorkdirError,
    NonFiniteLossError,
    TrainResult,
    train,
)

__all__ = [
    "ConfigError", "IncompatibleWorkdirError", "NonFiniteLossError", "TrainResult", "run_config",
    "train", "validate",
]
