"""Staging memory faulted in before the first save needs it.

An async save's snapshot copies into the staging arena; a slot that has never
held this much pays first-touch page faults on the caller's thread, several
times the copy itself (`make demo` measured the first save at 3x the steady
stall and the second, which finds the other slot still faulting, at 6x).
The size of a training checkpoint is known long before the first save: once
an optimizer has stepped, its parameters and state (Adam's moments exist
only after the first step) are most of it. So what saves whole training
states asynchronously (AsyncCheckpointIO and an async CheckpointManager,
when built; not a bare async_save, which may save anything) asks for a hook
on every optimizer's step: the first step of each optimizer it has not
measured yet grows the free slots to the estimate on a background thread,
as many as half of the memory available then holds (a weights-only
checkpoint is smaller than the estimate). The training thread pays a set
lookup per step. An explicit ``reserve=`` (ckptio.reserve_staging) is
exact and replaces the hook.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["available_memory_bytes", "estimated_checkpoint_bytes", "reserve_at_optimizer_steps", "stop_reserving"]

_PAGE = 4096
_lock = threading.Lock()
_hook: Any = None  # the RemovableHandle of the global optimizer step post-hook
_grow: Callable[[int], None] | None = None
_measured: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


def reserve_at_optimizer_steps(grow: Callable[[int], None]) -> None:
    """From the next optimizer step on, call grow(estimated checkpoint bytes)
    at the first step of every optimizer not measured yet (grow is expected
    to return at once and fault memory in the background). Idempotent."""
    global _hook, _grow
    with _lock:
        _grow = grow
        if _hook is None:
            _hook = register_optimizer_step_post_hook(_after_step)


def stop_reserving() -> None:
    """Remove the hook (tests; a process that stops saving asynchronously)."""
    global _hook
    with _lock:
        if _hook is not None:
            _hook.remove()
            _hook = None
        _measured.clear()


def estimated_checkpoint_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    """Staging bytes of a checkpoint holding these optimizers' parameters and
    state: each storage page-rounded as the arena lays it out, plus 2% and
    4 MiB for what a checkpoint adds (buffers such as BatchNorm statistics,
    schedulers, loop state)."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor):
            return
        try:
            storage = t.untyped_storage()
            key, nbytes = (storage.data_ptr() or id(storage)), storage.nbytes()
        except Exception:  # noqa: BLE001 - a DTensor, an XLA or a sparse tensor: no storage to ask
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += -(-nbytes // _PAGE) * _PAGE

    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                add(p)
        for state in opt.state.values():
            for value in state.values():
                add(value)
    return total + total // 50 + (4 << 20)


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if optimizer in _measured:
        return
    _measured.add(optimizer)
    grow = _grow
    if grow is None:
        return
    try:
        grow(estimated_checkpoint_bytes(list(_measured)))
    except Exception:  # noqa: BLE001 - a reservation is an optimization: it never fails a training step
        pass


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none to read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
