"""`ckptio inspect` / `ckptio verify` of a torch.distributed.checkpoint
directory: its ``.metadata`` (read weights-only, as ckptio's StorageReader
reads it), its rank files, and every item's CRC-32s and pickle.

An item of a rank file is a torch.save archive at an offset (a stream
transform's output, e.g. compressed, for items written with ``_extensions``).
Archives are checked in one engine read per rank file; after a mismatch each
archive of that file is checked on its own, so every damaged item is named."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .cli_checks import refused_globals
from .cli_outcome import CliFailure, failure_from, plain

if TYPE_CHECKING:
    from .archive import Archive, Record

__all__ = ["Chunk", "Entry", "DcpCheck", "check_dcp"]

Window = tuple[int, int]  # (offset, length) of an item inside its rank file

OK, DAMAGED, UNSAFE, UNCHECKED, NO_CRC = "ok", "damaged", "unsafe", "unchecked", "no checksum"


@dataclass
class Chunk:
    """One stored piece of an item: where it lives and what its check found."""
    fqn: str
    file: str  # relative to the checkpoint directory
    rank: int | str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()
    kind: str = "tensor"  # or "bytes" (a BYTES item may be raw bytes of a planner's own format)
    state: str = UNCHECKED
    detail: str = ""  # the damage, refusal or reason it was not checked


@dataclass
class Entry:
    """One item of the state dict (a tensor, possibly in several chunks, or BYTES)."""
    fqn: str
    kind: str  # "tensor" or "bytes"
    dtype: str = ""
    shape: tuple[int, ...] | None = None
    chunks: list[Chunk] = field(default_factory=list)


@dataclass
class DcpCheck:
    directory: str
    files: dict[str, tuple[int | str, int | None]]  # relative path -> (rank, size; None if missing)
    entries: list[Entry]

    def chunks(self) -> list[Chunk]:
        return [c for e in self.entries for c in e.chunks]

    def with_state(self, state: str) -> list[Chunk]:
        return [c for c in self.chunks() if c.state == state]


def check_dcp(directory: str) -> DcpCheck:
    """Read and check the DCP checkpoint in `directory`. A metadata file that
    cannot be read raises CliFailure (DAMAGED, UNSAFE, ...)."""
    from .cli_files import dcp_metadata_files
    from .distributed import StorageReader, _rank_of

    reader = StorageReader(directory)
    entries: dict[tuple[str, str], Entry] = {}
    by_file: dict[str, list[Chunk]] = {}
    for name in dcp_metadata_files(directory):
        rank = None if name == ".metadata" else int(name[2:].split(".")[0])
        try:
            metadata = reader.read_metadata(rank=rank)
        except Exception as e:
            raise _metadata_failure(e, directory, name) from e
        _add_items(metadata, name, entries, by_file, _rank_of)
    files: dict[str, tuple[int | str, int | None]] = {}
    for rel, chunks in sorted(by_file.items()):
        chunks.sort(key=lambda c: c.offset)
        files[rel] = (_rank_of(rel), _check_file(directory, rel, chunks, reader))
    return DcpCheck(directory, files, list(entries.values()))


def _add_items(metadata: Any, source: str, entries: dict[tuple[str, str], Entry], by_file: dict[str, list[Chunk]],
               rank_of: Any) -> None:
    """The items one metadata file describes, and the chunks of each rank file."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            entries[(source, fqn)] = Entry(fqn, "bytes")
        else:
            entries[(source, fqn)] = Entry(fqn, "tensor", str(md.properties.dtype).replace("torch.", ""),
                                           tuple(md.size))
    for index, info in (metadata.storage_data or {}).items():
        rel = os.fspath(info.relative_path) if isinstance(info.relative_path, (str, os.PathLike)) else str(
            info.relative_path)
        entry = entries.setdefault((source, index.fqn), Entry(index.fqn, "?"))
        chunk = Chunk(index.fqn, rel, rank_of(rel), int(info.offset), int(info.length),
                      tuple(getattr(info, "transform_descriptors", None) or ()), entry.kind)
        entry.chunks.append(chunk)
        by_file.setdefault(rel, []).append(chunk)


def _metadata_failure(e: Exception, directory: str, name: str) -> CliFailure:
    """A metadata file that cannot be read, named as the part of the checkpoint it is."""
    failure = failure_from(e, os.path.join(directory, name))
    word, rest = "", failure.message
    for prefix in ("damaged: ", "unsafe: ", "bad setting: "):
        if rest.startswith(prefix):
            word, rest = prefix, rest[len(prefix):]
    return CliFailure(failure.code, f"{word}{name}: {rest}")


def _check_file(directory: str, rel: str, chunks: list[Chunk], reader: Any) -> int | None:
    """Check every chunk stored in rank file `rel`; its size (None: missing)."""
    from .distributed import _join_inside
    from .errors import CorruptCheckpointError

    try:
        path = _join_inside(directory, rel)
    except CorruptCheckpointError as e:
        _mark(chunks, DAMAGED, plain(str(e), directory))
        return None
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        _mark(chunks, DAMAGED, f"its rank file {rel} is missing")
        return None
    except OSError as e:
        raise failure_from(e, path) from e
    inside = []
    for c in chunks:
        if c.offset < 0 or c.offset + c.length > size:
            _mark([c], DAMAGED, f"{rel} is truncated: the item ends at byte {c.offset + c.length:,}, the file at "
                                f"{size:,}")
        elif c.transforms:
            _check_transformed(path, c, reader)
        else:
            inside.append(c)
    _check_archives(path, inside)
    return size


def _check_archives(path: str, chunks: list[Chunk]) -> None:
    """CRC-32s and pickles of the chunks stored as plain torch.save archives."""
    from . import archive as A
    from .errors import CorruptCheckpointError

    archives: dict[Window, Archive] = {}
    windows = {(c.offset, c.length): c for c in chunks}
    try:
        archives = A.open_archives(path, list(windows))
    except CorruptCheckpointError:  # name each one that is broken
        for w, c in windows.items():
            try:
                archives[w] = A.open_archive(path, base=w[0], size=w[1])
            except CorruptCheckpointError as e:
                if c.kind == "bytes" and _looks_raw(path, w):
                    _mark([c], NO_CRC, "not an archive: raw bytes without a checksum")
                else:
                    _mark([c], DAMAGED, plain(str(e), path))
    if not archives:
        return
    bad = _crc_failures(path, archives)
    for w, arc in archives.items():
        c = windows[w]
        if w in bad:
            _mark([c], DAMAGED, bad[w])
            continue
        try:
            pickle_bytes = A.read_small_records(path, {w: arc}, verify=True)[w]["data.pkl"]
        except CorruptCheckpointError as e:
            _mark([c], DAMAGED, plain(str(e), path))
            continue
        _mark_pickle(c, pickle_bytes)


def _crc_failures(path: str, archives: dict[Window, Archive]) -> dict[Window, str]:
    """{window: damage} of the archives whose records fail their CRC-32."""
    from . import archive as A
    from .errors import CorruptCheckpointError

    def read(items: dict[Window, Archive]) -> None:
        records: list[tuple[Hashable, Record]] = []
        for w, arc in items.items():
            for name, r in arc.records.items():
                records.append(((w, name), A.Record(f"{name} at offset {w[0]}", r.header_offset, r.end_offset,
                                                    r.size, r.crc)))
        A.RecordReader(path, records, verify=True, keep=False).finish()

    try:
        read(archives)
        return {}
    except CorruptCheckpointError:
        pass
    bad = {}
    for w, arc in archives.items():
        try:
            read({w: arc})
        except CorruptCheckpointError as e:
            bad[w] = plain(str(e), path)
    return bad


def _check_transformed(path: str, c: Chunk, reader: Any) -> None:
    """An item written through stream transforms: decode it as DCP's reader
    does, then check the torch.save archive inside with zipfile."""
    with open(path, "rb") as f:
        f.seek(c.offset)
        raw = f.read(c.length)
    names = ", ".join(c.transforms)
    try:  # (reader.transforms: DCP's decoder of stream transforms, absent before torch 2.7)
        stream = reader.transforms.transform_load_stream(None, c.transforms, io.BytesIO(raw))
    except Exception as e:  # noqa: BLE001 - an unknown extension, or its module missing
        _mark([c], UNCHECKED, f"cannot undo stream transform {names}: {plain(str(e))}")
        return
    try:
        data = stream.read(-1)
    except Exception as e:  # noqa: BLE001 - a known transform that cannot decode these bytes
        _mark([c], DAMAGED, f"stream transform {names} cannot decode the item: {plain(str(e))}")
        return
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
            bad = z.testzip()
            pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            pickle_bytes = z.read(pkl) if pkl and bad is None else None
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        _mark([c], DAMAGED, f"decoded with {names}, it is not a torch.save archive ({e})")
        return
    if bad is not None:
        _mark([c], DAMAGED, f"CRC-32 mismatch in record {bad.split('/', 1)[-1]!r} (decoded with {names})")
    elif pickle_bytes is not None:
        _mark_pickle(c, pickle_bytes)


def _mark_pickle(c: Chunk, pickle_bytes: bytes) -> None:
    refused = refused_globals(pickle_bytes)
    if refused:
        _mark([c], UNSAFE, f"its pickle names {', '.join(refused)}, which weights-only loading refuses")
    else:
        _mark([c], OK, "")


def _looks_raw(path: str, w: Window) -> bool:
    """A BYTES item a custom planner wrote in its own format (not an archive)."""
    with open(path, "rb") as f:
        f.seek(w[0])
        return f.read(4) != b"PK\x03\x04"


def _mark(chunks: list[Chunk], state: str, detail: str) -> None:
    for c in chunks:
        c.state, c.detail = state, detail
