"""Staging memory faulted in before the first save needs it.

An async save's snapshot copies into the staging arena; a slot that has never
held this much pays first-touch page faults on the caller's thread, several
times the copy itself (`make demo` measured the first save at 3x the steady
stall and the second, which finds the other slot still faulting, at 6x).
The size of a training checkpoint is known long before the first save: once
an optimizer has stepped, its parameters and state (Adam's moments exist
only after the first step) are most of it. So whoever will save
asynchronously (the Lightning plugins and CheckpointManager when built,
every async save when made) asks for a hook on every optimizer's step: the
first step of each optimizer it has not measured yet grows every free slot
to the estimate on a background thread. The training thread pays a set
lookup per step.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["reserve_at_optimizer_steps", "estimated_checkpoint_bytes"]

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
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            key = storage.data_ptr() if storage.data_ptr() else id(storage)
            if key not in seen:
                seen.add(key)
                total += -(-storage.nbytes() // _PAGE) * _PAGE

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
    if grow is not None:
        grow(estimated_checkpoint_bytes(list(_measured)))
