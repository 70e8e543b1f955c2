"""Destination checks and cleanup of temporaries left by killed writers."""

from __future__ import annotations

import errno
import os
import re

from .errors import CheckpointIOError, CheckpointNotFoundError

# The engine's temporary names: ".<base>.ckptio-tmp-<pid>-<n>" (csrc/engine/file_io.cc).
_TEMP_NAME = re.compile(r"^\..+\.ckptio-tmp-(\d+)-\d+$")


def check_destination(path: str) -> None:
    """Fail early, naming `path`, when a save there cannot succeed."""
    if os.path.isdir(path):
        raise CheckpointIOError(errno.EISDIR, "cannot save a checkpoint over a directory", path)
    parent = os.path.dirname(path) or "."
    if not os.path.exists(parent):
        raise CheckpointNotFoundError(errno.ENOENT, f"the directory {parent!r} does not exist", path)
    if not os.path.isdir(parent):
        raise CheckpointIOError(errno.ENOTDIR, f"{parent!r} is not a directory", path)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str) -> list:
    """Delete ckptio temporaries in `directory` whose writer process is gone.

    Only names the engine makes are touched, and only when their pid no
    longer runs, so a concurrent writer's file is never removed.
    """
    removed = []
    try:
        entries = list(os.scandir(directory or "."))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                os.unlink(entry.path)
                removed.append(entry.path)
            except OSError:
                pass
    return removed
