"""CheckpointIO plugins with Lightning's interface."""

from .async_io import AsyncCheckpointIO
from .checkpoint_io import CheckpointIO
from .fast_io import FastCheckpointIO
from .torch_io import TorchCheckpointIO
from .xla_io import XLACheckpointIO

__all__ = ["CheckpointIO", "FastCheckpointIO", "TorchCheckpointIO", "XLACheckpointIO", "AsyncCheckpointIO"]
