"""AsyncCheckpointIO: any backend's saves, in the background, through the
one shared queue."""

from __future__ import annotations

import os
from typing import Any, Optional

from ..save_queue import SaveHandle, get_queue
from .checkpoint_io import CheckpointIO, SaveReport, record_save

__all__ = ["AsyncCheckpointIO"]


class AsyncCheckpointIO(CheckpointIO):
    """Wraps a CheckpointIO (default: FastCheckpointIO) so saves return after a snapshot.

    - ``save_checkpoint`` copies the checkpoint's tensors into the staging
      arena and returns; the backend writes in the background. The caller may
      then change or free every tensor.
    - Saves, removes and loads stay in order: ``remove_checkpoint(p)`` and
      ``load_checkpoint(p)`` wait for queued saves of ``p``.
    - A background failure is raised once, with its original type, by the
      next save/remove/load or by ``teardown()``.
    - ``teardown()`` waits for every queued save; the plugin stays usable.
    """

    def __init__(self, checkpoint_io: Optional[CheckpointIO] = None):
        super().__init__()
        if checkpoint_io is None:
            from .fast_io import FastCheckpointIO

            checkpoint_io = FastCheckpointIO()
        if isinstance(checkpoint_io, AsyncCheckpointIO):
            checkpoint_io = checkpoint_io.checkpoint_io
        self.checkpoint_io = checkpoint_io
        self.last_handle: SaveHandle | None = None

    def save_checkpoint(self, checkpoint, path, storage_options: Optional[Any] = None) -> SaveHandle:
        handle = self.checkpoint_io._async_save(checkpoint, os.fspath(path), storage_options)
        handle.add_done_callback(_report)
        self.last_handle = handle
        return handle

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        return self.checkpoint_io.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path) -> None:
        self.checkpoint_io.remove_checkpoint(path)

    def wait(self) -> None:
        """Block until every queued save is durable; raise a pending failure."""
        get_queue().wait_all()

    def teardown(self) -> None:
        """Wait for queued saves (showing progress if that takes a while),
        raise a pending failure, and tear down the wrapped plugin."""
        _drain_with_progress()
        self.checkpoint_io.teardown()


def _report(handle: SaveHandle) -> None:
    if handle._exception is None and handle._result is not None:
        r = handle._result
        record_save(SaveReport(handle.path, handle.stall_seconds, r.write_seconds, r.bytes))


def _drain_with_progress(interval: float = 2.0) -> None:
    import sys
    import time

    queue = get_queue()
    start = time.monotonic()
    while not queue.wait_all_for(interval):
        print(f"ckptio: waiting for {queue.pending()} checkpoint save(s) to become durable "
              f"({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
    queue.raise_pending_error()
