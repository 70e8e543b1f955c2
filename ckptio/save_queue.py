"""The one background queue every async save goes through, whatever its backend.

- FIFO: one worker writes jobs in submission order, so the last save to a
  path is the one that lands. The worker thread exists only while there is
  work: it ends when the queue is empty and the next submit starts another.
- Bounded: at most CKPTIO_MAX_PENDING saves are queued or writing; the next
  submit waits (the staging arena bounds memory the same way).
- Every wait (and reserve) first waits for pending lazy snapshot copies
  (ckptio.lazy_snapshot): a ckptio call is one of their barriers.
- A remove or load of a path waits for the queued saves of that path.
  Called from the worker itself (a plugin's save_checkpoint running as a
  job), waits return at once: everything queued earlier has landed.
- A failed save's exception is kept with its original type and raised once:
  by its handle (result/exception), or else by the next submit or wait_path
  made from the thread that submitted it, or by wait_all / teardown. Then it
  is cleared. (So in a program saving from several threads, one thread's
  failure never surfaces in another thread's unrelated call.)
- Pending work drains at interpreter exit, so the last checkpoint is not lost.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import TYPE_CHECKING

from .lazy_snapshot import wait_snapshots

if TYPE_CHECKING:
    from .lazy_snapshot import LazyCopy
    from .results import SaveResult

__all__ = ["SaveHandle", "SaveQueue", "get_queue"]


class SaveHandle:
    """A Future-like handle on one async save.

    ``stall_seconds`` is how long async_save blocked the caller; after the
    save completes, ``result()`` returns the SaveResult (write_seconds, bytes,
    direct_io) or raises the save's exception.
    """

    def __init__(self, path: str, mode: str, lazy_copy: LazyCopy | None = None) -> None:
        self.path = path
        self.mode = mode  # "staged" or "streaming"
        self._lazy_copy = lazy_copy  # ckptio.lazy_snapshot.LazyCopy still copying, or None
        self.stall_seconds = 0.0
        self._done = threading.Event()
        self._result: SaveResult | None = None
        self._exception: BaseException | None = None
        self._observed = False  # the exception reached the user
        self._owner = threading.get_ident()  # the submitting thread
        self._queue: SaveQueue | None = None
        self._callbacks: list[Callable[[SaveHandle], object]] = []
        self._callbacks_lock = threading.Lock()

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def snapshot(self) -> str:
        """"lazy" if part of the snapshot was left to a background copy, else "eager"."""
        return "lazy" if self._lazy_copy is not None else "eager"

    def wait_snapshot(self, timeout: float | None = None) -> bool:
        """Block until this save's snapshot is complete (at once for an eager
        one); True if it is. After that the caller may change any tensor it
        saved, whatever the write is doing. A failed copy is raised by
        result(), not here."""
        return self._lazy_copy is None or self._lazy_copy.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the save completes or `timeout` seconds pass; True if done.
        Raises the save's exception, like result()."""
        if not self._done.wait(timeout):
            return False
        self.result()
        return True

    def result(self, timeout: float | None = None) -> SaveResult | None:
        if not self._done.wait(timeout):
            raise FutureTimeoutError(f"save to {self.path} still running after {timeout} s")
        if self._exception is not None:
            self._observed = True
            raise self._exception
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._done.wait(timeout):
            raise FutureTimeoutError(f"save to {self.path} still running after {timeout} s")
        self._observed = True
        return self._exception

    # Convenience views of the result (None until done).
    @property
    def write_seconds(self) -> float | None:
        return None if self._result is None else self._result.write_seconds

    @property
    def bytes(self) -> int | None:
        return None if self._result is None else self._result.bytes

    @property
    def direct_io(self) -> bool | None:
        return None if self._result is None else self._result.direct_io

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<SaveHandle {self.path!r} {self.mode} {state} stall={self.stall_seconds * 1e3:.1f} ms>"

    def add_done_callback(self, fn: Callable[[SaveHandle], object]) -> None:
        """Call fn(handle) when the save completes (at once if it has)."""
        with self._callbacks_lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _finish(self, result: SaveResult | None = None, exception: BaseException | None = None) -> None:
        self._result, self._exception = result, exception
        with self._callbacks_lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a reporting hook must not break the queue
                pass


_Write = Callable[[], "SaveResult | None"]  # a job's write: runs on the worker


class _Job:
    def __init__(self, handle: SaveHandle, write: _Write, cleanup: Callable[[], object] | None) -> None:
        self.handle = handle
        self.write = write      # runs on the worker; returns a SaveResult
        self.cleanup = cleanup  # always runs after write (frees the staging slot)


class SaveQueue:
    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._running: _Job | None = None
        self._finished: deque[SaveHandle] = deque()  # failed, not yet reported
        self._worker: threading.Thread | None = None
        self._last_worker: threading.Thread | None = None  # the one that went idle last
        self._worker_pid: int | None = None

    # --- submitting -------------------------------------------------------

    def reserve(self) -> None:
        """Wait for lazy snapshot copies, then until fewer than max_pending
        saves are queued or writing. Raises this thread's pending background
        error first."""
        wait_snapshots()
        self.raise_pending_error(mine_only=True)
        if self._on_worker():
            return  # the running job itself counts: waiting would never end
        with self._cond:
            while self._pending_locked() >= self.max_pending:
                self._cond.wait()

    def submit(self, handle: SaveHandle, write: _Write, cleanup: Callable[[], object] | None = None) -> SaveHandle:
        handle._queue = self
        with self._cond:
            self._ensure_worker_locked()
            self._jobs.append(_Job(handle, write, cleanup))
            self._cond.notify_all()
        return handle

    def pending(self) -> int:
        with self._cond:
            return self._pending_locked()

    # --- waiting ----------------------------------------------------------

    def wait_path(self, path: str) -> None:
        """Wait for lazy snapshot copies and for every queued or running save
        of `path`, then raise this thread's pending background error."""
        wait_snapshots()
        if self._on_worker():
            return  # a plugin saving from the worker: earlier saves of `path` have landed (FIFO)
        key = _key(path)
        with self._cond:
            while any(_key(j.handle.path) == key for j in self._all_locked()):
                self._cond.wait()
        self.raise_pending_error(mine_only=True)

    def wait_all_for(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the queue to empty; True if it did."""
        if self._on_worker():
            return True
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending_locked(), timeout)

    def wait_all(self, *, raise_errors: bool = True) -> None:
        wait_snapshots()
        with self._cond:
            while self._pending_locked() and not self._on_worker():
                self._cond.wait()
        if raise_errors:
            self.raise_pending_error()

    def join_idle_worker(self, timeout: float = 5.0) -> None:
        """After wait_all: wait until the worker thread has ended (it ends as
        soon as the queue is empty), so that teardown leaves no thread."""
        if self._on_worker():
            return
        with self._cond:
            if self._pending_locked():
                return  # more work arrived meanwhile: the worker goes on
            worker = self._last_worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    def raise_pending_error(self, *, mine_only: bool = False) -> None:
        """Raise the oldest background failure nobody has seen yet (once);
        with mine_only, only one submitted from the calling thread."""
        me = threading.get_ident()
        with self._cond:
            for handle in list(self._finished):
                if handle._observed:
                    self._finished.remove(handle)
                elif not mine_only or handle._owner == me:
                    self._finished.remove(handle)
                    handle._observed = True
                    assert handle._exception is not None  # only failed saves are kept
                    raise handle._exception

    # --- the worker ---------------------------------------------------------

    def _on_worker(self) -> bool:
        """True on the queue's own thread, where a job runs a plugin's
        save_checkpoint (AsyncCheckpointIO over a user's plugin); a wait for
        the queue from there would wait for itself."""
        return threading.current_thread() is self._worker

    def _pending_locked(self) -> int:
        return len(self._jobs) + (self._running is not None)

    def _all_locked(self) -> list[_Job]:
        return list(self._jobs) + ([self._running] if self._running is not None else [])

    def _ensure_worker_locked(self) -> None:
        # A forked child inherits the queue object but not its thread.
        if self._worker is None or self._worker_pid != os.getpid() or not self._worker.is_alive():
            self._worker_pid = os.getpid()
            self._worker = threading.Thread(target=self._work, name="ckptio-save-queue", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._jobs:
                    # Idle: the worker ends, and the next submit starts a new
                    # one. No thread of ckptio's outlives the saves it had to
                    # do (Lightning's test suite fails any test that leaves
                    # a thread behind after teardown; so would a user's).
                    self._worker = None
                    self._last_worker = threading.current_thread()
                    return
                job = self._running = self._jobs.popleft()
            result: SaveResult | None = None
            exception: BaseException | None = None
            try:
                result = job.write()
            except BaseException as e:  # kept with its type, re-raised to the user
                exception = e
            finally:
                if job.cleanup is not None:
                    try:
                        job.cleanup()
                    except BaseException as e:
                        exception = exception or e
            job.handle._finish(result, exception)
            with self._cond:
                self._running = None
                if exception is not None:
                    self._finished.append(job.handle)
                self._cond.notify_all()


def _key(path: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(path)) if "://" not in os.fspath(path) else os.fspath(path)


_queue: SaveQueue | None = None
_queue_lock = threading.Lock()


def get_queue() -> SaveQueue:
    global _queue
    with _queue_lock:
        if _queue is None:
            from .config import staging_config

            _queue = SaveQueue(staging_config().max_pending)
        return _queue


def _drain_at_exit() -> None:
    """Interpreter exit: finish every queued save so the last one is not lost."""
    q = _queue
    if q is None or q._worker_pid != os.getpid():
        return
    start = time.monotonic()
    announced = False
    while q.pending():
        if not announced and time.monotonic() - start > 1.0:
            print(f"ckptio: finishing {q.pending()} checkpoint save(s) before exit ...", file=sys.stderr)
            announced = True
        with q._cond:
            q._cond.wait(0.5)
    for handle in list(q._finished):
        if not handle._observed:
            print(f"ckptio: background save to {handle.path} failed: {handle._exception!r}", file=sys.stderr)


atexit.register(_drain_at_exit)


def _reset_after_fork() -> None:
    global _queue, _queue_lock
    _queue_lock = threading.Lock()
    _queue = None  # the parent's jobs are the parent's to finish


os.register_at_fork(after_in_child=_reset_after_fork)
