"""TorchCheckpointIO: torch.save / torch.load, local paths committed durably,
fsspec URLs (s3://, gs://, memory://, ...) as Lightning's plugin does."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.serialization

from .._paths import make_parent_directories, normalize_path
from ..errors import CheckpointIOError, CheckpointNotFoundError
from ..save_queue import get_queue
from .checkpoint_io import _PATH, CheckpointIO, _reject_storage_options, _to_cpu
from .registration import stands_for

if TYPE_CHECKING:
    from ..background import Staged
    from ..results import SaveResult
    from ..save_queue import SaveHandle

__all__ = ["TorchCheckpointIO"]


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _fsspec() -> ModuleType:
    try:
        import fsspec
    except ImportError:
        raise ImportError("TorchCheckpointIO needs fsspec for URLs: pip install fsspec (and s3fs/gcsfs)") from None
    return fsspec


@stands_for("TorchCheckpointIO")
class TorchCheckpointIO(CheckpointIO):
    """torch.save and torch.load, with the durable commit ckptio uses everywhere.

    Local paths: torch.save into a temporary file beside the destination,
    fsync, rename, fsync the directory; a failed save leaves the old file.
    URLs go through fsspec: the object appears only when the upload completes.
    """

    def __init__(self) -> None:
        super().__init__()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        _reject_storage_options(self, storage_options)
        path = normalize_path(path)
        get_queue().wait_path(path)
        make_parent_directories(path)
        _durable_torch_save(checkpoint, path)

    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = normalize_path(path)
        get_queue().wait_path(path)
        map_location = map_location if map_location is not None else _to_cpu
        if _is_url(path):
            fs, p = _fsspec().core.url_to_fs(path)
            if not fs.exists(p):
                raise CheckpointNotFoundError.missing_checkpoint(path)
            with fs.open(p, "rb") as f:
                return torch.load(f, map_location=map_location, weights_only=weights_only)
        if not os.path.exists(path):
            raise CheckpointNotFoundError.missing_checkpoint(path)
        return torch.load(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: _PATH) -> None:
        path = normalize_path(path)
        get_queue().wait_path(path)
        if _is_url(path):
            fs, p = _fsspec().core.url_to_fs(path)
            if fs.exists(p):
                fs.rm(p, recursive=True)
            return
        from .fast_io import _remove

        _remove(path)

    def _async_save(self, checkpoint: dict[str, Any], path: str, storage_options: Optional[Any],
                    snapshot: Optional[str] = None) -> SaveHandle:
        from ..background import stage

        _reject_storage_options(self, storage_options)
        path = normalize_path(path)
        make_parent_directories(path)
        return stage(checkpoint, path, lambda staged: _write_staged_with_torch_save(staged, path),
                     local=not _is_url(path), snapshot=snapshot)


# --- torch.save from a snapshot ----------------------------------------------

# Staged storages keep the device they came from in the file (e.g. "cuda:0"),
# as torch.save of the original would: a location tagger consulted first.
_staged_locations = threading.local()
_tables_in_use = 0  # how many threads hold a table: the tagger runs for every storage anyone saves
_tables_lock = threading.Lock()


def _tag_staged(storage: Any) -> Optional[str]:
    if not _tables_in_use:
        return None
    table = getattr(_staged_locations, "table", None)
    if table and storage.device.type == "cpu":
        return table.get(storage.data_ptr())
    return None


# Its table is set only around torch.save calls (see pickling._cpu_storages_tag_as_cpu).
_tag_staged.ckptio_silent_in_pickle_state = True  # type: ignore[attr-defined]  # a marker on the function
torch.serialization.register_package(1, _tag_staged, lambda storage, location: None)


@contextmanager
def _original_locations(views: Sequence[torch.UntypedStorage], locations: Sequence[str]) -> Iterator[None]:
    global _tables_in_use
    _staged_locations.table = {v.data_ptr(): loc for v, loc in zip(views, locations) if loc != "cpu" and v.nbytes()}
    with _tables_lock:
        _tables_in_use += 1
    try:
        yield
    finally:
        _staged_locations.table = None
        with _tables_lock:
            _tables_in_use -= 1


def _write_staged_with_torch_save(staged: Staged, path: str) -> SaveResult:
    import time

    from ..results import SaveResult

    start = time.perf_counter()
    obj, views = staged.rebuild()
    with _original_locations(views, staged.state.locations):
        nbytes = _durable_torch_save(obj, path)
    return SaveResult(path, nbytes, time.perf_counter() - start, False)


def _durable_torch_save(obj: object, path: str) -> int:
    """torch.save, committed so that a reader sees the old file or the new one."""
    if _is_url(path):
        fs, p = _fsspec().core.url_to_fs(path)
        buf = io.BytesIO()
        torch.save(obj, buf)
        with fs.transaction:
            with fs.open(p, "wb") as f:
                f.write(buf.getbuffer())
        return buf.getbuffer().nbytes
    from .._paths import check_destination, committed_file, remove_stale_temporaries

    check_destination(path)
    remove_stale_temporaries(os.path.dirname(path) or ".")
    try:
        with committed_file(path, site="torch_save") as f:
            torch.save(obj, f)
            return f.tell()
    except CheckpointIOError:
        raise
    except OSError as e:
        raise CheckpointIOError(e.errno or 5, f"torch.save failed: {e.strerror or e}", path) from e
