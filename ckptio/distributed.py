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
- the reader is weights-only: ``.metadata`` is unpickled with an allowlist of
  DCP's metadata types (never plain ``pickle.load``, which runs whatever a
  hostile file names), and every BYTES item goes through torch's
  weights-only unpickler before the planner sees it. A refused global raises
  :class:`UnsafeCheckpointError` naming the file and the global; pass
  ``StorageReader(..., safe_globals=[...])`` (or use
  ``torch.serialization.add_safe_globals``) for types you trust.
- items written with DCP's stream transforms (``_extensions=[ZStandard()]``)
  are decoded as DCP's FileSystemReader decodes them, then CRC-checked.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import os
import pathlib
import pickle
import re
import zipfile
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.serialization
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from . import _C, archive as _archive
from ._compat import PATHLIB_MODULES, dcp_metadata_path, dcp_uses_collectives
from ._engine import get_engine
from ._paths import fsync_directory, fsync_file, make_directories, temporary_path
from .allowlist_unpickler import AllowlistUnpickler
from .api import unpickle_archive
from .errors import (
    CheckpointIOError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnsupportedTransformError,
    globals_refused_in,
)
from .load_into import MemoryClaims
from .pickling import ALIGNMENT, pickle_state
from .skeleton import TensorSpec, native_byte_order, tensor_spec

if TYPE_CHECKING:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension
    from torch.distributed.checkpoint.metadata import STATE_DICT_TYPE, MetadataIndex
    from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem, SavePlan, SavePlanner, WriteItem

    from .pickling import Payload
    from .staging import Slot, StagingArena

__all__ = ["StorageReader", "StorageWriter", "UnsafeCheckpointError", "UnsupportedTransformError"]


_SUFFIX = ".distcp"


def _page_round(n: int) -> int:
    return -(-n // 4096) * 4096


class _DurableFileSystem(FileSystem):
    """FileSystemWriter.finish pickles .metadata into a buffered stream and
    fsyncs its descriptor before the buffer is flushed: a small .metadata is
    still in Python's buffer then, so the fsync persists nothing and the
    rename that follows can reach the disk before the bytes do (the
    power-loss simulator finds an empty .metadata). Streams opened for
    writing here are flushed and fsynced when the writer is done with them."""

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[io.IOBase]:
        with super().create_stream(path, mode) as stream:
            yield stream
            if any(c in mode for c in "wax+"):
                stream.flush()
                fsync_file(stream.fileno(), "dcp.metadata.file")


class StorageWriter(FileSystemWriter):
    """A DCP StorageWriter that writes each rank's file with ckptio's engine.

    ``dcp.save(state_dict, storage_writer=StorageWriter(path))``; also for
    ``dcp.async_save``, where it stages into its own reusable buffer.
    """

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = True,
                 _extensions: Sequence[StreamTransformExtension] | None = None,
                 single_file_per_rank: bool = True, sync_files: bool = True, thread_count: int = 1,
                 per_thread_copy_ahead: int = 10_000_000, cache_staged_state_dict: bool = False,
                 serialization_format: Any = None) -> None:
        """``_extensions``: DCP stream transforms (EXPERIMENTAL in DCP), e.g.
        ``[ZStandard()]``, applied to every item as FileSystemWriter applies
        them; such items are encoded in memory and written as they come out
        (readers of either kind undo them from the metadata).

        FileSystemWriter's other arguments are taken so that this class
        replaces it by name, and mean nothing here: every rank writes one
        file, always fsynced (``sync_files=False`` would lose the commit
        order), with the engine's own threads (CKPTIO_NUM_THREADS) from its
        own staging buffer. Only torch.save's format is written."""
        if serialization_format is not None and getattr(serialization_format, "value", "torch_save") != "torch_save":
            raise ValueError(f"ckptio's StorageWriter writes torch.save archives, not {serialization_format}")
        super().__init__(os.fspath(path), single_file_per_rank=True, sync_files=True, thread_count=1,
                         cache_staged_state_dict=False, overwrite=overwrite, _extensions=_extensions)
        self.fs = _DurableFileSystem()  # .metadata's bytes reach the disk before its rename
        self._arena: StagingArena | None = None  # and its one Slot, made on first stage()
        self._staging: Slot | None = None

    def __getstate__(self) -> dict[str, Any]:
        """DCP pickles the writer to hand it to its checkpoint process
        (``AsyncCheckpointerType.PROCESS``). The staging buffer (native memory)
        and the arena's lock stay here: the copy there only writes, from the
        state dict it is sent with, and never stages."""
        state = self.__dict__.copy()
        state["_arena"] = None
        state["_staging"] = None
        return state

    # --- writing --------------------------------------------------------------

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        directory = os.fspath(self.path)
        file_name = f"{plan.storage_data.prefix}0{_SUFFIX}"
        final = os.path.join(directory, file_name)
        tmp = temporary_path(final)

        # (item, offset, size, archive records + owners | raw bytes)
        pieces: list[tuple[WriteItem, int, int, tuple[list[tuple[str, Payload]], list[torch.UntypedStorage]] | bytes]]
        pieces, end = [], 0
        descriptors: dict[MetadataIndex, list[str]] = {}  # item index -> the stream transforms its bytes went through
        for item in plan.items:
            data = planner.resolve_data(item)
            offset = _page_round(end)
            if self.transforms.extensions:
                raw, descriptors[item.index] = self._transformed(item, data)
                pieces.append((item, offset, len(raw), raw))
                end = offset + len(raw)
                continue
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                pieces.append((item, offset, len(raw), raw))
                end = offset + len(raw)
                continue
            tensor = cast(torch.Tensor, data).detach()  # not BYTE_IO: a tensor
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
            for _item, offset, _size, payload in pieces:
                if isinstance(payload, tuple):
                    records, owners = payload
                    tickets.append(get_engine().save(tmp, records, ALIGNMENT, owners, 0, 0, offset, True))
            for ticket in tickets:
                ticket.wait()
            for ticket in tickets:
                ticket.check()
            fd = os.open(tmp, os.O_WRONLY)
            try:
                for _item, offset, _size, payload in pieces:
                    if not isinstance(payload, tuple):
                        os.pwrite(fd, payload, offset)
                os.ftruncate(fd, end)
                fsync_file(fd, "dcp.shard.file")
            finally:
                os.close(fd)
            os.replace(tmp, final)
            fsync_directory(directory, "dcp.shard.directory")
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise

        results = [
            WriteResult(index=item.index, size_in_bytes=size,
                        storage_data=_StorageInfo(file_name, offset, size, descriptors.get(item.index) or None))
            for item, offset, size, _ in pieces
        ]
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _transformed(self, item: WriteItem, data: Any) -> tuple[bytes, list[str]]:
        """The item's bytes through this writer's stream transforms, as
        FileSystemWriter writes them (torch.save of a tensor, a BytesIO's
        contents), and the descriptors a reader needs to undo them."""
        buf = io.BytesIO()
        stream, descriptors = self.transforms.transform_save_stream(item, buf)
        if item.type == WriteItemType.BYTE_IO:
            stream.write(data.getbuffer() if isinstance(data, io.BytesIO) else bytes(data))
        else:
            tensor = data.detach().cpu()
            if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                tensor = tensor.clone()  # save only this view, as FileSystemWriter does
            torch.save(tensor, stream)
        stream.close()
        return buf.getvalue(), list(descriptors)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        make_directories(os.fspath(self.path))  # durably: a power cut cannot take the new directory
        plan = super().prepare_local_plan(plan)
        if not dcp_uses_collectives(self) and self.rank is not None:
            self._retire_metadata(dcp_metadata_path(self, self.rank))
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # The coordinator, after every rank planned and before any writes.
        self._retire_metadata(dcp_metadata_path(self))
        return super().prepare_global_plan(plans)

    def _retire_metadata(self, metadata_path: str | os.PathLike[str]) -> None:
        """Saving over a checkpoint replaces its rank files one by one, under
        the same names; the old .metadata would then describe bytes that are
        gone. It goes first, durably: a power cut mid-save leaves a directory
        that clearly refuses to load (no .metadata), never a mix."""
        try:
            os.remove(metadata_path)
        except FileNotFoundError:
            return
        fsync_directory(os.fspath(self.path), "dcp.retire_metadata.directory")

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        super().finish(metadata, results)  # .metadata.tmp, fsync (by _DurableFileSystem), rename
        fsync_directory(os.fspath(self.path), "dcp.metadata.directory")  # and the rename survives a crash

    # --- staging for dcp.async_save ---------------------------------------------

    def stage(self, state_dict: STATE_DICT_TYPE) -> STATE_DICT_TYPE:
        """Copy every tensor into this writer's reusable, pre-faulted buffer and
        return the state dict rebuilt over it (DTensors keep mesh and
        placements; ShardedTensors keep their sharding metadata, with CPU
        placements as the stock stager's ``.cpu()`` gives them).

        The buffer is reused by the next stage(): wait for the previous
        async_save's future before starting another (as DCP's docs advise)."""
        from .staging import StagingArena

        tensors: list[torch.Tensor] = []
        _collect(state_dict, tensors)
        storages: list[torch.UntypedStorage] = []
        index: dict[tuple[int, torch.device], int] = {}  # each distinct storage once
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in index:
                index[key] = len(storages)
                storages.append(t.untyped_storage())
        if self._staging is None:
            self._arena = StagingArena(1)
            self._staging = self._arena.acquire()
        assert self._arena is not None  # made with the slot
        payloads, _ = self._arena.snapshot(self._staging, storages)
        views = _storage_views(self._staging, payloads)
        staged: dict[int, torch.Tensor] = {}
        for t in tensors:
            storage = views[index[(t.untyped_storage().data_ptr(), t.device)]]
            staged[id(t)] = torch.empty(0, dtype=t.dtype).set_(storage, t.storage_offset(), t.shape, t.stride())
        return _rebuild(state_dict, staged)

    def synchronize_staging(self) -> None:
        pass  # stage() returns once the copies are complete

    def close(self) -> None:
        self._staging = None
        self._arena = None


def _storage_views(slot: Slot, payloads: list[tuple[int, int]]) -> list[torch.UntypedStorage]:
    """Each snapshotted storage as its own CPU storage over the slot (no copy)."""
    assert slot.buffer is not None  # the snapshot sized it
    mv = memoryview(slot.buffer)
    base = slot.buffer.address
    return [torch.frombuffer(mv[a - base : a - base + n], dtype=torch.uint8).untyped_storage() if n
            else torch.UntypedStorage(0) for a, n in payloads]


def _same_checkpoint(copy: str, path: str) -> bool:
    from .service.memory_tier import same_checkpoint

    return os.path.isfile(copy) and same_checkpoint(copy, path)


def _len(payload: Payload) -> int:
    return payload[1] if isinstance(payload, tuple) else len(payload)


def _sharded_tensor_type() -> type[ShardedTensor] | None:
    """ShardedTensor's class, or None where torch.distributed._shard is absent."""
    try:
        from torch.distributed._shard.sharded_tensor import ShardedTensor
    except ImportError:  # pragma: no cover - torch without the _shard package
        return None
    return ShardedTensor


def _collect(obj: object, out: list[torch.Tensor], st_type: type[ShardedTensor] | None = None) -> None:
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


def _rebuild_sharded(st: Any, staged: dict[int, torch.Tensor]) -> Any:
    """`st` rebuilt over its staged local shards, as ShardedTensor.cpu() and
    the stock stager build their copies: same global metadata, placements
    moved to the CPU, same process group."""
    from torch.distributed._shard.sharded_tensor import Shard

    def on_cpu(md: Any) -> Any:
        md = copy.deepcopy(md)
        if md.placement is not None and md.placement.device().type != "cpu":
            md.placement._device = torch.device("cpu")
        return md

    shards = [Shard(staged[id(shard.tensor)], on_cpu(shard.metadata)) for shard in st.local_shards()]
    st_meta = copy.deepcopy(st.metadata())
    st_meta.shards_metadata = [on_cpu(md) for md in st_meta.shards_metadata]
    return type(st)._init_from_local_shards_and_global_metadata(
        shards, st_meta, process_group=st._process_group, init_rrefs=st._init_rrefs)


def _rebuild(obj: Any, staged: dict[int, torch.Tensor], st_type: type[ShardedTensor] | None = None) -> Any:
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
    and verifies their CRC-32s. Reads checkpoints of either writer.

    It is weights-only: ``.metadata`` is unpickled with an allowlist of DCP's
    metadata types and BYTES items with torch's weights-only unpickler.
    ``safe_globals`` adds classes/functions you trust to both (as
    ``torch.serialization.add_safe_globals`` does, which is also honoured).
    Items written through DCP's stream transforms (``_extensions``, e.g.
    ZStandard) are decoded with ``_extension_registry`` (DCP's default
    registry when None), as FileSystemReader does.
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True, safe_globals: Iterable[Any] = (),
                 _extension_registry: ExtensionRegistry | None = None,
                 memory_copies: Mapping[str, str] | None = None) -> None:
        """`memory_copies`: {rank file name: a copy of it elsewhere (the
        checkpoint service's memory tier)}, read instead of the file when it
        holds the same checkpoint (ckptio.service.memory_tier.same_checkpoint),
        and given up for the file if it turns out damaged."""
        super().__init__(os.fspath(path), _extension_registry=_extension_registry)
        self.verify = verify
        self.safe_globals = list(safe_globals)
        self.memory_copies = dict(memory_copies or {})
        self.files_from_memory: set[str] = set()  # rank files read_data took from their memory copies ...
        self.files_from_disk: set[str] = set()    # ... and from the checkpoint directory
        # Tensor items of the last read_data: read straight into the planner's
        # tensor, or rebuilt in fresh memory and copied in.
        self.items_in_place = 0
        self.items_copied = 0

    # --- metadata -------------------------------------------------------------

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP's ``.metadata``, unpickled weights-only (never plain pickle.load)."""
        path = dcp_metadata_path(self, kwargs.get("rank"))
        try:
            with open(path, "rb") as f:
                data = f.read()
            metadata = AllowlistUnpickler(data, _metadata_allowlist(self.safe_globals), path=path, record=".metadata",
                                          why=_METADATA_ALLOWS).load()
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(2, f"{path}: no DCP checkpoint metadata here", path) from e
        except (UnsafeCheckpointError, CheckpointIOError):
            raise
        except OSError as e:
            raise CheckpointIOError(e.errno or 5, f"{path}: cannot read DCP metadata: {e}", path) from e
        except Exception as e:  # truncated or not a pickle: EOFError, UnpicklingError, ValueError, ...
            raise CorruptCheckpointError(f"{path}: not a DCP metadata file ({type(e).__name__}: {e})",
                                         path=path, record=".metadata") from e
        if not isinstance(metadata, Metadata):
            raise CorruptCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata",
                                         path=path, record=".metadata")
        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is None:
            storage_meta = metadata.storage_meta = StorageMeta()
        storage_meta.load_id = self.load_id
        return metadata

    # --- data -----------------------------------------------------------------

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Per rank file: parse every tensor archive's directory (in parallel),
        then read their pickles and payloads in one engine job (parallel,
        CRC-verified). A payload that is exactly the tensor the planner
        resolves (contiguous CPU memory, the saved item whole: a same-sharding
        load, or 2 -> 1 along dim 0) is read straight into it; the others are
        rebuilt with torch's unpickler from fresh buffers, narrowed and copied
        in. BYTES items and transformed (e.g. compressed) items are read whole
        and decoded."""
        directory = os.fspath(self.path)
        self.items_in_place = self.items_copied = 0
        by_file: dict[str, list[ReadItem]] = {}
        for req in plan.items:
            by_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for relative_path, reqs in by_file.items():
            path = _join_inside(directory, relative_path)
            reqs.sort(key=lambda r: self.storage_data[r.storage_index].offset)
            copy = self.memory_copies.get(relative_path)
            if copy is not None and _same_checkpoint(copy, path):
                try:
                    self._read_file(copy, _rank_of(relative_path), reqs, planner)
                    self.files_from_memory.add(relative_path)
                    continue
                except (CorruptCheckpointError, CheckpointIOError) as e:  # the file rewrites every target the copy did
                    import warnings

                    warnings.warn(f"ckptio: the memory tier's copy of {path} cannot be read ({e}); reading the file",
                                  RuntimeWarning, stacklevel=2)
            self._read_file(path, _rank_of(relative_path), reqs, planner)
            self.files_from_disk.add(relative_path)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_file(self, path: str, rank: int | str, reqs: list[ReadItem], planner: LoadPlanner) -> None:
        """One rank file, in one engine job: every archive's small records
        (its pickle) and payloads. A payload predicted to be exactly the
        planner's tensor (see _predict_place) is read straight into it; the
        prediction is checked against the pickle before the tensor is
        committed (a miss is rebuilt from the bytes that landed, no re-read).
        Pickles are parsed while the payloads are still arriving."""
        in_file = f"{path} (rank {rank})"
        tensor_reqs = [r for r in reqs
                       if r.type != LoadItemType.BYTE_IO and not _transforms_of(self.storage_data[r.storage_index])]
        try:
            # (offset, length) -> Archive
            archives = _archive.open_archives(path, dict.fromkeys(self._span(r) for r in tensor_reqs))
        except FileNotFoundError as e:
            raise CheckpointIOError(2, f"missing checkpoint file of rank {rank}", path) from e
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{in_file}: {e}", path=path) from e

        targets = {req: planner.resolve_tensor(req).detach() for req in tensor_reqs}
        placed = _predict_place(tensor_reqs, targets, archives, self._span)
        span_of_name: dict[str | None, tuple[int, int]] = {}  # engine request name -> its archive, for naming damage
        records: list[tuple[Hashable, _archive.Record]] = []
        for span, arc in archives.items():
            for name, r in arc.records.items():
                if name in _UNUSED_RECORDS:
                    continue  # a separate read at each archive's end, for nothing torch reads
                unique = _archive.Record(f"{name}{_ARCHIVE_AT}{span[0]}", r.header_offset, r.end_offset, r.size,
                                         r.crc)
                span_of_name[unique.name] = span
                records.append(((span, name), unique))
        reader = _archive.RecordReader(path, records, verify=self.verify, destinations=placed)
        try:
            with torch.serialization.safe_globals(self.safe_globals):
                for req in reqs:
                    if req in targets:
                        self._read_tensor(req, path, rank, archives[self._span(req)], reader, placed, targets[req],
                                          planner)
                    else:
                        self._read_item(req, path, rank, planner)
            reader.finish()
        except CorruptCheckpointError as e:
            reader.abandon()
            if e.record not in span_of_name:
                raise  # already names its item
            fqns = sorted({r.storage_index.fqn for r in tensor_reqs if self._span(r) == span_of_name[e.record]})
            raise CorruptCheckpointError(f"{in_file}, item {', '.join(map(repr, fqns))}: {e}", path=path,
                                         record=e.record) from e
        except BaseException:
            reader.abandon()
            raise

    def _span(self, req: ReadItem) -> tuple[int, int]:
        info = self.storage_data[req.storage_index]
        return (info.offset, info.length)

    def _read_tensor(self, req: ReadItem, path: str, rank: int | str, arc: _archive.Archive,
                     reader: _archive.RecordReader, placed: dict[tuple[tuple[int, int], str], tuple[int, torch.Tensor]],
                     target: torch.Tensor, planner: LoadPlanner) -> None:
        span = self._span(req)
        where = f"{path} (rank {rank}, item {req.storage_index.fqn!r})"

        def record(name: str) -> bytes:
            return bytes(reader.get((span, name)))

        def small_records() -> dict[str, bytes]:
            return {name: record(name) for name in arc.records
                    if not name.startswith("data/") and name not in _UNUSED_RECORDS}

        with _naming(where, path, req.storage_index.fqn):
            saved = tensor_spec(arc, record("data.pkl"), where, small_records, unpickle_archive)
        if not isinstance(saved, TensorSpec):
            raise CorruptCheckpointError(f"{where}: holds a {type(saved).__name__}, not a tensor",
                                         path=path, record=req.storage_index.fqn)
        if saved.record is not None and (span, saved.record) in placed:  # (placed records have names)
            reader.wait((span, saved.record))  # read straight into the target, verified
            view = saved.narrow(req.storage_offsets, req.lengths)
            native_order = native_byte_order(record("byteorder") if "byteorder" in arc.records else None)
            if (view.is_contiguous() and view.storage_offset == 0 and view.dtype == target.dtype
                    and view.size == tuple(target.shape) and native_order):
                planner.commit_tensor(req, target)
                self.items_in_place += 1
                return
            # Mispredicted (a view of a larger storage, another dtype): the
            # target holds the record's bytes; rebuild the tensor from them.
            bytes_landed = {saved.record: target.reshape(-1).view(torch.uint8).clone().untyped_storage()}
            loaded = _archive.LoadedArchive(arc, reader, key=lambda name: (span, name), storages=bytes_landed)
        else:
            loaded = _archive.LoadedArchive(arc, reader, key=lambda name: (span, name))
        with _naming(where, path, req.storage_index.fqn):
            tensor = unpickle_archive(loaded, "cpu", True, where)
        self.items_copied += 1
        self._commit_tensor(req, tensor, target, path, where, planner)

    def _read_item(self, req: ReadItem, path: str, rank: int | str, planner: LoadPlanner) -> None:
        """A BYTES item, or a tensor written through stream transforms: read whole and decoded."""
        info: _StorageInfo = self.storage_data[req.storage_index]
        fqn = req.storage_index.fqn
        where = f"{path} (rank {rank}, item {fqn!r})"
        raw = self._read_whole(req, info, path, where)
        if req.type == LoadItemType.BYTE_IO:
            self._load_bytes(req, raw, path, where, planner)
            return
        descriptors = _transforms_of(info)
        tensor = self._tensor_from_bytes(raw, path, f"{where} (decoded with {_names(descriptors)})", fqn)
        self._commit_tensor(req, tensor, planner.resolve_tensor(req).detach(), path, where, planner)

    @staticmethod
    def _commit_tensor(req: ReadItem, tensor: object, target: torch.Tensor, path: str, where: str,
                       planner: LoadPlanner) -> None:
        from torch.distributed._shard._utils import narrow_tensor_by_index

        if not isinstance(tensor, torch.Tensor):
            raise CorruptCheckpointError(f"{where}: holds a {type(tensor).__name__}, not a tensor",
                                         path=path, record=req.storage_index.fqn)
        tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
        if target.size() != tensor.size():
            raise CorruptCheckpointError(f"{where}: size {tuple(tensor.size())}, expected {tuple(target.size())}",
                                         path=path, record=req.storage_index.fqn)
        target.copy_(tensor)
        planner.commit_tensor(req, target)

    def _read_whole(self, req: ReadItem, info: _StorageInfo, path: str, where: str) -> bytes:
        """The item's bytes, with its stream transforms (if any) undone."""
        fqn = req.storage_index.fqn
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
        except FileNotFoundError as e:
            raise CheckpointIOError(2, f"{where}: missing checkpoint file", path) from e
        if len(raw) != info.length:
            raise CorruptCheckpointError(f"{where}: file is truncated", path=path, record=fqn)
        descriptors = _transforms_of(info)
        if not descriptors:
            return raw
        try:
            stream = self.transforms.transform_load_stream(req, descriptors, io.BytesIO(raw))
        except Exception as e:  # unknown extension, or its module (zstandard/pyzstd) missing
            raise UnsupportedTransformError(
                f"{where}: cannot apply stream transform {_names(descriptors)} the item was written with: {e}"
            ) from e
        try:
            data = stream.read(-1)
        except Exception as e:
            raise CorruptCheckpointError(
                f"{where}: stream transform {_names(descriptors)} failed to decode the item "
                f"({type(e).__name__}: {e})", path=path, record=fqn) from e
        return bytes(data) if data is not None else b""

    def _tensor_from_bytes(self, data: bytes, path: str, where: str, fqn: str) -> Any:
        """A tensor from a decoded torch.save payload: CRC-checked, weights-only."""
        if self.verify:
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
                raise CorruptCheckpointError(f"{where}: decoded item is not a torch.save archive ({e})",
                                             path=path, record=fqn) from e
            if bad is not None:
                raise CorruptCheckpointError(f"{where}: CRC-32 mismatch in record {bad!r}", path=path, record=fqn)
        try:
            with torch.serialization.safe_globals(self.safe_globals):
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refusal(data, e, path, where, fqn) from e
        except Exception as e:
            raise CorruptCheckpointError(f"{where}: cannot read the tensor ({type(e).__name__}: {e})",
                                         path=path, record=fqn) from e

    def _load_bytes(self, req: ReadItem, raw: bytes, path: str, where: str, planner: LoadPlanner) -> None:
        """Hand a BYTES item to the planner only after torch's weights-only
        unpickler accepted it. DCP's DefaultLoadPlanner.load_bytes calls
        ``torch.load(weights_only=False)``: it is given the object re-saved
        from what the weights-only load built, never the file's own pickle.
        A planner with its own load_bytes gets the original bytes (it may not
        hold a torch.save payload at all), unless they are a pickle naming a
        global that is not allowed."""
        fqn = req.storage_index.fqn
        default = getattr(type(planner), "load_bytes", None) is DefaultLoadPlanner.load_bytes
        try:
            with torch.serialization.safe_globals([io.BytesIO, *self.safe_globals]):
                obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            refusal = _refusal(raw, e, path, where, fqn)
            if default or refusal.refused:
                raise refusal from e
            planner.load_bytes(req, io.BytesIO(raw))  # not a pickle: the planner's own format
            return
        except Exception as e:
            if default:
                raise CorruptCheckpointError(f"{where}: not a torch.save payload ({type(e).__name__}: {e})",
                                             path=path, record=fqn) from e
            planner.load_bytes(req, io.BytesIO(raw))
            return
        if default:
            buf = io.BytesIO()
            torch.save(obj, buf)
            buf.seek(0)
            planner.load_bytes(req, buf)
        else:
            planner.load_bytes(req, io.BytesIO(raw))


# Engine request names in a rank file: "data/0 of the archive at offset 4096".
_ARCHIVE_AT = " of the archive at offset "
# Records torch's unpickling never reads; in a DCP item archive they sit after
# the payload, so reading them costs a request per item.
_UNUSED_RECORDS = frozenset({"version", ".data/version", ".data/serialization_id"})


@contextlib.contextmanager
def _naming(where: str, path: str, fqn: str) -> Iterator[None]:
    """Damage found outside the engine (a pickle that does not fit its
    records) is named by item here; the engine's own (CRC, truncation) by
    _read_file, which knows every item an archive serves."""
    try:
        yield
    except UnsafeCheckpointError:
        raise
    except CorruptCheckpointError as e:
        if _ARCHIVE_AT in (e.record or ""):
            raise
        raise CorruptCheckpointError(f"{where}: {e}", path=path, record=fqn) from e


def _predict_place(tensor_reqs: list[ReadItem], targets: Mapping[ReadItem, torch.Tensor],
                   archives: Mapping[tuple[int, int], _archive.Archive], span_of: Callable[[ReadItem], tuple[int, int]],
                   ) -> dict[tuple[tuple[int, int], str], tuple[int, torch.Tensor]]:
    """{(span, record): (address, target)} of the payloads to read straight
    into the planner's tensors, decided before any pickle is read: the item's
    only payload record is as large as its target, which is contiguous CPU
    memory, read from its start (storage_offsets all 0) by this request alone
    (no resharding split) and overlapping no other placed target. That is
    what a saved item whole is; _read_tensor checks it against the pickle."""
    uses = collections.Counter(span_of(r) for r in tensor_reqs)
    placed: dict[tuple[tuple[int, int], str], tuple[int, torch.Tensor]] = {}
    claimed = MemoryClaims()
    for req in tensor_reqs:
        span, target = span_of(req), targets[req]
        data = [name for name in archives[span].records if name.startswith("data/")]
        if len(data) != 1 or uses[span] != 1 or any(req.storage_offsets):
            continue
        size = archives[span].records[data[0]].size
        if (size > 0 and size == target.nbytes and target.device.type == "cpu" and target.is_contiguous()
                and claimed.claim(target.data_ptr(), size)):
            placed[(span, data[0])] = (target.data_ptr(), target)
    return placed


def _transforms_of(info: _StorageInfo) -> tuple[str, ...]:
    return tuple(getattr(info, "transform_descriptors", None) or ())


def _names(descriptors: Iterable[str]) -> str:
    return ", ".join(repr(d) for d in descriptors)


def _join_inside(directory: str, relative_path: object) -> str:
    """The rank file's path; the metadata may not point outside the checkpoint."""
    rel = os.fspath(relative_path) if isinstance(relative_path, (str, os.PathLike)) else None
    if (not rel or os.path.isabs(rel) or ".." in pathlib.PurePath(rel).parts
            or os.path.normpath(rel) in (".", "")):
        raise CorruptCheckpointError(
            f"{directory}: .metadata names a data file {relative_path!r} outside the checkpoint directory",
            path=os.path.join(directory, ".metadata"), record=".metadata")
    return os.path.join(directory, rel)


def _refusal(raw: bytes, e: Exception, path: str, where: str, fqn: str) -> UnsafeCheckpointError:
    """The error for a pickle torch's weights-only unpickler refused, naming
    the globals it needs."""
    refused: list[str] = []
    try:
        refused = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(raw))
    except Exception:  # noqa: BLE001, S110 - not a zip archive: name them from the error below
        pass
    if not refused:
        refused = globals_refused_in(str(e))
    if refused:
        what = f"refused to unpickle global(s) {', '.join(map(repr, refused))}"
        hint = (" ckptio's DCP reader is weights-only; if you trust this checkpoint, pass "
                "StorageReader(..., safe_globals=[...]) or use torch.serialization.add_safe_globals.")
    else:
        what = f"the weights-only unpickler refused it ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        hint = ""
    return UnsafeCheckpointError(f"{where}: {what}.{hint}", path=path, record=fqn, refused=refused)


_METADATA_ALLOWS = (": ckptio reads DCP metadata weights-only (DCP's metadata types, torch dtypes/sizes, paths and "
                    "builtin containers only). If you trust this checkpoint, pass "
                    "StorageReader(..., safe_globals=[...]) or use torch.serialization.add_safe_globals.")


def _metadata_allowlist(extra: Iterable[Any]) -> dict[str, Any]:
    """'module.name' -> object: what a DCP ``.metadata`` pickle may name."""
    import _codecs

    import torch.distributed.checkpoint.metadata as md

    allowed: dict[str, Any] = {}

    def add(obj: Any, name: str | None = None) -> None:
        allowed[name or f"{obj.__module__}.{obj.__qualname__}"] = obj

    cls: type
    for cls in (md.Metadata, md.MetadataIndex, md.StorageMeta, md.TensorStorageMetadata, md.BytesStorageMetadata,
                md.ChunkStorageMetadata, md.TensorProperties, md._MEM_FORMAT_ENCODING, _StorageInfo):
        add(cls)
    try:  # checkpoints from before DCP had its own TensorProperties hold the _shard one
        from torch.distributed._shard.sharded_tensor import metadata as st_md

        add(st_md.TensorProperties)
        add(st_md.MEM_FORMAT_ENCODING)
    except ImportError:  # pragma: no cover
        pass
    add(torch.Size, "torch.Size")
    add(torch.serialization._get_layout, "torch.serialization._get_layout")  # how torch.layout pickles
    for name, value in vars(torch).items():  # torch.float32, torch.strided, ...
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[f"torch.{name}"] = value
    for cls in (pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.Path,
                pathlib.PosixPath, pathlib.WindowsPath):  # StorageMeta.checkpoint_id
        for module in PATHLIB_MODULES:
            add(cls, f"{module}.{cls.__name__}")
    add(collections.OrderedDict, "collections.OrderedDict")
    for cls in (set, frozenset, complex):
        add(cls, f"builtins.{cls.__name__}")
    add(_codecs.encode, "_codecs.encode")  # bytes in protocol-2 pickles
    for entry in [*torch.serialization.get_safe_globals(), *extra]:
        if isinstance(entry, tuple):
            obj, name = entry
            add(obj, name)
        else:
            add(entry)
    return allowed


def _rank_of(file_name: str) -> int | str:
    m = re.match(r"__(\d+)_", file_name)
    return int(m.group(1)) if m else "?"
