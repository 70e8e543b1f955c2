"""A checkpoint's object graph with placeholder (meta) tensors: what each
tensor is (record, offset, shape, stride, dtype) before any payload is read.

load_into and the DCP reader plan where payloads go from it. Two ways to get it:

- a fast path for pickles that name only what torch.save writes for plain
  tensors (``_rebuild_tensor_v2``, ``_rebuild_parameter``, ``OrderedDict``
  and storage types): CPython's C unpickler with those globals, about 20x
  faster than torch's pure-Python weights-only unpickler per small pickle
  (a DCP rank file holds one pickle per item). Its allowlist is a subset of
  the weights-only one, and a storage type here is a marker that cannot be
  called, so it accepts nothing torch's weights-only load would refuse;
- otherwise torch's own ``_load`` (weights-only unless told) over meta
  storages, which understands everything torch.load does.
"""

from __future__ import annotations

import collections
import io
import pickle

import torch

from . import archive as _archive

__all__ = ["unpickle_skeleton"]


def unpickle_skeleton(arc, metadata: dict, weights_only: bool, path: str, unpickle):
    """(graph, {storage _cdata: record name}) of archive `arc`, whose
    non-payload records are in `metadata`. `unpickle(zip_reader,
    map_location, weights_only, path)` runs torch's unpickling for the
    general case."""
    fast = _FastSkeleton(metadata.get("data.pkl", b""))
    graph = fast.load()
    if graph is not _NOT_FAST and all(name in arc.records for name in fast.record_of.values()):
        return graph, fast.record_of
    general = _SkeletonArchive(arc, metadata)
    graph = unpickle(general, lambda storage, location: storage, weights_only, path)
    return graph, general.record_of


_NOT_FAST = object()


class _NotFast(Exception):
    """The pickle needs more than the fast path knows: use torch's."""


class _StorageType:
    """Stands for ``torch.FloatStorage`` etc. in a persistent id: its dtype, nothing callable."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_STORAGE_TYPES = {
    name: _StorageType(getattr(torch, name).dtype)
    for name in dir(torch)
    if name.endswith("Storage") and name not in ("UntypedStorage", "TypedStorage")
    and isinstance(getattr(torch, name), type) and hasattr(getattr(torch, name), "dtype")
}
_STORAGE_TYPES["UntypedStorage"] = _StorageType(torch.uint8)


class _FastSkeleton(pickle.Unpickler):
    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.record_of = {}  # storage _cdata -> record name
        self._storages = {}  # key -> meta storage
        self._alive = []

    def load(self):
        try:
            return super().load()
        except Exception:  # _NotFast, or anything torch's unpickler should judge
            return _NOT_FAST

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        raise _NotFast(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[4], int) and pid[4] >= 0):
            raise _NotFast("persistent id")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        storage = self._storages.get(key)
        if storage is None:
            storage = torch.UntypedStorage(numel * storage_type.dtype.itemsize, device="meta")
            self._storages[key] = storage
            self.record_of[storage._cdata] = f"data/{key}"
            self._alive.append(storage)
        return storage, storage_type.dtype

    def _rebuild_tensor(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
        if not (isinstance(storage, tuple) and len(storage) == 2 and isinstance(storage[0], torch.UntypedStorage)):
            raise _NotFast("tensor storage")
        untyped, dtype = storage
        t = torch.empty(0, dtype=dtype, device="meta")
        t.set_(untyped, storage_offset, tuple(size), tuple(stride))
        t.requires_grad = bool(requires_grad) and (dtype.is_floating_point or dtype.is_complex)
        return t


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor):
        raise _NotFast("parameter data")
    return torch.nn.Parameter(data, requires_grad)


class _SkeletonArchive(_archive.LoadedArchive):
    """torch's zip reader interface with meta storages: no payload is read.
    Remembers which record each storage stands for."""

    def __init__(self, archive, metadata: dict):
        super().__init__(archive, reader=None, known=metadata)
        self.record_of = {}  # storage _cdata -> record name
        self._alive = []     # keeps each placeholder (and so its _cdata) unique

    def get_storage_from_record(self, name, numel, storage_type):
        self._archive.record(name)
        storage = torch.UntypedStorage(numel, device="meta")
        self.record_of[storage._cdata] = name
        self._alive.append(storage)
        return _archive._RecordStorage(storage)
