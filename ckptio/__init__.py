"""ckptio: PyTorch checkpoints at the speed of the disk.

Files are torch.save's own zip format (plain ``torch.load`` reads them),
written by a native engine with O_DIRECT, parallel CRC-32 and an atomic,
fsynced commit, so a checkpoint is either the old one or the new one, never
half of each.
"""

from ._engine import engine_info
from .api import SaveResult, VerifyResult, async_save, load, save, verify, wait, wait_snapshots
from .background import reserve_staging
from .errors import (
    CheckpointIOError,
    CheckpointNotFoundError,
    CkptioError,
    ConfigError,
    CorruptCheckpointError,
    SaveCancelledError,
    StateMismatchError,
    UnsafeCheckpointError,
    UnsupportedTransformError,
)
from .load_into import load_into
from .manager import CheckpointManager
from .plugins import AsyncCheckpointIO, CheckpointIO, FastCheckpointIO, TorchCheckpointIO, XLACheckpointIO
from .preemption import on_preemption
from .save_queue import SaveHandle

__version__ = "0.1.0"

__all__ = [
    "save",
    "async_save",
    "wait",
    "wait_snapshots",
    "reserve_staging",
    "load",
    "load_into",
    "verify",
    "SaveHandle",
    "CheckpointIO",
    "FastCheckpointIO",
    "TorchCheckpointIO",
    "XLACheckpointIO",
    "AsyncCheckpointIO",
    "CheckpointManager",
    "on_preemption",
    "SaveResult",
    "VerifyResult",
    "engine_info",
    "CkptioError",
    "CheckpointIOError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "ConfigError",
    "SaveCancelledError",
    "StateMismatchError",
    "UnsafeCheckpointError",
    "UnsupportedTransformError",
]
