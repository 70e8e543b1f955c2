"""Reading a checkpoint archive: its directory, its records, and the object
torch's own unpickling code reads them through."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from . import _C
from ._engine import get_engine
from .errors import CheckpointIOError, CorruptCheckpointError

__all__ = ["Archive", "Record", "RecordReader", "LoadedArchive", "open_archive", "open_archives",
           "is_zip_checkpoint", "read_small_records"]

_ZIP_MAGIC = b"PK\x03\x04"
_PAGE = 4096
_K = TypeVar("_K", bound=Hashable)


@dataclass(frozen=True)
class Record:
    name: str           # without the archive prefix, e.g. "data/0"
    header_offset: int  # its local header
    end_offset: int     # where the next record begins
    size: int           # payload bytes
    crc: int


@dataclass(frozen=True)
class Archive:
    path: str
    file_size: int
    prefix: str
    records: dict[str, Record]  # name -> Record, in file order

    def record(self, name: str) -> Record:
        try:
            return self.records[name]
        except KeyError:
            raise CorruptCheckpointError(
                f"{self.path}: the archive has no '{name}' record", path=self.path, record=name
            ) from None


def is_zip_checkpoint(path: str) -> bool:
    """True if the file starts like a zip archive (torch.save's format since 1.6)."""
    with open(path, "rb") as f:
        return f.read(4) == _ZIP_MAGIC


def open_archive(path: str, *, base: int = 0, size: int | None = None) -> Archive:
    """Parse and check the archive directory of `path` (or of the archive
    occupying bytes [base, base + size) of it; offsets come back absolute).

    Raises CorruptCheckpointError for anything torch.load could not read: a
    truncated or non-zip file, records outside one top-level directory, no
    ``data.pkl`` or ``version`` record.
    """
    if os.path.isdir(path):
        raise CheckpointIOError(21, "is a directory, not a checkpoint file", path)
    if size is None:
        file_size, entries = get_engine().read_directory(path)
        with open(path, "rb") as f:
            if f.read(4) != _ZIP_MAGIC:
                raise CorruptCheckpointError(
                    f"{path}: does not start with a zip local header, so torch.load cannot read it", path=path
                )
    else:  # an archive inside a larger file: its local headers are checked as they are read
        file_size, entries = get_engine().read_directory(path, base, size)
    return _archive_from_entries(path, file_size, entries)


def open_archives(path: str, windows: Iterable[tuple[int, int]]) -> dict[tuple[int, int], Archive]:
    """open_archive for many archives inside one file (a DCP rank file):
    {(base, size): Archive}, their directories read in parallel."""
    windows = list(windows)
    if os.path.isdir(path):
        raise CheckpointIOError(21, "is a directory, not a checkpoint file", path)
    listed = get_engine().read_directories(path, windows)
    file_size = os.path.getsize(path)
    return {w: _archive_from_entries(path, file_size, entries) for w, entries in zip(windows, listed)}


def _archive_from_entries(path: str, file_size: int, entries: Sequence[tuple[bytes, int, int, int, int]]) -> Archive:
    if not entries:
        raise CorruptCheckpointError(f"{path}: the archive holds no records", path=path)
    first = _decode(entries[0][0], path)
    if "/" not in first:
        raise CorruptCheckpointError(f"{path}: record '{first}' is not inside the archive directory", path=path)
    prefix = first.split("/", 1)[0]
    records: dict[str, Record] = {}
    for raw, header_offset, end_offset, size, crc in entries:
        full = _decode(raw, path)
        if not full.startswith(prefix + "/"):
            raise CorruptCheckpointError(
                f"{path}: record '{full}' is outside the archive directory '{prefix}/'", path=path, record=full
            )
        name = full[len(prefix) + 1 :]
        if name in records:
            raise CorruptCheckpointError(f"{path}: record '{name}' appears twice", path=path, record=name)
        records[name] = Record(name, header_offset, end_offset, size, crc)
    archive = Archive(path, file_size, prefix, records)
    archive.record("data.pkl")
    if "version" not in records and ".data/version" not in records:
        raise CorruptCheckpointError(f"{path}: the archive has no 'version' record", path=path, record="version")
    return archive


def _decode(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptCheckpointError(f"{path}: a record name is not valid UTF-8: {raw[:80]!r}", path=path) from None


def _is_payload(record: Record) -> bool:
    return record.name.startswith("data/")


def _checks(record: Record, verify: bool) -> bool:
    # torch.save(..., compute_crc32=False) records CRC 0: nothing to compare against.
    return verify and not (record.crc == 0 and record.size > 0)


class RecordReader:
    """Reads records of a file in the background through the engine, checking
    CRC-32s if `verify`; get(key) waits for just that record, so the caller can
    use early records while later ones arrive.

    `records` is [(key, Record)]: any hashable keys, so records of several
    archives in one file (a DCP rank file) can share one read. With
    keep=False the records are only checksummed (verification).
    `destinations` maps keys to (address, owner): that record is read into
    the memory at `address` (e.g. a live tensor's), which `owner` keeps
    alive, instead of into a fresh buffer. Records that are not tensor
    payloads (pickles, versions: a DCP rank file has several per item)
    share one buffer."""

    def __init__(self, path: str, records: Iterable[tuple[Hashable, Record]], *, verify: bool, keep: bool = True,
                 destinations: Mapping[Any, tuple[int, object]] | None = None) -> None:
        self._buffers: dict[Hashable, _C.AlignedBuffer | memoryview] = {}
        self._index: dict[Hashable, int] = {}
        destinations = destinations or {}
        records = list(records)
        owners: list[object] = []
        requests: list[tuple[str, int, int, int, int, bool, int, int]] = []
        shared: _C.AlignedBuffer | None = None
        shared_at: dict[Hashable, int] = {}
        if keep:
            total = 0
            for key, r in records:
                if key not in destinations and not _is_payload(r) and r.size > 0:
                    shared_at[key] = total
                    total += -(-r.size // 8) * 8
            if total:
                shared = _C.AlignedBuffer(total, -(-total // _PAGE) * _PAGE)
                owners.append(shared)
                view = memoryview(shared)
        for key, r in records:
            address = capacity = 0
            if key in destinations:
                address, owner = destinations[key]
                capacity = r.size
                owners.append(owner)
            elif key in shared_at:
                start = shared_at[key]
                assert shared is not None  # allotted a part of it
                self._buffers[key] = view[start:start + r.size]
                address, capacity = shared.address + start, r.size
            elif keep:
                buf = _C.AlignedBuffer(r.size, -(-r.size // _PAGE) * _PAGE)
                self._buffers[key] = buf
                address, capacity = buf.address, buf.capacity
            self._index[key] = len(requests)
            requests.append(
                (r.name, r.header_offset, r.end_offset, r.size, r.crc, _checks(r, verify), address, capacity)
            )
        # The ticket keeps the buffers alive until the engine is done with them.
        buffers: list[object] = [b for b in self._buffers.values() if not isinstance(b, memoryview)]
        self._ticket = get_engine().read(path, requests, buffers + owners)

    @classmethod
    def of(cls, archive: Archive, *, verify: bool, keep: bool = True) -> RecordReader:
        """Every record of one archive, keyed by name."""
        return cls(archive.path, list(archive.records.items()), verify=verify, keep=keep)

    def has(self, key: Hashable) -> bool:
        """Whether record `key` is part of this read."""
        return key in self._index

    def wait(self, key: Hashable) -> None:
        """Block until record `key` is read (into its buffer or destination) and verified."""
        self._ticket.wait_request(self._index[key])

    def get(self, key: Hashable) -> _C.AlignedBuffer | memoryview:
        """The buffer holding record `key` once read and verified: page-aligned
        for a payload, a slice of the shared buffer for the others."""
        self.wait(key)
        return self._buffers[key]

    def finish(self) -> None:
        """Wait for every record; raise the first error (e.g. a CRC mismatch)."""
        try:
            self._ticket.wait()
        except BaseException:
            self.abandon()
            raise
        self._ticket.check()

    def abandon(self) -> None:
        """Stop reading and return once the engine no longer writes anywhere."""
        self._ticket.cancel()
        self._ticket.wait_uninterruptible()

    def written(self, key: Hashable) -> bool:
        """Once finished or abandoned: whether any bytes of record `key` reached its destination."""
        return self._ticket.written()[self._index[key]]


def read_small_records(path: str, archives: Mapping[_K, Archive], *, verify: bool) -> dict[_K, dict[str, bytes]]:
    """{key: {name: bytes}} of every record that is not a tensor payload (the
    pickle, byteorder, version, ...) of each archive in `archives` ({key:
    Archive}, all in file `path`): small, read in one engine job."""
    requests = [((key, name), r) for key, arc in archives.items() for name, r in arc.records.items()
                if not _is_payload(r)]
    reader = RecordReader(path, requests, verify=verify)
    reader.finish()
    out: dict[_K, dict[str, bytes]] = {key: {} for key in archives}
    for (key, name), _ in requests:
        out[key][name] = bytes(reader.get((key, name)))
    return out


def storage_from_buffer(buf: _C.AlignedBuffer | memoryview) -> torch.UntypedStorage:
    """Wrap an engine buffer as a CPU storage without copying; the storage keeps it alive."""
    if len(buf) == 0:
        return torch.UntypedStorage(0)
    return torch.frombuffer(buf, dtype=torch.uint8).untyped_storage()


class _RecordStorage:
    """What torch's zip reader returns from get_storage_from_record: _load
    unwraps it with ``._typed_storage()._untyped_storage``."""

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self._untyped_storage = storage

    def _typed_storage(self) -> _RecordStorage:
        return self


class LoadedArchive:
    """The reader interface torch.serialization._load calls, served from
    records the engine reads (and verifies) in the background, or from
    `known`: {record name: bytes} already read (e.g. the pickle)."""

    def __init__(self, archive: Archive, reader: RecordReader | None,
                 key: Callable[[str], Hashable] = lambda name: name, known: Mapping[str, bytes] | None = None,
                 storages: Mapping[str, torch.UntypedStorage] | None = None) -> None:
        self._archive = archive
        self._reader = reader
        self._key = key  # record name -> the reader's key
        self._known = known or {}
        self._storages = storages or {}  # record name -> an UntypedStorage already holding its bytes

    def has_record(self, name: str) -> bool:
        return name in self._archive.records

    def get_record(self, name: str) -> bytes:
        if name in self._known:
            return self._known[name]
        assert self._reader is not None, name  # without a reader, `known` holds every record read
        return bytes(self._reader.get(self._key(name)))

    def get_storage_from_record(self, name: str, numel: int, storage_type: object) -> _RecordStorage:
        self.check_size(name, numel)
        if name in self._storages:
            return _RecordStorage(self._storages[name])
        assert self._reader is not None, name  # without a reader, `storages` holds every payload
        return _RecordStorage(storage_from_buffer(self._reader.get(self._key(name))))

    def check_size(self, name: str, nbytes: int) -> None:
        """The pickle's idea of a record's size must be the directory's."""
        record = self._archive.record(name)
        if record.size != nbytes:
            raise CorruptCheckpointError(
                f"{self._archive.path}: record '{name}' holds {record.size} bytes but the pickle expects {nbytes}",
                path=self._archive.path,
                record=name,
            )

    def get_all_records(self) -> list[str]:
        return list(self._archive.records)

    def _can_read(self, name: str) -> bool:
        return name in self._known or (self._reader is not None and self._reader.has(self._key(name)))

    def serialization_id(self) -> str:
        if ".data/serialization_id" in self._archive.records and self._can_read(".data/serialization_id"):
            return self.get_record(".data/serialization_id").decode(errors="replace")
        return ""
