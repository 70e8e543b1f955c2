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
  staging buffer (instead of DCP's default fresh, unpinned copy). Plain
  tensors, DTensors (their local tensor) and ShardedTensors (their local
  shards) are staged; the writer stays picklable, so
  ``async_checkpointer_type=AsyncCheckpointerType.PROCESS`` works (the copy
  sent to DCP's checkpoint process leaves the staging buffer behind).
"""

from __future__ import annotations

import copy
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
        self._arena = None    # staging.StagingArena and its one Slot, made on first stage()
        self._staging = None

    def __getstate__(self):
        """DCP pickles the writer to hand it to its checkpoint process
        (``AsyncCheckpointerType.PROCESS``). The staging buffer (native memory)
        and the arena's lock stay here: the copy there only writes, from the
        state dict it is sent with, and never stages."""
        state = self.__dict__.copy()
        state["_arena"] = None
        state["_staging"] = None
        return state

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
        return the state dict rebuilt over it (DTensors keep mesh and
        placements; ShardedTensors keep their sharding metadata, with CPU
        placements as the stock stager's ``.cpu()`` gives them).

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
        self._arena = None


def _storage_views(slot, payloads) -> list:
    """Each snapshotted storage as its own CPU storage over the slot (no copy)."""
    mv = memoryview(slot.buffer)
    base = slot.buffer.address
    return [torch.frombuffer(mv[a - base : a - base + n], dtype=torch.uint8).untyped_storage() if n
            else torch.UntypedStorage(0) for a, n in payloads]


def _len(payload) -> int:
    return payload[1] if isinstance(payload, tuple) else len(payload)


def _sharded_tensor_type():
    """ShardedTensor's class, or None where torch.distributed._shard is absent."""
    try:
        from torch.distributed._shard.sharded_tensor import ShardedTensor
    except ImportError:  # pragma: no cover - torch without the _shard package
        return None
    return ShardedTensor


def _collect(obj, out: list, st_type=None) -> None:
    """Every tensor whose bytes a snapshot copies: plain tensors, a DTensor's
    local tensor, a ShardedTensor's local shards (never the ShardedTensor
    itself: it has no storage of its own)."""
    from torch.distributed.tensor import DTensor

    st_type = st_type or _sharded_tensor_type()
    if st_type is not None and isinstance(obj, st_type):
        out.extend(shard.tensor for shard in obj.local_shards())
    elif isinstance(obj, DTensor):
        out.append(obj._local_tensor)
    elif isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect(v, out, st_type)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect(v, out, st_type)


def _rebuild_sharded(st, staged: dict):
    """`st` rebuilt over its staged local shards, as ShardedTensor.cpu() and
    the stock stager build their copies: same global metadata, placements
    moved to the CPU, same process group."""
    from torch.distributed._shard.sharded_tensor import Shard

    def on_cpu(md):
        md = copy.deepcopy(md)
        if md.placement is not None and md.placement.device().type != "cpu":
            md.placement._device = torch.device("cpu")
        return md

    shards = [Shard(staged[id(shard.tensor)], on_cpu(shard.metadata)) for shard in st.local_shards()]
    st_meta = copy.deepcopy(st.metadata())
    st_meta.shards_metadata = [on_cpu(md) for md in st_meta.shards_metadata]
    return type(st)._init_from_local_shards_and_global_metadata(
        shards, st_meta, process_group=st._process_group, init_rrefs=st._init_rrefs)


def _rebuild(obj, staged: dict, st_type=None):
    from torch.distributed.tensor import DTensor

    st_type = st_type or _sharded_tensor_type()
    if st_type is not None and isinstance(obj, st_type):
        return _rebuild_sharded(obj, staged)
    if isinstance(obj, DTensor):
        local = staged[id(obj._local_tensor)]
        return DTensor.from_local(local, obj.device_mesh, obj.placements, run_check=False, shape=obj.shape,
                                  stride=obj.stride())
    if isinstance(obj, torch.Tensor):
        return staged[id(obj)]
    if isinstance(obj, dict):
        return type(obj)((k, _rebuild(v, staged, st_type)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_rebuild(v, staged, st_type) for v in obj]
    if isinstance(obj, tuple):
        items = [_rebuild(v, staged, st_type) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuples too
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
