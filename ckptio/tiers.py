"""The remote tier: copies of local checkpoints in object storage.

Local saves are fast and durable but die with their node; an fsspec URL
prefix (s3://bucket/run) survives it. A checkpoint is copied there after it
is durable locally, from the same staged bytes when the save was async, and
committed in order: the object completes (S3 makes a multipart upload
visible whole, at once), then the prefix's ``latest`` pointer names it,
never before. A failed copy never fails the local save: it is reported once
(a RuntimeWarning, and ``RemoteCopy.error`` in the save's result) and the
next copy tries again.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

from . import remote as _remote

__all__ = ["RemoteCopy", "RemoteTier"]

POINTER = "latest"


@dataclass(frozen=True)
class RemoteCopy:
    """How a checkpoint's remote copy went: committed after `seconds`, or `error`."""
    url: str
    seconds: float
    error: Optional[BaseException] = None

    @property
    def committed(self) -> bool:
        return self.error is None


class RemoteTier:
    def __init__(self, prefix: str) -> None:
        prefix = str(prefix).rstrip("/")
        if not _remote.is_url(prefix):
            raise ValueError(f"remote must be an fsspec URL prefix such as 's3://bucket/run', not {prefix!r}")
        self.prefix = prefix

    def url_for(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def copy(self, name: str, send: Callable[[str], object]) -> RemoteCopy:
        """send(url) writes the checkpoint object; then the pointer moves to it.
        Failures are caught, warned about once, and returned."""
        url = self.url_for(name)
        start = time.perf_counter()
        try:
            send(url)
            fs, path = _remote.fs_for(self.url_for(POINTER))
            fs.pipe_file(path, (name + "\n").encode())  # one PUT: the pointer is old or new
        except Exception as e:  # noqa: BLE001 - the local checkpoint stands; the error is the caller's to see
            warnings.warn(f"ckptio: copying {name} to {url} failed ({type(e).__name__}: {e}); the local checkpoint "
                          "is durable and the next remote copy tries again", RuntimeWarning, stacklevel=2)
            return RemoteCopy(url, time.perf_counter() - start, e)
        return RemoteCopy(url, time.perf_counter() - start)

    def names(self, pattern: re.Pattern[str]) -> list[str]:
        """Names under the prefix matching `pattern` (none if the prefix does not exist yet)."""
        fs, path = _remote.fs_for(self.prefix)
        try:
            listed = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in listed]
        return [n for n in names if pattern.match(n)]

    def pointer(self) -> Optional[str]:
        fs, path = _remote.fs_for(self.url_for(POINTER))
        try:
            name = fs.cat_file(path).decode(errors="replace").strip()
        except FileNotFoundError:
            return None
        return name if name and "/" not in name else None

    def remove(self, name: str) -> None:
        fs, path = _remote.fs_for(self.url_for(name))
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
