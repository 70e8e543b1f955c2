"""The remote tier: copies of local checkpoints in object storage.

Local saves are fast and durable but die with their node; an fsspec URL
prefix (s3://bucket/run) survives it. A checkpoint is copied there after it
is durable locally, from the committed local file, in the tier's own lane
(ckptio.remote_lane): a slow or hung object store never delays a local save,
a load, or the caller. Copies commit in order: the object completes (S3
makes an upload visible whole, at once), then the prefix's ``latest``
pointer names it, never before. A failed copy never fails the local save:
it is reported (a RuntimeWarning, and ``RemoteCopy.error`` in the save's
result) and the next copy tries again.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from .remote_lane import CopySkipped, RemoteCopy, _warn
from .remote_tier import RemoteTier
from .save_queue import SaveHandle

if TYPE_CHECKING:
    from .background import NativeWrite, Staged
    from .results import SaveResult

__all__ = ["RemoteCopy", "RemoteTier", "TieredSaveHandle", "save_with_remote_copy"]

COPIES_WAITING = 4  # copies queued behind the running one before the oldest is dropped (each holds an open file)


class TieredSaveHandle(SaveHandle):
    """The handle of a save with a remote copy. It completes once the copy
    has settled too (committed, failed, timed out, or replaced by a newer
    one); its result's ``remote`` says which. ``local`` is the save's own
    handle on the save queue, complete once the file is durable: loads and
    removes of the file wait for that alone, never for the network."""

    def __init__(self, path: str) -> None:
        super().__init__(path, "staged")
        self.local: Optional[SaveHandle] = None
        self._lock = threading.Lock()
        self._copy: Optional[RemoteCopy] = None
        self._copied = False

    def _follow(self, local: SaveHandle) -> None:
        self.local, self.mode, self._lazy_copy = local, local.mode, local._lazy_copy
        self.stall_seconds, self._owner = local.stall_seconds, local._owner
        local.add_done_callback(self._maybe_finish)

    def _copy_settled(self, copy: RemoteCopy) -> None:
        with self._lock:
            self._copy, self._copied = copy, True
        if self.local is not None and self.local.done():
            self._maybe_finish(self.local)

    def _maybe_finish(self, local: SaveHandle) -> None:
        with self._lock:
            if self._done.is_set() or not (local._exception is not None or self._copied):
                return  # the copy is still running: finish when it settles
            result, exception = local._result, local._exception
            if exception is None and result is not None:
                result = dataclasses.replace(result, remote=self._copy)
            self._finish(result, exception)

    # The local save's failure is this handle's: seen here, the queue must not raise it again.
    def result(self, timeout: Optional[float] = None) -> Optional[SaveResult]:
        try:
            return super().result(timeout)
        finally:
            self._mark_seen()

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        try:
            return super().exception(timeout)
        finally:
            self._mark_seen()

    def _mark_seen(self) -> None:
        if self.local is not None and self._observed:
            self.local._observed = True


def save_with_remote_copy(tier: RemoteTier, state: Any, path: str, snapshot: Optional[str],
                          after_durable: Callable[[], object] = lambda: None,
                          native: Optional[NativeWrite] = None) -> TieredSaveHandle:
    """Stage `state`; on the save queue write it to `path` durably, run
    after_durable(), then queue its copy in the tier's lane (which reads the
    committed file): the local job ends there, whatever the network does.
    Where the checkpoint service writes the file, it makes the copy too, in
    a lane of its own there: the trainer's death does not cut it short."""
    from .background import NativeWrite, stage, write_native

    handle = TieredSaveHandle(path)
    name = os.path.basename(path)
    native = native or NativeWrite()
    spec = tier.service_spec()
    if spec is not None:
        native.remote = dict(spec, name=name)

    def write(staged: Staged) -> SaveResult:
        result = write_native(staged, path)
        after_durable()
        if staged.handover is not None and staged.handover.copying_remotely:
            staged.handover.follow_remote(_service_copy_follower(tier, name, path, handle))
        else:
            tier.lane.submit(name, path, handle._copy_settled)
        return result

    handle._follow(stage(state, path, write, snapshot=snapshot, native=native))
    return handle


def _service_copy_follower(tier: RemoteTier, name: str, path: str,
                           handle: TieredSaveHandle) -> Callable[[Optional[dict[str, Any]]], None]:
    """What hears how the service's copy of `name` went: the save's handle
    settles with it; if the service went away first, the copy is made here."""
    settled = tier.copying_elsewhere(name)

    def follow(reply: Optional[dict[str, Any]]) -> None:
        settled()
        if reply is None:
            tier.lane.submit(name, path, handle._copy_settled)
            return
        url = str(reply.get("url", tier.url_for(name)))
        error: Optional[BaseException] = None
        if reply.get("error"):
            text = f"the checkpoint service's copy failed: {reply['error']}"
            error = CopySkipped(text) if reply.get("skipped") else RuntimeError(text)
            if not reply.get("skipped"):
                _warn(f"ckptio: copying {name} to {url} failed ({text}); the local checkpoint is durable and the "
                      "next remote copy tries again")
        else:
            tier.committed_elsewhere(name)
        handle._copy_settled(RemoteCopy(url, float(reply.get("seconds", 0.0)), error))
    return follow
