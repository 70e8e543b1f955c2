"""Destination checks and cleanup of temporaries left by killed writers."""

from __future__ import annotations

import errno
import itertools
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from .errors import CheckpointIOError, CheckpointNotFoundError

# Temporary names: ".ckptio-tmp-<pid>-<n>" (the engine's, csrc/engine/file_io.cc)
# and ".ckptio-tmp-<pid>-<tag>" (Python-side writers). They hold nothing of the
# checkpoint's name, so directory scans by name (Lightning's "hpc_ckpt_" resume
# scan, globs like "epoch=*") never mistake one for a checkpoint. Names of
# earlier releases (".<base>.ckptio-tmp-<pid>-<n>") are still cleaned up.
_TEMP_NAME = re.compile(r"^\.(?:.+\.)?ckptio-tmp-(\d+)-\w+$")
_temporaries = itertools.count()

# Test seam (ckptio._testing.skip_fsyncs): the sites whose fsync is left out,
# so the power-loss simulator can show that it notices each one missing.
_skipped_fsyncs: frozenset[str] = frozenset()


def temporary_path(path: str) -> str:
    """A fresh temporary name beside `path`, unique in this process, that
    stale-temporary cleanup recognises (ckptio's own, with this pid)."""
    return os.path.join(os.path.dirname(path), f".ckptio-tmp-{os.getpid()}-p{next(_temporaries)}")


def normalize_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """`path` (str or os.PathLike) as the string ckptio works with: a local
    ``file://`` URL becomes the plain path it names (as fsspec's local
    filesystem reads it), so it is never taken for a relative directory
    called "file:"; other URLs (s3://, ...) are left for fsspec."""
    fspath = os.fspath(path)
    text = os.fsdecode(fspath) if isinstance(fspath, bytes) else fspath
    if text.startswith("file://"):
        text = os.path.abspath(text[len("file://"):])
    return text


def make_parent_directories(path: str) -> None:
    """Create the directories a local save into `path` needs, as Lightning's
    plugins do (the Trainer's first save goes into a "checkpoints" directory
    nobody made). URLs are left alone: object stores have no directories."""
    parent = os.path.dirname(path)
    if parent and "://" not in path:
        make_directories(parent)


def make_directories(directory: str) -> None:
    """``os.makedirs(directory, exist_ok=True)``, durably: each directory it
    creates is fsynced into its parent. Without that a power cut may lose a
    new directory, and with it a checkpoint already reported durable inside."""
    missing = []
    current = os.path.abspath(directory)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    if not missing:
        return
    os.makedirs(directory, exist_ok=True)
    for created in reversed(missing):  # outermost first: each entry lands in a durable parent
        fsync_directory(os.path.dirname(created), site="new_directory")


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
    try:  # a killed writer is a zombie until its parent reaps it: it writes nothing more
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def remove_stale_temporaries(directory: str) -> list[str]:
    """Delete ckptio temporaries in `directory` whose writer process is gone.

    Only names the engine makes are touched, and only when their pid no
    longer runs, so a concurrent writer's file is never removed.
    """
    removed: list[str] = []
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


def fsync_file(fd: int, site: str) -> None:
    """fsync an open file, so that its data survives a power loss. `site`
    names this fsync for the test seam (see _skipped_fsyncs)."""
    if site not in _skipped_fsyncs:
        os.fsync(fd)


def fsync_directory(directory: str, site: str = "directory") -> None:
    """fsync a directory, so that a rename inside it survives a power loss.
    `site` names this fsync for the test seam (see _skipped_fsyncs)."""
    if site in _skipped_fsyncs:
        return
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def committed_file(path: str, mode: str = "wb", *, site: str = "commit") -> Iterator[IO[Any]]:
    """Write `path` through a temporary file beside it, committed durably.

    Yields the open temporary file. On success: flush, fsync, rename over
    `path`, fsync the directory. On any error the temporary file is removed
    and `path` is untouched. The temporary name is one stale-temporary
    cleanup recognises (ckptio's own, with this pid). `site` names the two
    fsyncs ("<site>.file", "<site>.directory") for the test seam.
    """
    parent = os.path.dirname(path) or "."
    tmp = temporary_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            fsync_file(f.fileno(), f"{site}.file")
        os.replace(tmp, path)
        fsync_directory(parent, f"{site}.directory")
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
