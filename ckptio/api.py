"""ckptio's user-facing verbs: save, load, verify."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import re
import struct
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.serialization

from . import _C, archive as _archive, remote
from ._engine import get_engine
from ._paths import check_destination, normalize_path, remove_stale_temporaries
from .config import verify_by_default
from .errors import (
    CheckpointNotFoundError,
    CkptioError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    globals_refused_in,
)
from .lazy_snapshot import wait_snapshots
from .pickling import ALIGNMENT, pickle_state
from .results import SaveResult, VerifyResult
from .save_queue import SaveHandle, get_queue

__all__ = ["SaveResult", "VerifyResult", "save", "async_save", "wait", "wait_snapshots", "load", "verify"]

_T = TypeVar("_T")
# What torch.load takes as map_location: a device (or its name), a {location: location} dict, or a callable.
MapLocation = Any


def _wait(ticket: _C.Ticket) -> None:
    """Wait for an engine job; on Ctrl-C cancel it (nothing is committed) and re-raise."""
    try:
        ticket.wait()
    except BaseException:
        ticket.cancel()
        ticket.wait_uninterruptible()
        raise
    ticket.check()


def save(obj: object, path: str | os.PathLike[str]) -> SaveResult:
    """Write `obj` to `path` as torch.save would, durably.

    When this returns the file is complete, fsynced and renamed into place; if
    it raises, whatever was at `path` before is untouched and no temporary
    file remains. Async saves of `path` queued earlier land first.
    """
    path = normalize_path(path)
    get_queue().wait_path(path)
    if remote.is_url(path):
        records, owners = pickle_state(obj, path).cpu_records()
        return remote.save_records_to_url(records, path)
    check_destination(path)
    state = pickle_state(obj, path)
    records, owners = state.cpu_records()
    remove_stale_temporaries(os.path.dirname(path))
    ticket = get_engine().save(path, records, ALIGNMENT, owners)
    _wait(ticket)
    return SaveResult.from_stats(ticket.stats())


def async_save(obj: object, path: str | os.PathLike[str], *, snapshot: str | None = None) -> SaveHandle:
    """Snapshot `obj` and write it to `path` in the background.

    snapshot="eager" (the default, or CKPTIO_SNAPSHOT) returns once every
    tensor's bytes are copied into the staging arena: the caller may then
    modify or free them. snapshot="lazy" returns sooner: the parameters and
    state of optimizers that have stepped are copied in the background, and
    the next ``optimizer.step()`` (or ckptio call, ``handle.wait_snapshot()``,
    ``ckptio.wait_snapshots()``) waits for that copy; until then, only that
    step may change them. Either way the file holds the state at the call.

    The handle is Future-like (``done()``, ``result(timeout)``, ``wait()``,
    ``exception()``) and carries ``stall_seconds``; its result is the
    SaveResult. Saves land in the order they were made. A failure is raised
    by the handle, or else once by the next ckptio call (save, load,
    async_save, wait).
    """
    from .background import NativeWrite, stage, streaming_native_save, write_native

    path = normalize_path(path)
    if remote.is_url(path):
        return stage(obj, path, lambda staged: remote.save_records_to_url(staged.records(), path), local=False,
                     snapshot=snapshot)
    return stage(obj, path, lambda staged: write_native(staged, path), stream=streaming_native_save,
                 snapshot=snapshot, native=NativeWrite())


def wait() -> None:
    """Block until every async save is durable; raise a failure nobody has seen."""
    get_queue().wait_all()


def _resolve_weights_only(weights_only: bool | None) -> bool:
    # The same rules as torch.load, including its environment overrides.
    true_values = ("1", "y", "yes", "true")
    if os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in true_values:
        return True
    if weights_only is None:
        return os.getenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() not in true_values
    return bool(weights_only)


def _is_meta(map_location: MapLocation) -> bool:
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location).type == "meta"
    return False


def load(
    path: str | os.PathLike[str],
    map_location: MapLocation = None,
    *,
    weights_only: bool | None = True,
    mmap: bool = False,
    verify: bool | None = None,
) -> Any:
    """Load a checkpoint written by ckptio.save or torch.save.

    The result is what ``torch.load(path, map_location, weights_only=...,
    mmap=...)`` returns: torch's own unpickler (and, with weights_only=True,
    its allowlist) rebuilds the object. The payloads are read in parallel by
    the engine and, unless verify=False (or CKPTIO_VERIFY=0), every record's
    CRC-32 is checked first: a damaged file raises CorruptCheckpointError
    naming the record instead of returning wrong tensors.

    mmap=True and map_location="meta" read no payloads here; verify then
    reads the file once to check it before torch.load maps it.
    """
    path = normalize_path(path)
    get_queue().wait_path(path)
    verify = verify_by_default() if verify is None else bool(verify)
    weights_only = _resolve_weights_only(weights_only)
    if remote.is_url(path):
        return _load_remote(path, map_location, weights_only, verify, mmap)
    if not os.path.exists(path):
        raise CheckpointNotFoundError.missing_checkpoint(path)
    if os.path.isfile(path) and os.path.getsize(path) > 0 and not _archive.is_zip_checkpoint(path):
        return _load_legacy(path, map_location, weights_only)

    arc = _archive.open_archive(path)
    if "constants.pkl" in arc.records:
        raise CkptioError(f"{path}: is a TorchScript archive; load it with torch.jit.load")
    if mmap or _is_meta(map_location):
        if verify:
            _archive.RecordReader.of(arc, verify=True, keep=False).finish()
        return _torch_load(path, map_location, weights_only, mmap=mmap)

    # Unpickling runs while the engine is still reading: each storage waits
    # only for its own record.
    reader = _archive.RecordReader.of(arc, verify=verify)
    result = unpickle_archive(_archive.LoadedArchive(arc, reader), map_location, weights_only, path)
    reader.finish()  # records the pickle never referenced are verified too
    return result


def _load_remote(url: str, map_location: MapLocation, weights_only: bool, verify: bool, mmap: bool) -> Any:
    """A checkpoint at an fsspec URL: parallel ranged reads straight into
    memory (remote_read); legacy files and mmap/meta loads use a downloaded
    copy instead."""
    from .remote_read import fetch_archive, zip_object_size

    fs, path = remote.fs_for(url)
    size = None if mmap or _is_meta(map_location) else zip_object_size(fs, path, url)
    if size is None:
        return with_local_copy(url, lambda local: load(local, map_location, weights_only=weights_only, mmap=False,
                                                       verify=verify))
    archive, known, storages = fetch_archive(url, fs, path, size, verify=verify)
    if "constants.pkl" in archive.records:
        raise CkptioError(f"{url}: is a TorchScript archive; load it with torch.jit.load")
    loaded = _archive.LoadedArchive(archive, None, known=known, storages=storages)
    return unpickle_archive(loaded, map_location, weights_only, url)


def unpickle_archive(zip_reader: Any, map_location: MapLocation, weights_only: bool, path: str) -> Any:
    """torch's own unpickling of an archive (its weights-only unpickler unless
    told), with ckptio's errors for a refusal or a pickle that does not load."""
    unpickler_module = torch._weights_only_unpickler if weights_only else pickle
    with _unpickling(path, weights_only):
        if weights_only:
            _refuse_writes_into_globals(zip_reader.get_record("data.pkl"), path)
        return torch.serialization._load(zip_reader, map_location, unpickler_module, encoding="utf-8")


def _refuse_writes_into_globals(data_pkl: bytes, path: str) -> None:
    """A pickle that BUILDs, SETITEMs or APPENDs into an object a GLOBAL
    gave it would change that object for every later load in the process.
    torch.save never writes one; torch's weights-only unpickler refuses BUILD
    on one but, before torch 2.9, lets SETITEM/APPEND reach the object
    itself. Refused here, the same on every torch release."""
    verdict, reason = _C.check_pickle(data_pkl)
    if verdict == "unsafe":
        raise UnsafeCheckpointError(
            f"Weights only load failed for {path}: data.pkl writes into a shared object ({reason}); "
            "torch.load(weights_only=True) refuses it too.", path=path, record="data.pkl")


# What torch's unpickler raises on a pickle that does not describe a loadable
# object (damaged, read with verify=False, or written wrong): a bad opcode
# argument, a missing record, a rebuild call with impossible arguments.
_DAMAGE = (EOFError, IndexError, KeyError, ValueError, TypeError, AttributeError, RuntimeError, OverflowError,
           struct.error)


# torch's weights-only unpickler on bytes that are no pickle at all (not a refusal).
_NOT_A_PICKLE = re.compile(r"Unsupported operand|String is too long|pickle data was truncated")


@contextlib.contextmanager
def _unpickling(path: str, weights_only: bool) -> Iterator[None]:
    """Turns what torch's unpickler raises into ckptio's errors: a weights-only
    refusal into UnsafeCheckpointError, damage into CorruptCheckpointError."""
    try:
        yield
    except CkptioError:
        raise
    except pickle.UnpicklingError as e:
        if weights_only and not _NOT_A_PICKLE.search(str(e)):
            raise UnsafeCheckpointError(
                f"Weights only load failed for {path}: {e}\nckptio refuses what torch.load(weights_only=True) "
                "refuses. If you trust this file, pass weights_only=False, or allow the named globals with "
                "torch.serialization.add_safe_globals.",
                path=path, record="data.pkl", refused=globals_refused_in(str(e)),
            ) from None
        raise CorruptCheckpointError(f"{path}: data.pkl is not a readable pickle ({e})", path=path,
                                     record="data.pkl") from e
    except _DAMAGE as e:
        if isinstance(e, RuntimeError) and _about_devices(str(e)):
            raise  # the file is fine; this machine lacks its device (torch.load's own error)
        raise CorruptCheckpointError(f"{path}: data.pkl does not describe a loadable object "
                                     f"({type(e).__name__}: {e})", path=path, record="data.pkl") from e


def _about_devices(message: str) -> bool:
    lowered = message.lower()
    return "device" in lowered or "cuda" in lowered or "map_location" in lowered


def with_local_copy(url: str, use: Callable[[str], _T]) -> _T:
    """use(local path) on a downloaded copy of the object at `url`, removed afterwards."""
    local = remote.download(url)
    try:
        return use(local)
    finally:
        os.remove(local)


def _torch_load(path: str, map_location: MapLocation, weights_only: bool, mmap: bool) -> Any:
    with _unpickling(path, weights_only):
        return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)


def _load_legacy(path: str, map_location: MapLocation, weights_only: bool) -> Any:
    """Files from before torch 1.6 (not zip): torch.load reads them; nothing to verify."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] != b"\x80":  # a legacy torch file starts with a pickle PROTO opcode
        raise CorruptCheckpointError(
            f"{path}: not a checkpoint (neither a torch.save zip archive nor a legacy torch file)", path=path
        )
    try:
        return _torch_load(path, map_location, weights_only, mmap=False)
    except CorruptCheckpointError as e:
        if isinstance(e, UnsafeCheckpointError):
            raise
        raise CorruptCheckpointError(f"{path}: not a readable checkpoint (a damaged legacy torch.save file: "
                                     f"{e.__cause__ or e})", path=path) from e


def verify(path: str | os.PathLike[str]) -> VerifyResult:
    """Check the structure and every CRC-32 of a checkpoint without loading it.

    Raises CorruptCheckpointError naming the damaged record. Records written
    without a CRC (torch.save with compute_crc32=False stores 0) are checked
    for structure only.
    """
    path = normalize_path(path)
    wait_snapshots()
    if remote.is_url(path):
        return with_local_copy(path, lambda local: dataclasses.replace(verify(local), path=path))
    if not os.path.exists(path):
        raise CheckpointNotFoundError.missing_checkpoint(path)
    if os.path.getsize(path) == 0 or not _archive.is_zip_checkpoint(path):
        raise CorruptCheckpointError(f"{path}: not a torch.save zip archive", path=path)
    arc = _archive.open_archive(path)
    _archive.RecordReader.of(arc, verify=True, keep=False).finish()
    return VerifyResult(path, len(arc.records), sum(r.size for r in arc.records.values()))
