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
import re
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import remote as _remote
from .remote_lane import RemoteCopy, RemoteLane
from .save_queue import SaveHandle

if TYPE_CHECKING:
    from .background import NativeWrite, Staged
    from .results import SaveResult

__all__ = ["RemoteCopy", "RemoteTier", "TieredSaveHandle", "save_with_remote_copy"]

POINTER = "latest"
COPIES_WAITING = 4  # copies queued behind the running one before the oldest is dropped (each holds an open file)


class RemoteTier:
    def __init__(self, prefix: str, on_commit: Optional[Callable[[str, frozenset[str]], object]] = None,
                 max_waiting: int = 1) -> None:
        """`on_commit(name, keep)`: run in the lane after each committed copy
        (e.g. pruning, which must never remove a name in `keep`).
        `max_waiting`: copies queued behind the running one; past that the
        oldest is dropped (1: only the newest checkpoint's copy waits)."""
        prefix = str(prefix).rstrip("/")
        if not (_remote.is_url(prefix) or _remote.is_directory_url(prefix)):
            raise ValueError(f"remote must be an fsspec URL prefix such as 's3://bucket/run' (or a file:// "
                             f"directory: another disk, a shared mount), not {prefix!r}")
        self.prefix = prefix
        from .config import remote_copy_config

        remote_copy_config()  # a bad CKPTIO_REMOTE_* value fails here, not later in the lane where nobody sees it
        self._on_commit = on_commit
        self._max_waiting = max_waiting
        self._lane: Optional[RemoteLane] = None
        self._lane_lock = threading.Lock()

    @property
    def lane(self) -> RemoteLane:
        """The lane this tier's copies and removals run in (made at first use)."""
        with self._lane_lock:
            if self._lane is None:
                self._lane = RemoteLane(self, self._on_commit, self._max_waiting)
            return self._lane

    def __getstate__(self) -> dict[str, Any]:
        # Lightning pickles its plugins (ddp_spawn, some loggers): the lane, its
        # threads and locks belong to this process.
        state = self.__dict__.copy()
        state["_lane"], state["_lane_lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lane_lock=threading.Lock())

    def pending(self) -> list[str]:
        """Remote work not done yet, in words ([] when none)."""
        return [] if self._lane is None else self._lane.pending()

    def wait(self, timeout: Optional[float]) -> list[str]:
        """Wait up to `timeout` s for the lane to settle; returns what is still pending."""
        return [] if self._lane is None else self._lane.wait(timeout)

    def url_for(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def write_pointer(self, name: str) -> None:
        _remote.write_small_file(self.url_for(POINTER), (name + "\n").encode())  # the pointer is old or new

    def names(self, pattern: re.Pattern[str]) -> list[str]:
        """Names under the prefix matching `pattern` (none if the prefix does not exist yet)."""
        fs, path = _remote.fs_for(self.prefix)
        try:
            listed = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in listed]
        return [n for n in names if pattern.match(n)]

    def pointer(self) -> Optional[str]:
        fs, path = _remote.fs_for(self.url_for(POINTER))
        try:
            name = fs.cat_file(path).decode(errors="replace").strip()
        except FileNotFoundError:
            return None
        return name if name and "/" not in name else None

    def remove(self, name: str) -> None:
        fs, path = _remote.fs_for(self.url_for(name))
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


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
    committed file): the local job ends there, whatever the network does."""
    from .background import NativeWrite, stage, write_native

    handle = TieredSaveHandle(path)

    def write(staged: Staged) -> SaveResult:
        result = write_native(staged, path)
        after_durable()
        tier.lane.submit(os.path.basename(path), path, handle._copy_settled)
        return result

    handle._follow(stage(state, path, write, snapshot=snapshot, native=native or NativeWrite()))
    return handle
