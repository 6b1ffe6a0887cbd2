"""Moved to :mod:`hypermerge.runtime.model` (the runtime runs without torch); kept for old imports."""

from hypermerge.runtime.model import (
    MODEL_FILE,
    OnnxModel,
    Runner,
    StreamStep,
    decode,
    decode_steps,
    mean_pool,
    positions,
)

__all__ = ["MODEL_FILE", "OnnxModel", "Runner", "StreamStep", "decode", "decode_steps", "mean_pool", "positions"]
