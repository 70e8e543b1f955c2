"""CheckpointIO plugins with Lightning's interface."""

from .async_io import AsyncCheckpointIO
from .checkpoint_io import CheckpointIO
from .fast_io import FastCheckpointIO
from .torch_io import TorchCheckpointIO
from .xla_io import XLACheckpointIO

# The engine writes and reads torch.save files: a FastCheckpointIO is a TorchCheckpointIO to whoever asks.
TorchCheckpointIO.register(FastCheckpointIO)

__all__ = ["CheckpointIO", "FastCheckpointIO", "TorchCheckpointIO", "XLACheckpointIO", "AsyncCheckpointIO"]
