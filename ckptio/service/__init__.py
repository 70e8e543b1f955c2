"""The checkpoint service: a per-node, per-user writer process that outlives
the trainer (ckptio.service.server), the trainer's side of it
(ckptio.service.client), the shared staging segments both map
(ckptio.service.segments), their wire format (ckptio.service.wire) and the
memory tier it keeps (ckptio.service.memory_tier).

This package imports no torch: the service process runs only the engine.
"""

from __future__ import annotations

import threading

__all__ = ["wanted", "want", "forget"]

_wanted_by_code = threading.Event()


def want() -> None:
    """Say that saves from now on go through the service (a CheckpointManager
    with a memory tier calls this), as CKPTIO_SERVICE=1 does."""
    _wanted_by_code.set()


def wanted() -> bool:
    """Whether async saves go through the service: CKPTIO_SERVICE=1 or want()."""
    from ..config import service_config

    return _wanted_by_code.is_set() or service_config().enabled


def forget() -> None:
    """Undo want() (tests, through ckptio.background.reset)."""
    _wanted_by_code.clear()
