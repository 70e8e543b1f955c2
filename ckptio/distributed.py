"""torch.distributed.checkpoint storage on ckptio's engine.

``StorageWriter`` and ``StorageReader`` keep DCP's on-disk layout (one
``__<rank>_0.distcp`` file per rank, every tensor item a torch.save archive at
an offset, ``.metadata`` pickled by the coordinator), so checkpoints move both
ways between them and DCP's stock FileSystemWriter/FileSystemReader. What
changes is how bytes reach the disk:

- each rank's file is assembled by the engine (4096-aligned archives with
  real CRC-32s, O_DIRECT, several blocks in flight) under a temporary name,
  fsynced, renamed and its directory fsynced before write_data reports it;
  the coordinator writes ``.metadata`` (temp, fsync, rename, directory fsync)
  only after every rank's results arrived, i.e. after every rank's data is
  durable. A rank that fails or dies leaves no ``.metadata``.
- the reader verifies every archive's CRC-32s and names the file, rank and
  item of any damage.
- as an AsyncStager, the writer snapshots into a reusable, pre-faulted
  staging buffer (instead of DCP's default fresh, unpinned copy).
"""

from __future__ import annotations

import io
import os
import re

import torch
import torch.serialization
from torch.futures import Future
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from . import _C
from . import archive as _archive
from ._engine import get_engine
from ._paths import fsync_directory, temporary_path
from .errors import CheckpointIOError, CorruptCheckpointError
from .pickling import ALIGNMENT, pickle_state

__all__ = ["StorageWriter", "StorageReader"]

_SUFFIX = ".distcp"


def _page_round(n: int) -> int:
    return -(-n // 4096) * 4096


class StorageWriter(FileSystemWriter):
    """A DCP StorageWriter that writes each rank's file with ckptio's engine.

    ``dcp.save(state_dict, storage_writer=StorageWriter(path))``; also for
    ``dcp.async_save``, where it stages into its own reusable buffer.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = True):
        super().__init__(os.fspath(path), single_file_per_rank=True, sync_files=True, thread_count=1,
                         cache_staged_state_dict=False, overwrite=overwrite)
        self._staging = None  # staging.Slot, made on first stage()

    # --- writing --------------------------------------------------------------

    def write_data(self, plan, planner) -> Future:
        directory = os.fspath(self.path)
        file_name = f"{plan.storage_data.prefix}0{_SUFFIX}"
        final = os.path.join(directory, file_name)
        tmp = temporary_path(final)

        pieces, end = [], 0  # (item, offset, size, archive records + owners | raw bytes)
        for item in plan.items:
            data = planner.resolve_data(item)
            offset = _page_round(end)
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                pieces.append((item, offset, len(raw), raw))
                end = offset + len(raw)
                continue
            tensor = data.detach()
            if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                tensor = tensor.clone()  # save only this view, as FileSystemWriter does
            state = pickle_state(tensor, "archive")
            records, owners = state.cpu_records()
            size = _C.archive_size([(name, _len(payload)) for name, payload in records], ALIGNMENT)
            pieces.append((item, offset, size, (records, owners)))
            end = offset + size

        try:
            with open(tmp, "wb") as f:
                f.truncate(_page_round(end))
            tickets = []
            for item, offset, size, payload in pieces:
                if isinstance(payload, tuple):
                    records, owners = payload
                    tickets.append(get_engine().save(tmp, records, ALIGNMENT, owners, 0, 0, offset, True))
            for ticket in tickets:
                ticket.wait()
            for ticket in tickets:
                ticket.check()
            fd = os.open(tmp, os.O_WRONLY)
            try:
                for item, offset, size, payload in pieces:
                    if not isinstance(payload, tuple):
                        os.pwrite(fd, payload, offset)
                os.ftruncate(fd, end)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            fsync_directory(directory)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise

        results = [
            WriteResult(index=item.index, size_in_bytes=size, storage_data=_StorageInfo(file_name, offset, size))
            for item, offset, size, _ in pieces
        ]
        fut = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)  # .metadata.tmp, fsync, rename
        fsync_directory(os.fspath(self.path))  # and the rename itself survives a crash

    # --- staging for dcp.async_save ---------------------------------------------

    def stage(self, state_dict):
        """Copy every tensor into this writer's reusable, pre-faulted buffer and
        return the state dict rebuilt over it (DTensors keep mesh and placements).

        The buffer is reused by the next stage(): wait for the previous
        async_save's future before starting another (as DCP's docs advise)."""
        from .staging import StagingArena

        tensors = []
        _collect(state_dict, tensors)
        storages, index = [], {}  # each distinct storage once
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in index:
                index[key] = len(storages)
                storages.append(t.untyped_storage())
        if self._staging is None:
            self._arena = StagingArena(1)
            self._staging = self._arena.acquire()
        payloads = self._arena.snapshot(self._staging, storages)
        views = _storage_views(self._staging, payloads)
        staged = {}
        for t in tensors:
            storage = views[index[(t.untyped_storage().data_ptr(), t.device)]]
            staged[id(t)] = torch.empty(0, dtype=t.dtype).set_(storage, t.storage_offset(), t.shape, t.stride())
        return _rebuild(state_dict, staged)

    def synchronize_staging(self) -> None:
        pass  # stage() returns once the copies are complete

    def close(self) -> None:
        self._staging = None


def _storage_views(slot, payloads) -> list:
    """Each snapshotted storage as its own CPU storage over the slot (no copy)."""
    mv = memoryview(slot.buffer)
    base = slot.buffer.address
    return [torch.frombuffer(mv[a - base : a - base + n], dtype=torch.uint8).untyped_storage() if n
            else torch.UntypedStorage(0) for a, n in payloads]


def _len(payload) -> int:
    return payload[1] if isinstance(payload, tuple) else len(payload)


def _local(t):
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _collect(obj, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(_local(obj))
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect(v, out)


def _rebuild(obj, staged: dict):
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        local = staged[id(obj._local_tensor)]
        return DTensor.from_local(local, obj.device_mesh, obj.placements, run_check=False, shape=obj.shape,
                                  stride=obj.stride())
    if isinstance(obj, torch.Tensor):
        return staged[id(obj)]
    if isinstance(obj, dict):
        return type(obj)((k, _rebuild(v, staged)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_rebuild(v, staged) for v in obj]
    if isinstance(obj, tuple):
        return type(obj)(_rebuild(v, staged) for v in obj)
    return obj


class StorageReader(FileSystemReader):
    """A DCP StorageReader that reads tensor archives through ckptio's engine
    and verifies their CRC-32s. Reads checkpoints of either writer."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        super().__init__(os.fspath(path))
        self.verify = verify

    def read_data(self, plan, planner) -> Future:
        """Per rank file: parse every tensor archive's directory, read all their
        records in one engine job (parallel, CRC-verified), then rebuild each
        tensor with torch's unpickler and copy it into DCP's target."""
        directory = os.fspath(self.path)
        by_file: dict = {}
        for req in plan.items:
            by_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for relative_path, reqs in by_file.items():
            path = os.path.join(directory, relative_path)
            reqs.sort(key=lambda r: self.storage_data[r.storage_index].offset)
            archives = {}  # (offset, length) -> Archive
            try:
                for req in reqs:
                    info = self.storage_data[req.storage_index]
                    if req.type != LoadItemType.BYTE_IO and (info.offset, info.length) not in archives:
                        archives[(info.offset, info.length)] = _archive.open_archive(
                            path, base=info.offset, size=info.length)
            except FileNotFoundError as e:
                raise CheckpointIOError(2, f"missing checkpoint file of rank {_rank_of(relative_path)}", path) from e
            except CorruptCheckpointError as e:
                raise CorruptCheckpointError(f"{path} (rank {_rank_of(relative_path)}): {e}", path=path) from e
            reader = _archive.RecordReader(
                path, [((span, name), r) for span, arc in archives.items() for name, r in arc.records.items()],
                verify=self.verify)
            for req in reqs:
                self._read_item(req, path, relative_path, archives, reader, planner)
            try:
                reader.finish()
            except CorruptCheckpointError as e:
                raise CorruptCheckpointError(f"{path} (rank {_rank_of(relative_path)}): {e}", path=path) from e
        fut = Future()
        fut.set_result(None)
        return fut

    def _read_item(self, req, path, relative_path, archives, reader, planner) -> None:
        from torch.distributed._shard._utils import narrow_tensor_by_index

        info: _StorageInfo = self.storage_data[req.storage_index]
        where = f"{path} (rank {_rank_of(relative_path)}, item {req.storage_index.fqn!r})"
        if req.type == LoadItemType.BYTE_IO:
            with open(path, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
            if len(raw) != info.length:
                raise CorruptCheckpointError(f"{where}: file is truncated", path=path, record=req.storage_index.fqn)
            planner.load_bytes(req, io.BytesIO(raw))
            return
        span = (info.offset, info.length)
        try:
            tensor = torch.serialization._load(
                _archive.LoadedArchive(archives[span], reader, key=lambda name: (span, name)), "cpu",
                torch._weights_only_unpickler, encoding="utf-8")
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{where}: {e}", path=path, record=req.storage_index.fqn) from e
        tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise CorruptCheckpointError(f"{where}: size {tuple(tensor.size())}, expected {tuple(target.size())}",
                                         path=path, record=req.storage_index.fqn)
        target.copy_(tensor)
        planner.commit_tensor(req, target)


def _rank_of(file_name: str):
    m = re.match(r"__(\d+)_", file_name)
    return int(m.group(1)) if m else "?"
