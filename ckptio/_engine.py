"""The process-wide native engine, created on first use.

The engine's options come from the environment when it is created; a forked
child gets a fresh engine (the parent's worker threads do not exist there).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from . import _C
from .config import DIRECT_AUTO, DIRECT_OFF, DIRECT_REQUIRE, EngineConfig, engine_config

__all__ = ["engine_info", "get_engine", "reset_engine"]

_lock = threading.Lock()
_engine: _C.Engine | None = None
_config: EngineConfig | None = None
_abandoned: list[_C.Engine] = []  # engines inherited across fork(): never destroyed in the child


def get_engine() -> _C.Engine:
    global _engine, _config
    with _lock:
        if _engine is None:
            cfg = engine_config()
            _engine = _C.Engine(cfg.num_threads, cfg.block_bytes, cfg.queue_depth, cfg.direct,
                                cfg.zero_copy_reads)
            _config = cfg
        return _engine


def engine_info() -> dict[str, Any]:
    """The options of the engine this process uses (creating it if needed)."""
    get_engine()
    cfg = _config
    assert cfg is not None  # set with the engine
    direct = {DIRECT_AUTO: "auto", DIRECT_REQUIRE: "1", DIRECT_OFF: "0"}[cfg.direct]
    return {"num_threads": cfg.num_threads, "block_bytes": cfg.block_bytes, "queue_depth": cfg.queue_depth,
            "direct_io": direct, "zero_copy_reads": cfg.zero_copy_reads}


def reset_engine() -> None:
    """Drop the engine, so the next use re-reads the environment. Jobs already
    queued finish first (the engine's destructor drains and joins)."""
    global _engine, _config
    with _lock:
        _engine, _config = None, None


def _after_fork_in_child() -> None:
    global _engine, _config, _lock
    _lock = threading.Lock()
    if _engine is not None:
        _abandoned.append(_engine)
        _engine, _config = None, None


os.register_at_fork(after_in_child=_after_fork_in_child)
