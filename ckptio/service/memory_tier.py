"""The memory tier: the newest checkpoints of a directory, kept as whole
torch.save images on the service's tmpfs (RAM).

An image is the same archive as the file on disk, under the same name, in a
folder of the service directory named for the checkpoint directory (and
file pattern) it mirrors: ``<service dir>/memory/<key>/step_<N>.pt``. It is
written by the service after the disk copy is durable, through a temporary
name and a rename, so a folder only ever holds whole images; a restarted
trainer reads it like any checkpoint (CRC-verified), without the service.
The service keeps the newest `keep` images of each folder, and all of them
within CKPTIO_MEMORY_BYTES: the oldest image of the node goes first, never
the newest of its folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from typing import Any

__all__ = ["folder_for", "images", "prune", "prune_folders", "store", "keep_here", "engine_writer", "file_copier",
           "bytes_writer", "SOURCE_FILE"]

SOURCE_FILE = "source"  # in each folder: the directory and pattern it mirrors, for `ckptio list`


def folder_for(service_directory: str, directory: str, prefix: str, suffix: str) -> str:
    """Where the memory tier keeps images of `directory`'s `prefix<N>suffix` checkpoints."""
    key = f"{os.path.abspath(directory)}\0{prefix}\0{suffix}"
    return os.path.join(service_directory, "memory", hashlib.sha256(key.encode()).hexdigest()[:24])


def images(folder: str, pattern: re.Pattern[str]) -> dict[int, str]:
    """{step: path} of the whole images in `folder` (none if it does not exist)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    found = {}
    for name in names:
        m = pattern.match(name)
        if m:
            found[int(m.group(1))] = os.path.join(folder, name)
    return found


def node_usage(service_directory: str) -> list[tuple[float, int, str, bool]]:
    """Every image of the node: (modified time, bytes, path, newest of its folder)."""
    found = []
    for folder in _folders(service_directory):
        entries = []
        try:  # another process may remove a folder or an image meanwhile
            for e in os.scandir(folder):
                if e.is_file() and not e.name.startswith(".") and e.name != SOURCE_FILE:
                    st = e.stat()
                    entries.append((st.st_mtime, st.st_size, e.path))
        except FileNotFoundError:
            continue
        entries.sort()
        found += [(t, n, p, i == len(entries) - 1) for i, (t, n, p) in enumerate(entries)]
    return found


def prune(folder: str, pattern: re.Pattern[str], keep: int) -> None:
    """Keep the newest `keep` images of `folder`."""
    held = images(folder, pattern)
    for step in sorted(held)[:-keep] if keep > 0 else sorted(held):
        _remove(held[step])


def prune_oldest(folder: str, keep: int) -> None:
    """Keep the `keep` most recently written images of `folder`."""
    held = sorted((os.stat(e.path).st_mtime, e.path) for e in os.scandir(folder)
                  if e.is_file() and not e.name.startswith(".") and e.name != SOURCE_FILE)
    for _, path in held[:-keep] if keep > 0 else held:
        _remove(path)


def prune_folders(service_directory: str, kind: Callable[[str, str], bool], keep: int) -> None:
    """Keep the `keep` most recently written of the folders of the node for
    which kind(folder, source) holds (source: what the folder mirrors, as its
    SOURCE_FILE says); remove the others whole."""
    import shutil

    found = []
    for folder in _folders(service_directory):
        try:
            with open(os.path.join(folder, SOURCE_FILE)) as f:
                source = f.read().strip()
            written = os.stat(os.path.join(folder, SOURCE_FILE)).st_mtime
        except OSError:
            continue
        if kind(folder, source):
            found.append((written, folder))
    for _, folder in sorted(found)[:-keep] if keep > 0 else found:
        shutil.rmtree(folder, ignore_errors=True)


def _folders(service_directory: str) -> list[str]:
    try:
        return [e.path for e in os.scandir(os.path.join(service_directory, "memory")) if e.is_dir()]
    except OSError:
        return []


def same_checkpoint(image: str, path: str, tail: int = 1 << 16) -> bool:
    """Whether the image holds the checkpoint at `path` (or `path` is gone):
    equal sizes and equal last `tail` bytes, where the archive's directory
    lists every record's CRC-32."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return True
    try:
        if os.path.getsize(image) != size:
            return False
        with open(image, "rb") as a, open(path, "rb") as b:
            start = max(0, size - tail)
            a.seek(start)
            b.seek(start)
            return a.read() == b.read()
    except OSError:
        return False


def fit_budget(service_directory: str, budget: int, incoming: int) -> bool:
    """Make room for an image of `incoming` bytes within `budget`, removing
    the node's oldest images (never the newest of a folder); False if it
    cannot fit."""
    if incoming > budget:
        return False
    usage = node_usage(service_directory)
    total = sum(n for _, n, _, _ in usage)
    for _, n, path, newest in sorted(usage):
        if total + incoming <= budget:
            break
        if not newest:
            _remove(path)
            total -= n
    return total + incoming <= budget


def store(service_directory: str, budget: int, spec: dict[str, Any], nbytes: int,
          write: Callable[[str], None]) -> dict[str, Any]:
    """Keep the image `spec` asks for (folder, name, pattern, keep, source),
    `nbytes` long, within `budget`; `write(path)` writes it whole (through a
    temporary name). Returns {"path": ...} or {"error": ...}: the disk copy
    stands either way."""
    folder, name = spec["folder"], spec["name"]
    if not fit_budget(service_directory, budget, nbytes):
        return {"error": f"{nbytes} bytes do not fit the memory tier's budget (CKPTIO_MEMORY_BYTES={budget})"}
    try:
        os.makedirs(os.path.dirname(folder), mode=0o700, exist_ok=True)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        with open(os.path.join(folder, SOURCE_FILE), "w") as f:
            f.write(str(spec.get("source", "")) + "\n")
        write(os.path.join(folder, name))
        os.chmod(os.path.join(folder, name), 0o600)  # another user's checkpoint is none of ours to read
        if spec.get("order") == "mtime":  # names without a step (Lightning's): the newest written stay
            prune_oldest(folder, int(spec["keep"]))
        else:
            prune(folder, re.compile(spec["pattern"]), int(spec["keep"]))
    except Exception as e:  # noqa: BLE001 - reported; the disk copy stands
        return {"error": f"{type(e).__name__}: {e}"}
    return {"path": os.path.join(folder, name)}


def engine_writer(records: list[Any], alignment: int, keepalive: object) -> Callable[[str], None]:
    """store()'s `write`: the engine writes `records` (the same as the disk copy's)."""
    def write(path: str) -> None:
        from .._engine import get_engine

        ticket = get_engine().save(path, records, alignment, keepalive)
        ticket.wait()
        ticket.check()
    return write


def file_copier(source: str) -> Callable[[str], None]:
    """store()'s `write`: a copy of the committed file `source`."""
    def write(path: str) -> None:
        import shutil

        from .._paths import committed_file

        with open(source, "rb") as src, committed_file(path, site="memory") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
    return write


def bytes_writer(data: bytes | bytearray | memoryview, site: str = "memory") -> Callable[[str], None]:
    """store()'s `write`: `data` (a checkpoint received whole, e.g. from a partner rank)."""
    def write(path: str) -> None:
        from .._paths import committed_file

        with committed_file(path, site=site) as f:
            f.write(data)
    return write


def keep_here(spec: dict[str, Any], path: str, nbytes: int, write: Callable[[str], None]) -> None:
    """store() in the trainer's process (no service to do it), warning if it cannot."""
    import warnings

    from ..config import service_config

    config = service_config()
    kept = store(config.directory, config.memory_bytes, spec, nbytes, write)
    if "error" in kept:
        warnings.warn(f"ckptio: {path} is durable but not kept in the memory tier: {kept['error']}", RuntimeWarning,
                      stacklevel=3)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
