"""The process-wide native engine, created on first use.

The engine's options come from the environment when it is created; a forked
child gets a fresh engine (the parent's worker threads do not exist there).
"""

from __future__ import annotations

import os
import threading

from . import _C
from .config import engine_config

_lock = threading.Lock()
_engine: _C.Engine | None = None
_abandoned: list = []  # engines inherited across fork(): never destroyed in the child


def get_engine() -> _C.Engine:
    global _engine
    with _lock:
        if _engine is None:
            cfg = engine_config()
            _engine = _C.Engine(cfg.num_threads, cfg.block_bytes, cfg.queue_depth, cfg.direct)
        return _engine


def reset_engine() -> None:
    """Drain and drop the engine, so the next use re-reads the environment."""
    global _engine
    with _lock:
        _engine = None  # its destructor finishes queued jobs and joins the workers


def _after_fork_in_child() -> None:
    global _engine, _lock
    _lock = threading.Lock()
    if _engine is not None:
        _abandoned.append(_engine)
        _engine = None


os.register_at_fork(after_in_child=_after_fork_in_child)
