"""ckptio: PyTorch checkpoints at the speed of the disk.

Files are torch.save's own zip format (plain ``torch.load`` reads them),
written by a native engine with O_DIRECT, parallel CRC-32 and an atomic,
fsynced commit, so a checkpoint is either the old one or the new one, never
half of each.
"""

import warnings as _warnings

# Without numpy (a base install), torch warns "Failed to initialize NumPy" on
# import; nothing ckptio does needs numpy, so that line is only noise, and on
# every CLI command. torch is imported here first, with that one warning off.
with _warnings.catch_warnings():
    _warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch as _torch  # noqa: F401

from ._engine import engine_info  # noqa: E402 - after torch's quiet import above
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
