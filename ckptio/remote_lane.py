"""The remote lane: copies to a remote tier on threads of their own.

An object store that hangs (accepts the connection, never answers) is the
common way a remote fails, so remote copies never ride the local save
queue, and nothing local ever waits for them:

- Local first: a copy is queued once its checkpoint is durable locally and
  reads that committed file (opened when queued, so local pruning cannot
  take it away). It holds no staging slot, so snapshots never wait for it,
  and memory stays at an upload part.
- Bounded: one copy runs, at most `max_waiting` wait (a few: each holds its
  file open). When the remote falls behind further, a newer checkpoint's copy
  replaces the oldest waiting one (the tier catches up to the newest, not
  through every step); the first replacement of an episode is warned about,
  once.
- Timed: each request has the library's own timeout (CKPTIO_REMOTE_TIMEOUT_S,
  see remote.fs_for) and each copy a deadline (CKPTIO_REMOTE_COPY_TIMEOUT_S)
  that holds even when a request hangs in a way the library never times
  out: the copy runs in a worker thread that is abandoned at the deadline
  (its upload aborts at the next part, and it never moves ``latest``) and
  the copy is reported failed. At most MAX_ABANDONED such workers are left
  at once; past that the lane waits for one to end before it starts more.
- In order: the object is whole before ``latest`` names it. A pointer PUT
  already sent when its copy was abandoned may still land later, so every
  name such a write carries is never pruned, and the lane writes the
  pointer again once that worker has ended.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 - see the exit hook at the end
import io
import os
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Optional, Protocol, TypeVar

from .config import remote_copy_config
from .remote import UploadCancelled, upload_file

__all__ = ["CopySkipped", "RemoteCopy", "RemoteLane", "call_with_deadline"]

MAX_ABANDONED = 4  # workers past their deadline still running: each may hold a request, a thread, a file

_T = TypeVar("_T")


@dataclass(frozen=True)
class RemoteCopy:
    """How a checkpoint's remote copy went: committed after `seconds`, or
    `error` (a CopySkipped when a newer copy took its place), or still
    `pending` in the lane (a synchronous save reports before its copy
    settles: see CheckpointManager.save)."""
    url: str
    seconds: float
    error: Optional[BaseException] = None
    pending: bool = False

    @property
    def committed(self) -> bool:
        return self.error is None and not self.pending


class Tier(Protocol):
    """What the lane needs of a remote tier (ckptio.tiers.RemoteTier)."""
    prefix: str

    def url_for(self, name: str) -> str: ...

    def write_pointer(self, name: str) -> None: ...

    def remove(self, name: str) -> None: ...


class CopySkipped(Exception):
    """A waiting copy that never ran: a newer checkpoint's copy took its
    place (the remote fell behind), or its checkpoint was removed."""


class _Attempt:
    """One piece of remote work in a worker thread, and whether it was given up on."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cancelled = threading.Event()  # set at the deadline: stop at the next step
        self.moving_pointer = False  # past its last check: a pointer PUT may be on the wire


class _Copy:
    def __init__(self, name: str, source: BinaryIO, done: Callable[[RemoteCopy], object]) -> None:
        self.name, self.source, self.done = name, source, done
        self.queued = time.monotonic()
        self.started: Optional[float] = None


class RemoteLane:
    def __init__(self, tier: Tier, on_commit: Optional[Callable[[str, frozenset[str]], object]] = None,
                 max_waiting: int = 1) -> None:
        """`on_commit(name, keep)` runs in the lane (within the copy deadline)
        after a copy is committed: e.g. prune the tier, never removing `keep`.
        `max_waiting`: copies queued behind the running one before the oldest
        is dropped."""
        self.tier = tier
        self._on_commit = on_commit
        self.max_waiting = max_waiting
        self._init_state()
        _lanes.add(self)

    def _init_state(self) -> None:
        self._cond = threading.Condition()
        self._waiting: deque[_Copy] = deque()
        self._running: Optional[_Copy] = None
        self._removals: deque[str] = deque()
        self._thread: Optional[threading.Thread] = None
        self._abandoned: dict[threading.Thread, _Attempt] = {}
        self._pointer_names: set[str] = set()  # names a late pointer PUT may still set: never pruned
        self._repoint = False  # such a PUT has ended: write the pointer again
        self._committed: Optional[str] = None  # what this lane last pointed `latest` at
        self._behind = False  # this episode of falling behind was reported
        self._stuck_reported = False  # the lane waited for hung workers (reported once per lane)

    # --- what the local lane calls (never blocks on the network) --------------

    def submit(self, name: str, path: str, done: Callable[[RemoteCopy], object]) -> None:
        """Queue a copy of the durable local file `path` as `name`; done(RemoteCopy) when it settles.
        Never raises: a copy that cannot even start fails as a copy, not the local save."""
        try:
            source = open(path, "rb")  # now: pruning may unlink the file before the copy runs
        except OSError as e:
            _warn(f"ckptio: cannot read {path} to copy it to {self.tier.url_for(name)} ({e}); the next remote "
                  "copy tries again")
            _settle(_Copy(name, io.BytesIO(), done), RemoteCopy(self.tier.url_for(name), 0.0, e))
            return
        copy = _Copy(name, source, done)
        with self._cond:
            self._waiting.append(copy)
            replaced = self._waiting.popleft() if len(self._waiting) > self.max_waiting else None
            report = replaced is not None and not self._behind
            self._behind = self._behind or replaced is not None
            running = self._running
            self._ensure_thread_locked()
        if replaced is not None:
            self._skip(replaced, f"superseded by {name}: the remote tier fell behind, and only the newest "
                                 f"{self.max_waiting} copies wait")
        if report:
            busy = f"the copy of {running.name} still running" if running is not None else "earlier copies unsettled"
            _warn(f"ckptio: the remote tier {self.tier.prefix} is falling behind ({busy}); the oldest waiting "
                  "copies are dropped for the newest checkpoints' until it catches up (reported once per episode)")

    def remove(self, name: str) -> None:
        """Remove `name` from the remote tier, in the lane, after the copy
        now running; a waiting copy of it is dropped."""
        with self._cond:
            dropped = [c for c in self._waiting if c.name == name]
            self._waiting = deque(c for c in self._waiting if c.name != name)
            self._removals.append(name)
            self._ensure_thread_locked()
        for copy in dropped:
            self._skip(copy, f"{name} was removed before its copy started")

    def pending(self) -> list[str]:
        """The remote work not done yet, in words."""
        with self._cond:
            return self._pending_locked()

    def wait(self, timeout: Optional[float]) -> list[str]:
        """Wait up to `timeout` s (None: as long as it takes) for the lane to
        settle; returns what is still pending ([] when nothing is)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._pending_locked(), timeout)
            return self._pending_locked()

    # --- the lane's thread ------------------------------------------------------

    def _pending_locked(self) -> list[str]:
        now = time.monotonic()
        out = []
        if self._running is not None:
            out.append(f"copy of {self._running.name} to {self.tier.prefix} (running "
                       f"{now - (self._running.started or now):.0f} s)")
        out += [f"copy of {c.name} to {self.tier.prefix} (waiting {now - c.queued:.0f} s)" for c in self._waiting]
        out += [f"removal of {name} from {self.tier.prefix}" for name in self._removals]
        if self._repoint:
            out.append(f"rewriting {self.tier.prefix}/latest")
        return out

    def _ensure_thread_locked(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="ckptio-remote-lane", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                removal, copy, repoint = None, None, None
                busy = self._removals or self._waiting or (self._repoint and self._committed is not None)
                if busy and len(self._abandoned) >= MAX_ABANDONED:
                    self._report_stuck_locked()
                    self._cond.wait(1.0)  # a hung worker ends (or gives up) first: threads and files stay bounded
                    continue
                if self._removals:
                    removal = self._removals[0]
                elif self._waiting:
                    copy = self._waiting.popleft()
                    copy.started = time.monotonic()
                    self._running = copy
                elif self._repoint and self._committed is not None:
                    repoint = self._committed
                else:
                    # Idle: the thread ends (the next submit starts another), and a
                    # later slowdown is a new episode, reported again.
                    self._thread, self._behind, self._repoint = None, False, False
                    self._cond.notify_all()
                    return
            if removal is not None:
                self._remove(removal)
            elif copy is not None:
                self._copy(copy)
            elif repoint is not None:
                self._write_pointer_again(repoint)
            with self._cond:
                if removal is not None:
                    self._removals.popleft()
                self._running = None
                self._cond.notify_all()

    def _copy(self, copy: _Copy) -> None:
        url = self.tier.url_for(copy.name)
        start = time.perf_counter()

        def upload_then_point(attempt: _Attempt) -> None:
            try:
                upload_file(copy.source, url, attempt.cancelled.is_set)
            finally:
                copy.source.close()
            with self._cond:  # atomically with the deadline's check: a late pointer PUT is always known
                if attempt.cancelled.is_set():
                    raise UploadCancelled(f"upload to {url} cancelled")
                attempt.moving_pointer = True
            self.tier.write_pointer(copy.name)  # one PUT: the pointer is old or new

        try:
            timeout = remote_copy_config().copy_timeout_s
            self._within(timeout, f"copying {copy.name} to {url}", copy.name, upload_then_point)
            with self._cond:
                self._committed = copy.name
                keep = frozenset(self._pointer_names | {copy.name})
        except Exception as e:  # noqa: BLE001 - the local checkpoint stands; the error is the caller's to see
            _warn(f"ckptio: copying {copy.name} to {url} failed ({type(e).__name__}: {e}); the local "
                  "checkpoint is durable and the next remote copy tries again")
            copy.source.close()  # if the worker never got to it
            _settle(copy, RemoteCopy(url, time.perf_counter() - start, e))
            return
        result = RemoteCopy(url, time.perf_counter() - start)
        if self._on_commit is not None:
            try:
                self._within(timeout, f"pruning {self.tier.prefix}", copy.name,
                             lambda _attempt: self._on_commit(copy.name, keep) if self._on_commit else None)
            except Exception as e:  # noqa: BLE001 - both copies stand; pruning tries again next time
                _warn(f"ckptio: pruning {self.tier.prefix} failed ({type(e).__name__}: {e})")
        _settle(copy, result)

    def _remove(self, name: str) -> None:
        try:
            self._within(remote_copy_config().copy_timeout_s, f"removing {self.tier.url_for(name)}", name,
                         lambda _attempt: self.tier.remove(name))
        except Exception as e:  # noqa: BLE001 - an extra remote copy harms nothing
            _warn(f"ckptio: removing {self.tier.url_for(name)} failed ({type(e).__name__}: {e})")

    def _write_pointer_again(self, name: str) -> None:
        """A pointer PUT from an abandoned copy has ended (it may have landed
        after newer ones): name the newest committed copy again."""
        with self._cond:
            self._repoint = False

        def point(attempt: _Attempt) -> None:
            with self._cond:
                attempt.moving_pointer = True
            self.tier.write_pointer(name)

        try:
            self._within(remote_copy_config().copy_timeout_s, f"rewriting {self.tier.prefix}/latest", name, point)
        except Exception as e:  # noqa: BLE001 - the next commit writes it anyway
            _warn(f"ckptio: rewriting {self.tier.prefix}/latest failed ({type(e).__name__}: {e})")

    def _within(self, seconds: float, what: str, name: str, work: Callable[[_Attempt], _T]) -> _T:
        """work(attempt) in a worker thread; its result, its exception, or
        TimeoutError after `seconds` (the worker is then abandoned)."""
        attempt = _Attempt(name)
        outcome: list[Any] = []

        def run() -> None:
            try:
                outcome.append((True, work(attempt)))
            except BaseException as e:  # noqa: BLE001 - handed to the lane, or dropped once abandoned
                outcome.append((False, e))
            finally:
                self._worker_ended(attempt)

        worker = threading.Thread(target=run, name="ckptio-remote-worker", daemon=True)
        worker.start()
        worker.join(seconds)
        with self._cond:  # the worker reports its end under this lock too: one decision
            abandon = not outcome
            if abandon:
                attempt.cancelled.set()
                self._abandoned[worker] = attempt
                if attempt.moving_pointer:
                    self._pointer_names.add(name)
        if abandon:
            raise TimeoutError(f"{what} took longer than CKPTIO_REMOTE_COPY_TIMEOUT_S={seconds:g} s; abandoned "
                               "(its upload is aborted and it never moves the remote 'latest')")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def _worker_ended(self, attempt: _Attempt) -> None:
        with self._cond:
            if self._abandoned.pop(threading.current_thread(), None) is not None and attempt.moving_pointer:
                self._pointer_names.add(attempt.name)
                self._repoint = True
                self._ensure_thread_locked()
            self._cond.notify_all()

    def _report_stuck_locked(self) -> None:
        if not self._stuck_reported:
            self._stuck_reported = True
            _warn(f"ckptio: {len(self._abandoned)} requests to {self.tier.prefix} are still hung past their "
                  "deadline; remote copies wait for one to end (set a request timeout in your filesystem's "
                  "config if it has none)")

    def _skip(self, copy: _Copy, why: str) -> None:
        copy.source.close()
        _settle(copy, RemoteCopy(self.tier.url_for(copy.name), 0.0, CopySkipped(why)))


def call_with_deadline(seconds: float, what: str, fn: Callable[[], _T]) -> _T:
    """fn() in a thread of its own: its result or exception, or TimeoutError
    after `seconds` (the thread is left to end on its own). For the rare
    reads of a remote tier outside the lane (listing it to resume)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the caller, or dropped after its deadline
            outcome.append((False, e))

    worker = threading.Thread(target=run, name="ckptio-remote-read", daemon=True)
    worker.start()
    worker.join(seconds)
    if not outcome:
        raise TimeoutError(f"{what} took longer than {seconds:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _warn(message: str) -> None:
    """A RuntimeWarning from the lane (or from a local save queueing a copy):
    a filter that turns warnings into errors must not stop either."""
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    except Exception:  # noqa: BLE001 - said on stderr instead
        print(message, file=sys.stderr, flush=True)


def _settle(copy: _Copy, result: RemoteCopy) -> None:
    try:
        copy.done(result)
    except Exception:  # noqa: BLE001 - a reporting hook must not stop the lane
        pass


_lanes: weakref.WeakSet[RemoteLane] = weakref.WeakSet()


def _finish_at_exit() -> None:
    """Interpreter exit: let remote copies settle, for no longer than one
    copy's deadline (a hung remote must not hang the exit)."""
    save_queue = sys.modules.get(f"{__package__}.save_queue")  # not imported: no local saves (the service has none)
    local = save_queue._queue if save_queue is not None else None
    if local is not None and local._worker_pid == os.getpid():
        local.wait_all(raise_errors=False)  # its saves queue the last copies (atexit runs this first)
    busy = [lane for lane in list(_lanes) if lane.pending()]
    if not busy:
        return
    try:
        timeout = float(remote_copy_config().copy_timeout_s)
    except Exception:  # noqa: BLE001 - a bad variable was reported when it was read
        timeout = 0.0
    deadline = time.monotonic() + timeout
    for lane in busy:
        if lane.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            print(f"ckptio: finishing remote copies before exit (up to {timeout:.0f} s): "
                  f"{'; '.join(lane.pending())}", file=sys.stderr, flush=True)
        left = lane.wait(max(0.0, deadline - time.monotonic()))
        if left:
            print(f"ckptio: exiting with remote work not done: {'; '.join(left)}", file=sys.stderr, flush=True)


# Copies at exit need asyncio's executors (s3fs resolves hosts there), which
# refuse new work once concurrent.futures' own exit hook, run by threading's
# shutdown before any atexit function, has run: so this runs in that same
# phase, before it (those hooks run newest first; concurrent.futures.thread
# is imported above so that its hook is the older one).
_register_exit_hook = getattr(threading, "_register_atexit", None)
if _register_exit_hook is not None:
    _register_exit_hook(_finish_at_exit)
else:  # pragma: no cover - CPython has had it since 3.9
    atexit.register(_finish_at_exit)


def _reset_after_fork() -> None:
    for lane in list(_lanes):
        lane._init_state()  # the parent's copies are the parent's to make


os.register_at_fork(after_in_child=_reset_after_fork)
