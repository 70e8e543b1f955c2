"""Loading a checkpoint at an fsspec URL with parallel ranged reads.

The archive's directory comes from one request for the object's tail; the
records' bytes then come in ranged GETs of CKPTIO_REMOTE_RANGE_MB (64),
CKPTIO_REMOTE_RANGES (4) at a time, each copied into one page-aligned buffer
as it lands (memory beyond the destination: the ranges in flight). No
temporary file. Every record's CRC-32 is checked (in parallel, the GIL
released) before the pickle sees it, and the tensors are views of that
buffer, as a local load's are views of the engine's.

Fewer, larger ranges suit servers that pay per request: moto's S3 server
reads the whole object for every GET, ranged or not.
"""

from __future__ import annotations

import io
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Optional

from . import _C
from .archive import Archive, _archive_from_entries, _is_payload, storage_from_buffer
from .config import remote_read_config
from .errors import CheckpointIOError, CheckpointNotFoundError, CorruptCheckpointError

if TYPE_CHECKING:
    import torch
    from fsspec import AbstractFileSystem

    from .archive import Record

__all__ = ["fetch_archive", "zip_object_size"]

_TAIL_BYTES = 64 << 10  # the directory of a checkpoint with ~500 records fits; a larger one costs one more request
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


class _SparseObject(io.RawIOBase):
    """A read-only file over an object, served from the byte ranges fetched
    so far and fetching what else zipfile asks for (it seeks to the end
    record, then reads the central directory)."""

    def __init__(self, fs: AbstractFileSystem, path: str, size: int, start: int, tail: bytes) -> None:
        self._fs, self._path, self._size = fs, path, size
        self._start, self._tail = start, tail
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if self._pos >= end:
            return b""
        if self._pos >= self._start:
            data = self._tail[self._pos - self._start : end - self._start]
        else:
            data = _get_range(self._fs, self._path, self._pos, end)
        self._pos += len(data)
        return data

    def readinto(self, b: Any) -> int:  # a writable buffer
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _get_range(fs: AbstractFileSystem, path: str, start: int, end: int) -> bytes:
    try:
        data = fs.cat_file(path, start=start, end=end)
    except FileNotFoundError:
        raise CheckpointNotFoundError.missing_checkpoint(path) from None
    except Exception as e:
        raise CheckpointIOError(5, f"ranged read [{start}, {end}) failed: {type(e).__name__}: {e}", path) from e
    if len(data) != end - start:
        raise CorruptCheckpointError(f"{path}: asked for bytes [{start}, {end}), got {len(data)}: the object "
                                     "changed or is truncated", path=path)
    return data


def _object_size(fs: AbstractFileSystem, path: str, url: str) -> int:
    try:
        fs.invalidate_cache(path)  # a listing cached earlier may predate the object's latest version
        return int(fs.info(path)["size"])
    except FileNotFoundError:
        raise CheckpointNotFoundError.missing_checkpoint(url) from None
    except Exception as e:
        raise CheckpointIOError(5, f"cannot reach the checkpoint: {type(e).__name__}: {e}", url) from e


def zip_object_size(fs: AbstractFileSystem, path: str, url: str) -> Optional[int]:
    """The object's size if it starts like a zip archive, else None (a legacy torch.save file)."""
    size = _object_size(fs, path, url)
    return size if size >= 4 and _get_range(fs, path, 0, 4) == b"PK\x03\x04" else None


def _directory(fs: AbstractFileSystem, path: str, url: str, size: int) -> tuple[Archive, int]:
    """(Archive, where the central directory starts)."""
    start = max(0, size - _TAIL_BYTES)
    tail = _get_range(fs, path, start, size)
    try:
        with zipfile.ZipFile(_SparseObject(fs, path, size, start, tail)) as zf:
            infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
            directory_start = zf.start_dir
    except (zipfile.BadZipFile, ValueError, struct.error) as e:
        raise CorruptCheckpointError(f"{url}: not a readable checkpoint archive ({e})", path=url) from None
    entries = []
    for i, info in enumerate(infos):
        end = infos[i + 1].header_offset if i + 1 < len(infos) else directory_start
        entries.append((info.orig_filename.encode("utf-8"), info.header_offset, end, info.file_size,
                        info.CRC))
    return _archive_from_entries(url, size, entries), directory_start


def fetch_archive(url: str, fs: AbstractFileSystem, path: str, size: int, *,
                  verify: bool) -> tuple[Archive, dict[str, bytes], dict[str, torch.UntypedStorage]]:
    """Read the archive at `url` (`size` bytes: see zip_object_size) into
    memory with parallel ranged GETs.

    Returns (Archive, known, storages): `known` maps small records (the
    pickle, version, ...) to bytes, `storages` maps tensor payload records to
    CPU storages over the fetched buffer; ready for archive.LoadedArchive.
    Raises CorruptCheckpointError naming the record whose CRC-32 (when
    `verify`), local header or size is wrong."""
    cfg = remote_read_config()
    archive, directory_start = _directory(fs, path, url, size)
    buffer = _C.AlignedBuffer(max(directory_start, 1))
    view = memoryview(buffer).cast("B")
    step = cfg.range_bytes
    ranges = [(s, min(s + step, directory_start)) for s in range(0, directory_start, step)]

    def fetch(span: tuple[int, int]) -> None:
        start, end = span
        view[start:end] = _get_range(fs, path, start, end)

    with ThreadPoolExecutor(cfg.ranges_in_flight, thread_name_prefix="ckptio-range") as pool:
        list(pool.map(fetch, ranges))
        payloads = {name: _payload(archive, view, record) for name, record in archive.records.items()}
        if verify:
            crcs = dict(zip(payloads, pool.map(lambda name: _C.crc32(payloads[name]), payloads)))
            for name, record in archive.records.items():
                if crcs[name] != record.crc:
                    raise CorruptCheckpointError(
                        f"{url}: record '{name}' fails its CRC-32 check (stored {record.crc:#010x}, read "
                        f"{crcs[name]:#010x})", path=url, record=name)
    known = {name: bytes(p) for name, p in payloads.items() if not _is_payload(archive.records[name])}
    storages = {name: storage_from_buffer(p) for name, p in payloads.items() if _is_payload(archive.records[name])}
    return archive, known, storages


def _payload(archive: Archive, view: memoryview, record: Record) -> memoryview:
    """The record's bytes, after its local header (which must be one)."""
    header_end = record.header_offset + _LOCAL_HEADER.size
    if header_end > len(view):
        raise CorruptCheckpointError(f"{archive.path}: record '{record.name}' lies past the archive's data",
                                     path=archive.path, record=record.name)
    signature, name_len, extra_len = _LOCAL_HEADER.unpack_from(view, record.header_offset)
    start = header_end + name_len + extra_len
    if signature != b"PK\x03\x04" or start + record.size > record.end_offset:
        raise CorruptCheckpointError(f"{archive.path}: record '{record.name}' has a damaged local header",
                                     path=archive.path, record=record.name)
    return view[start : start + record.size]
