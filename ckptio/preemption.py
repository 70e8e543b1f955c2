"""Preemption: checkpoints that are durable before a signalled process goes.

A scheduler that preempts a job sends a signal first (SIGTERM; SLURM's
``--signal=USR1@90``), then SIGKILL after a grace period. Two things lose a
checkpoint then, and this module closes both:

- **An async save still in the queue when the process exits.** SIGTERM's
  default action ends the process at once, background writes and all.
  ``on_preemption()`` chains a handler in front of the one installed before
  it: it waits (up to ``deadline_s``) until every queued save is durable,
  then hands the signal on (to the previous Python handler, or, where that
  was the default action, re-raises it so the process still ends *by* the
  signal, as schedulers expect).
- **A save issued from inside a signal handler.** Lightning's SLURM handler
  calls ``trainer.save_checkpoint`` and then requeues the job, which is
  killed soon after; with an async plugin the save had only been queued.
  Every async save path (``ckptio.async_save``, the manager, the async
  plugins) checks ``in_signal_handler()`` and, inside one, waits until the
  save is durable before returning.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from .save_queue import SaveHandle

__all__ = ["on_preemption", "PreemptionGuard", "in_signal_handler"]


def in_signal_handler() -> bool:
    """Whether the caller runs inside a Python signal handler: some frame on
    its stack runs the code of a handler installed now (a plain function, a
    bound method, a functools.partial, a callable object, or one of the
    handlers Lightning's ``_HandlersCompose`` holds)."""
    if threading.current_thread() is not threading.main_thread():
        return False  # Python runs signal handlers in the main thread only
    codes: set[CodeType] = set()
    for signum in _CATCHABLE:
        _collect_codes(signal.getsignal(signum), codes)
    if not codes:
        return False
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


# Plain ints, listed once: every async save asks (building the Signals set
# each time cost ~80 µs of a save's stall).
_CATCHABLE = tuple(sorted(int(s) for s in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}))


def _collect_codes(handler: object, codes: set[CodeType], depth: int = 0) -> None:
    if depth > 4 or handler is None or isinstance(handler, int):  # SIG_DFL, SIG_IGN, a signal number
        return
    if isinstance(handler, functools.partial):
        _collect_codes(handler.func, codes, depth + 1)
        return
    function = getattr(handler, "__func__", handler)
    code = getattr(function, "__code__", None)
    if code is not None:
        codes.add(code)
    else:  # a callable object: its __call__, and what it composes
        call = getattr(type(handler), "__call__", None)  # noqa: B004 (fetches the method; not a callable() test)
        call_code = getattr(call, "__code__", None)
        if call_code is not None:
            codes.add(call_code)
    for inner in getattr(handler, "signal_handlers", None) or ():  # Lightning's _HandlersCompose
        _collect_codes(inner, codes, depth + 1)


def durable_if_signalled(handle: SaveHandle) -> SaveHandle:
    """Inside a signal handler, wait until `handle`'s save is durable (and
    raise its failure): whoever sent the signal may end the process next."""
    if in_signal_handler():
        handle.result()
    return handle


# What signal.signal returns: a handler, SIG_DFL/SIG_IGN, or None (one not installed from Python).
_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, signal.Handlers, None]


class PreemptionGuard:
    """What ``on_preemption`` installed; ``restore()`` puts the previous
    handlers back (also on leaving a ``with`` block)."""

    def __init__(self, signals: Iterable[int], deadline_s: Optional[float]) -> None:
        self.deadline_s = deadline_s
        self.previous: dict[int, _Handler] = {}
        self._handling = False
        for signum in signals:
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if not self._handling:  # a second signal while draining: the first one is already on it
            self._handling = True
            try:
                drain_before_exit(self.deadline_s, signal.Signals(signum).name)
            finally:
                self._handling = False
        self._pass_on(signum, frame)

    def _pass_on(self, signum: int, frame: Optional[FrameType]) -> None:
        previous = self.previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        elif signal.getsignal(signum) != self._handle:
            # Installed over us by someone who chains us (Lightning composes the
            # SIGTERM handler it finds with its own and then stops the Trainer
            # gracefully): what the signal does next is theirs to decide.
            return
        elif previous in (signal.SIG_DFL, None):
            # The default action (end the process): done by the kernel, so that
            # the exit status still says "killed by <signal>".
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        # SIG_IGN: ignored, as before

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self.previous = {}

    def __enter__(self) -> PreemptionGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def drain_before_exit(deadline_s: Optional[float], reason: str) -> bool:
    """Wait up to `deadline_s` (None: as long as it takes) until every queued
    save is durable; True if they all are. Reports on stderr either way."""
    from .save_queue import get_queue

    queue = get_queue()
    pending = queue.pending()
    if not pending:
        return True
    start = time.monotonic()
    print(f"ckptio: {reason}: making {pending} queued checkpoint save(s) durable before exiting",
          file=sys.stderr, flush=True)
    done = queue.wait_all_for(float("inf") if deadline_s is None else deadline_s)
    took = time.monotonic() - start
    if done:
        print(f"ckptio: {reason}: checkpoints durable after {took:.1f} s", file=sys.stderr, flush=True)
    else:
        print(f"ckptio: {reason}: {queue.pending()} save(s) still not durable after the {deadline_s} s deadline; "
              "exiting anyway (the previous checkpoint at each path is intact)", file=sys.stderr, flush=True)
    return done


def on_preemption(signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1), *,
                  deadline_s: Optional[float] = None) -> PreemptionGuard:
    """Make queued saves durable before a preempted process ends.

    For each of `signals`, installs a handler that waits up to `deadline_s`
    seconds (None: no limit; pick one under your scheduler's grace period)
    for every queued async save to become durable, then passes the signal
    on to the handler installed before (or re-raises it where that was the
    default action, so the process ends as it would have). Call it from the
    main thread, after anything else that installs handlers for them.

    With Lightning, leave SIGUSR1 out: Lightning installs its SLURM requeue
    handler only where none is set, and ckptio's plugins already make the
    save that handler issues durable before it requeues.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("ckptio.on_preemption must be called from the main thread (signal handlers live there)")
    if deadline_s is not None and not deadline_s >= 0:
        raise ValueError(f"deadline_s must be None or >= 0, not {deadline_s!r}")
    return PreemptionGuard(tuple(signals), deadline_s)
