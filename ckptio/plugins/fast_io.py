"""FastCheckpointIO: the native engine (O_DIRECT, parallel CRC-32, durable commit)."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any, Callable, Optional

from .. import api, remote
from .._paths import make_parent_directories, normalize_path
from ..background import NativeWrite, stage, streaming_native_save, write_native
from ..load_into import load_into
from ..save_queue import get_queue
from .checkpoint_io import _PATH, CheckpointIO, SaveReport, _reject_storage_options, _to_cpu, record_save
from .registration import stands_for

if TYPE_CHECKING:
    from ..save_queue import SaveHandle

__all__ = ["FastCheckpointIO"]


# A TorchCheckpointIO is "the plugin that writes torch.save files"; this one
# writes the same files, so checks that a plugin is one (Lightning's test that
# a nested AsyncCheckpointIO got a TorchCheckpointIO base) hold for it, with
# Lightning's class (registered below) and with ckptio's (in ckptio.plugins).
@stands_for("TorchCheckpointIO")
class FastCheckpointIO(CheckpointIO):
    """Checkpoints in torch.save's format, written by ckptio's engine.

    Every save is durable when it returns; loads verify CRC-32s (unless
    ``verify=False`` or CKPTIO_VERIFY=0) and map to CPU by default, as
    Lightning's TorchCheckpointIO does. fsspec URLs (s3://, gs://, ...)
    are streamed in parts from the records' memory (see ckptio.remote).
    """

    def __init__(self, *, verify: Optional[bool] = None) -> None:
        super().__init__()
        self.verify = verify
        # Set by ckptio.lightning.ResumeInPlace: returns the tensors a load
        # may read straight into (e.g. {"state_dict": module.state_dict()}).
        self.load_target: Optional[Callable[[], Any]] = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        _reject_storage_options(self, storage_options)
        path = normalize_path(path)
        get_queue().wait_path(path)  # an async save of this path queued earlier lands first
        make_parent_directories(path)
        result = api.save(checkpoint, path)
        record_save(SaveReport(path, result.write_seconds, result.write_seconds, result.bytes))

    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = normalize_path(path)
        get_queue().wait_path(path)
        map_location = map_location if map_location is not None else _to_cpu
        target = self.load_target() if self.load_target is not None else None
        if target is not None:
            # What pairs with the target lands in it; the rest (optimizer
            # states, loops, callbacks) as ckptio.load returns it.
            return load_into(target, path, strict=False, map_location=map_location, weights_only=weights_only,
                             verify=self.verify)
        return api.load(path, map_location=map_location, weights_only=weights_only, verify=self.verify)

    def __getstate__(self) -> dict[str, Any]:
        # Lightning pickles the Trainer (ddp_spawn): the target belongs to
        # this process's module (ResumeInPlace sets it again in setup).
        state = self.__dict__.copy()
        state["load_target"] = None
        return state

    def remove_checkpoint(self, path: _PATH) -> None:
        path = normalize_path(path)
        get_queue().wait_path(path)
        _remove(path)

    def _async_save(self, checkpoint: dict[str, Any], path: str, storage_options: Optional[Any],
                    snapshot: Optional[str] = None, native: Optional[NativeWrite] = None) -> SaveHandle:
        _reject_storage_options(self, storage_options)
        path = normalize_path(path)
        if remote.is_url(path):
            return stage(checkpoint, path, lambda staged: remote.save_records_to_url(staged.records(), path),
                         local=False, snapshot=snapshot)
        make_parent_directories(path)
        return stage(checkpoint, path, lambda staged: write_native(staged, path), stream=streaming_native_save,
                     snapshot=snapshot, native=native or NativeWrite())


def _remove(path: str) -> None:
    """Remove a file or directory tree; a missing path is not an error (as Lightning's)."""
    import shutil

    if remote.is_url(path):
        fs, p = remote.fs_for(path)
        if fs.exists(p):
            fs.rm(p, recursive=True)
        return

    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        from ..errors import CheckpointIOError

        raise CheckpointIOError(e.errno or errno.EIO, f"could not remove checkpoint: {e.strerror}", path) from e
