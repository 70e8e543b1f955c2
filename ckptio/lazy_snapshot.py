"""Lazy snapshots: parameters and optimizer state copied behind forward/backward.

With ``snapshot="lazy"`` an async save copies before returning only what
something other than an optimizer step could change: buffers (BatchNorm's
running stats change in forward), gradients, tensors of an optimizer that has
not stepped yet, everything that is not a parameter or optimizer state. The
storages of the parameters and state of optimizers ckptio has seen step are
copied on a background thread while the caller goes on, and a barrier holds
back whatever could change them:

- torch's global optimizer step pre-hook (installed when ckptio is imported)
  makes every ``optimizer.step()`` wait for pending lazy copies before it
  updates anything. For torch's own optimizers called with a closure
  (Lightning's automatic optimization runs forward and backward inside
  ``step``), the wait is moved to just after the closure, before the update,
  so the copy still overlaps forward and backward. Other optimizers (which
  may change parameters before calling the closure, e.g. SAM) wait first.
- every ckptio call (save, load, async_save, wait, remove, verify);
- ``SaveHandle.wait_snapshot()`` and ``ckptio.wait_snapshots()``.

The tensor's ``_version`` cannot serve as a check: BatchNorm's running
stats, fused optimizers and writes through ``.data`` change tensors without
bumping it. Hence the rule above, by storage, decided at the call.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["LazyCopy", "lazily_copyable_storages", "wait_snapshots"]

_seen_optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
_pending: list[LazyCopy] = []
_pending_lock = threading.Lock()
# Seconds a copy thread sleeps before copying: 0 (a bare yield of the GIL,
# see LazyCopy._run) except in tests (ckptio._testing.delay_lazy_copies).
_test_start_delay = 0.0


class LazyCopy:
    """The background part of one lazy snapshot.

    `run` does the copy (on a thread of its own, started here); the source
    storages are kept alive until it has finished. A failure is kept and
    raised by ``check()`` (the save's job raises it: nothing is written)."""

    def __init__(self, run: Callable[[], object], keepalive: object) -> None:
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._keepalive: object = keepalive
        with _pending_lock:
            _pending.append(self)
        self._thread = threading.Thread(target=self._run, args=(run,), name="ckptio-lazy-snapshot", daemon=True)
        self._thread.start()

    def _run(self, run: Callable[[], object]) -> None:
        try:
            # Hand the GIL back first: the caller's save call still has a
            # little Python left, and this thread's (a check of every source)
            # would otherwise hold it for up to a switch interval (5 ms).
            time.sleep(_test_start_delay)
            run()
        except BaseException as e:  # reported by the save, once
            self.error = e
        finally:
            self._keepalive = None
            with _pending_lock:
                if self in _pending:
                    _pending.remove(self)
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the copy has finished (successfully or not)."""
        return self._done.wait(timeout)

    def join(self) -> None:
        """Wait for the copy and for its thread to end (teardown leaves no thread)."""
        self._thread.join()

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def wait_snapshots() -> None:
    """Block until every pending lazy snapshot copy has finished.

    After this returns, the caller may change any tensor it has saved. A
    failed copy is not raised here: its save raises it (its handle, or the
    next ckptio call), once, and writes nothing."""
    while True:
        with _pending_lock:
            if not _pending:
                return
            copy = _pending[0]
        copy.join()


def lazily_copyable_storages() -> set[int]:
    """The storages (by ``_cdata``) a lazy snapshot may copy in the
    background: parameters and tensor state of every live optimizer that has
    stepped since ckptio was imported. Only that optimizer's next step may
    change them, and it waits for the copy first."""
    keys: set[int] = set()
    for optimizer in list(_seen_optimizers):
        for group in optimizer.param_groups:
            for p in group["params"]:
                keys.add(p.untyped_storage()._cdata)
        for per_param in optimizer.state.values():
            if isinstance(per_param, dict):
                for value in per_param.values():
                    if isinstance(value, torch.Tensor):
                        keys.add(value.untyped_storage()._cdata)
    return keys


# --- the barrier in optimizer.step ---------------------------------------------

def _steps_call_closure_first(optimizer: torch.optim.Optimizer) -> bool:
    # torch's own optimizers evaluate the closure before touching a
    # parameter (checked for every optimizer in torch.optim); their step
    # keeps its module name through torch's hook wrapper.
    module = getattr(type(optimizer).step, "__module__", "") or ""
    return module.startswith("torch.optim.")


def _wait_after(closure: Callable[..., Any]) -> Callable[..., Any]:
    def closure_then_wait_for_snapshots(*args: Any, **kwargs: Any) -> Any:
        loss = closure(*args, **kwargs)
        wait_snapshots()
        return loss

    return closure_then_wait_for_snapshots


def _before_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    _seen_optimizers.add(optimizer)
    if not _pending:
        return None
    if _steps_call_closure_first(optimizer):
        if kwargs.get("closure") is not None:
            return args, {**kwargs, "closure": _wait_after(kwargs["closure"])}
        if len(args) > 1 and callable(args[1]):  # args[0] is the optimizer itself
            return (args[0], _wait_after(args[1])) + tuple(args[2:]), kwargs
    wait_snapshots()
    return None


register_optimizer_step_pre_hook(_before_optimizer_step)


def _reset_after_fork() -> None:
    global _pending_lock
    _pending_lock = threading.Lock()
    _pending.clear()  # the parent's copy threads are not in this process


os.register_at_fork(after_in_child=_reset_after_fork)
