"""Checkpoints at fsspec URLs (s3://, gs://, memory://, file://).

A save streams the archive in file order straight from the records' memory
(the staging slot, for async saves) into an fsspec file opened for writing:
object stores upload it in parts of `block_size`, so memory stays at a part
or two, never the whole file. CRCs are computed as the payloads pass. The
object becomes visible only when the upload completes (S3 completes a
multipart upload atomically); on any error the upload is aborted and its
file object closed for good (see _abandon_upload), so a reader never sees a
partial object and the previous one, if any, stays.

A load downloads to a temporary local file and reads it like any local
checkpoint (CRC-verified).

A remote tier may also be a ``file://`` directory (another disk, an NFS or
Lustre mount): its copies are committed like local checkpoints (temporary
file, fsync, rename), so they too appear whole or not at all.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from . import _C
from ._paths import committed_file, make_parent_directories, normalize_path
from .errors import CheckpointIOError, CheckpointNotFoundError
from .results import SaveResult

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from .pickling import NamedPayload, Payload

__all__ = ["is_url", "save_records_to_url", "upload_file", "download"]

PART_BYTES = 16 << 20  # one upload part; memory held by a remote save


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def is_directory_url(url: str) -> bool:
    """A file:// URL: a remote tier that is a directory of the local filesystem."""
    return url.startswith("file://")


S3_PROTOCOLS = ("s3", "s3a")
S3_ATTEMPTS = 3  # botocore's attempts per request (its own default mode makes 5)


def fs_for(url: str) -> tuple[AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for `url`.

    An S3 filesystem gets CKPTIO_REMOTE_TIMEOUT_S as its connect and read
    timeouts and a few attempts per request, filling in what the user's
    fsspec config (``fsspec.config.conf["s3"]["config_kwargs"]``) does not
    say: an endpoint that accepts a connection and never answers then fails
    a request in bounded time instead of s3fs's and botocore's retries
    multiplying into many minutes."""
    try:
        import fsspec
    except ImportError:
        raise ImportError("remote checkpoints need fsspec (and s3fs / gcsfs): pip install 'ckptio[fsspec]'") from None
    protocol, _ = fsspec.core.split_protocol(url)
    handed = next((options for prefix, options in _HANDED_OPTIONS.items()
                   if url.rstrip("/") == prefix or url.startswith(prefix + "/")), None)
    kwargs = {k: v for k, v in (handed or {}).items() if k != "config_kwargs"}  # over this process's own config
    if protocol in S3_PROTOCOLS:
        user_conf = handed if handed is not None else fsspec.config.conf.get(protocol, {})
        return fsspec.core.url_to_fs(url, **kwargs, config_kwargs=_s3_config_kwargs(user_conf))
    return fsspec.core.url_to_fs(url, **kwargs)


# The checkpoint service makes the remote copies of trainers whose fsspec
# config (endpoint, credentials, ...) it does not share: each hands its own
# over with the copy, and it applies to that tier's URLs (see fs_for).
_HANDED_OPTIONS: dict[str, dict[str, Any]] = {}


def options_to_hand_over(prefix: str) -> dict[str, Any] | None:
    """This process's fsspec config for `prefix`'s protocol, for another
    process to use ({} for none); None if it cannot travel as JSON."""
    import json

    import fsspec

    protocol, _ = fsspec.core.split_protocol(prefix)
    options = dict(fsspec.config.conf.get(protocol, {}))
    try:
        return json.loads(json.dumps(options))
    except (TypeError, ValueError):
        return None


def use_handed_options(prefix: str, options: dict[str, Any]) -> None:
    """Use `options` (see options_to_hand_over) for every URL under `prefix`, in this process."""
    _HANDED_OPTIONS[prefix.rstrip("/")] = dict(options)


def _s3_config_kwargs(user_conf: dict[str, Any]) -> dict[str, Any]:
    from .config import remote_copy_config

    timeout = remote_copy_config().request_timeout_s
    ours = {"connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": S3_ATTEMPTS}}
    return {**ours, **(user_conf.get("config_kwargs") or {})}


def _payload_view(payload: Payload) -> memoryview:
    """A zero-copy memoryview of a record's bytes ((address, size) or bytes)."""
    if isinstance(payload, tuple):
        address, size = payload
        if size == 0:
            return memoryview(b"")
        import ctypes

        return memoryview((ctypes.c_char * size).from_address(address)).cast("B")
    return memoryview(payload)


def save_records_to_url(records: Sequence[NamedPayload], url: str) -> SaveResult:
    """Stream an archive of `records` [(name, bytes | (address, size))] to `url`.
    REQUIRES: the records' memory stays valid until this returns."""
    start = time.perf_counter()
    fs, path = fs_for(url)
    from .pickling import ALIGNMENT  # here: the checkpoint service copies files with this module, and has no torch

    layout = _C.ArchiveLayout([(name, _size(p)) for name, p in records], ALIGNMENT)
    crcs = []
    try:
        f = fs.open(path, "wb", block_size=PART_BYTES)
    except OSError as e:
        raise CheckpointIOError(e.errno or 5, f"cannot open for writing: {e}", url) from e
    try:
        for i, (_name, payload) in enumerate(records):
            header = layout.header(i)
            f.write(header)
            view = _payload_view(payload)
            crc = 0
            for pos in range(0, len(view), PART_BYTES):  # CRC and upload as the bytes pass
                chunk = view[pos : pos + PART_BYTES]
                crc = _C.crc32(chunk, crc)
                f.write(chunk)
            crcs.append(crc)
            if len(view):
                f.write(layout.descriptor(i, crc))
        f.write(layout.tail(crcs))
        f.close()  # completes the upload: the object appears whole, now
    except BaseException as e:
        _abandon_upload(f)
        if isinstance(e, OSError) and not isinstance(e, CheckpointIOError):
            raise CheckpointIOError(e.errno or 5, f"upload failed: {e}", url) from e
        if isinstance(e, Exception) and not isinstance(e, (CheckpointIOError, OSError)):
            raise CheckpointIOError(5, f"upload failed: {type(e).__name__}: {e}", url) from e
        raise
    return SaveResult(url, layout.file_size, time.perf_counter() - start, False, PART_BYTES)


class UploadCancelled(Exception):
    """The upload's caller gave up on it (its deadline passed): it was aborted."""


def upload_file(source: BinaryIO, url: str, cancelled: Callable[[], bool] = lambda: False) -> SaveResult:
    """Stream the file `source` (a checkpoint, read from where it is) to
    `url`, in parts; the object appears whole when the upload completes,
    never partly. `cancelled()` is asked between parts: once it is true the
    upload is aborted (so a copy abandoned while a request hung can never
    complete later, when that request comes back)."""
    start = time.perf_counter()
    if is_directory_url(url):
        return _copy_into_directory(source, url, cancelled, start)
    fs, path = fs_for(url)
    try:
        f = fs.open(path, "wb", block_size=PART_BYTES)
    except OSError as e:
        raise CheckpointIOError(e.errno or 5, f"cannot open for writing: {e}", url) from e
    size = 0
    try:
        while True:
            if cancelled():
                raise UploadCancelled(f"upload to {url} cancelled")
            chunk = source.read(PART_BYTES)
            if not chunk:
                break
            f.write(chunk)
            size += len(chunk)
        if cancelled():  # close() would complete it: the last chance to say no
            raise UploadCancelled(f"upload to {url} cancelled")
        f.close()
    except BaseException as e:
        _abandon_upload(f)
        if isinstance(e, Exception) and not isinstance(e, (CheckpointIOError, UploadCancelled)):
            raise CheckpointIOError(getattr(e, "errno", None) or 5, f"upload failed: {type(e).__name__}: {e}",
                                    url) from e
        raise
    return SaveResult(url, size, time.perf_counter() - start, False, PART_BYTES)


def _copy_into_directory(source: BinaryIO, url: str, cancelled: Callable[[], bool], start: float) -> SaveResult:
    """upload_file for a file:// URL: a committed local file (a cancelled
    or failed copy leaves only the previous file, if any)."""
    path = normalize_path(url)
    size = 0
    try:
        make_parent_directories(path)
        with committed_file(path, site="remote") as f:
            while chunk := source.read(PART_BYTES):
                if cancelled():
                    raise UploadCancelled(f"copy to {url} cancelled")
                f.write(chunk)
                size += len(chunk)
            if cancelled():  # the rename would publish it: the last chance to say no
                raise UploadCancelled(f"copy to {url} cancelled")
    except OSError as e:
        if isinstance(e, CheckpointIOError):
            raise
        raise CheckpointIOError(e.errno or 5, f"copy failed: {e.strerror or e}", url) from e
    return SaveResult(url, size, time.perf_counter() - start, False, PART_BYTES)


def write_small_file(url: str, data: bytes) -> None:
    """Replace the small object `url` (a pointer) whole: one PUT for an
    object store, a committed file for a file:// directory."""
    if is_directory_url(url):
        path = normalize_path(url)
        make_parent_directories(path)
        with committed_file(path, site="remote") as f:
            f.write(data)
        return
    fs, path = fs_for(url)
    fs.pipe_file(path, data)


ABORT_ATTEMPTS = 3  # a failed abort is retried after 0.2 s, then 1 s


def _abandon_upload(f: Any) -> None:
    """Make a failed upload impossible to complete, ever.

    fsspec's buffered file completes its upload in close(), and its
    ``__del__`` calls close() on a file not yet closed: a file left open by a
    failed save would, once garbage-collected with the server reachable
    again, *complete* the multipart upload of a truncated archive over the
    previous object. So the file is marked closed whatever happens, and the
    upload is aborted (S3: AbortMultipartUpload), retried a little when the
    abort itself fails; an upload that cannot be aborted stays incomplete,
    which no reader ever sees (object stores expire such uploads)."""
    try:
        for attempt in range(ABORT_ATTEMPTS):
            try:
                f.discard()
                return
            except Exception:
                if attempt + 1 < ABORT_ATTEMPTS:
                    time.sleep((0.2, 1.0)[attempt])
    finally:
        try:
            f.closed = True  # close() and __del__ now do nothing: no flush, no completion
        except AttributeError:
            pass  # not an fsspec buffered file (memory:// writes an io.BytesIO): nothing completes late


def _size(payload: Payload) -> int:
    return payload[1] if isinstance(payload, tuple) else len(payload)


def download(url: str, directory: str | None = None) -> str:
    """Copy the object at `url` to a local temporary file; returns its path (caller removes it)."""
    fs, path = fs_for(url)
    try:
        if not fs.exists(path):
            raise CheckpointNotFoundError.missing_checkpoint(url)
    except CheckpointNotFoundError:
        raise
    except Exception as e:
        raise CheckpointIOError(5, f"cannot reach the checkpoint: {type(e).__name__}: {e}", url) from e
    fd, local = tempfile.mkstemp(prefix=".ckptio-download-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out, fs.open(path, "rb", block_size=PART_BYTES) as src:
            while True:
                chunk = src.read(PART_BYTES)
                if not chunk:
                    break
                out.write(chunk)
    except BaseException:
        os.remove(local)
        raise
    return local
