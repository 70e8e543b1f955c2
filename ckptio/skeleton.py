"""What a checkpoint's tensors are (record, offset, shape, stride, dtype)
before any payload is read: load_into and the DCP reader plan where payloads
go from it. load_into gets the object graph with meta tensors in them; the
DCP reader gets a TensorSpec per item (no torch object at all: a rank file
holds one pickle per item). Two ways to get either:

- a fast path for pickles that name only what torch.save writes for plain
  tensors (``_rebuild_tensor_v2``/``_v3``, ``_rebuild_parameter``,
  ``OrderedDict``, storage types and dtypes): CPython's C unpickler with
  those globals, much faster per small pickle than torch's pure-Python
  weights-only unpickler. Its allowlist is a subset of the weights-only one,
  and storage types and dtypes here are markers that cannot be called. The C
  unpickler would let BUILD/SETITEM/APPEND act on any object, shared ones
  included, so the engine first checks the opcodes (_C.check_pickle:
  those act only on containers the pickle made itself) and whatever a pickle
  can reach is immutable or made for this load: it accepts nothing torch's
  weights-only load would refuse, and no pickle changes a later load;
- otherwise torch's own ``_load`` (weights-only unless told) over meta
  storages, which understands everything torch.load does.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import torch

from . import _C, archive as _archive

# torch's unpickling of an archive: unpickle(zip_reader, map_location, weights_only, path) -> object
# (ckptio.api.unpickle_archive).
_Unpickle = Callable[[Any, Any, bool, str], Any]

__all__ = ["TensorSpec", "fast_load", "native_byte_order", "unpickle_skeleton", "tensor_spec"]


def native_byte_order(byteorder_record: bytes | None) -> bool:
    """Whether payloads are in this machine's byte order (an archive without a
    ``byteorder`` record is little-endian, as torch reads it)."""
    order = "little" if byteorder_record is None else byteorder_record.decode(errors="replace")
    return order == sys.byteorder


class TensorSpec(NamedTuple):
    """What a saved tensor is, without it: its payload record and its view of it."""
    record: Optional[str]  # None: a tensor whose storage is no record of the archive
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def narrow(self, offsets: Sequence[int], lengths: Sequence[int]) -> TensorSpec:
        """This tensor narrowed to [offsets, offsets + lengths) along every dim."""
        shift = sum(o * s for o, s in zip(offsets, self.stride))
        return self._replace(storage_offset=self.storage_offset + shift, size=tuple(lengths))

    def is_contiguous(self) -> bool:
        expected = 1
        for n, s in zip(reversed(self.size), reversed(self.stride)):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True


def tensor_spec(arc: _archive.Archive, pickle_bytes: bytes, path: str, full_metadata: Callable[[], dict[str, bytes]],
                unpickle: _Unpickle) -> Any:
    """The TensorSpec of an archive holding one tensor (a DCP item), or the
    object it holds if that is not a tensor. `full_metadata()` returns every
    non-payload record, for when torch's unpickler has to judge."""
    spec = _FastSkeleton(pickle_bytes, specs=True).load()
    if spec is not _NOT_FAST and (not isinstance(spec, TensorSpec) or spec.record in arc.records):
        return spec
    graph, record_of = unpickle_skeleton(arc, full_metadata(), True, path, unpickle)
    if not isinstance(graph, torch.Tensor):
        return graph
    return TensorSpec(record_of.get(graph.untyped_storage()._cdata), int(graph.storage_offset()),
                      tuple(graph.shape), graph.stride(), graph.dtype)


def unpickle_skeleton(arc: _archive.Archive, metadata: dict[str, bytes], weights_only: bool, path: str,
                      unpickle: _Unpickle) -> tuple[Any, dict[int, str]]:
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
# storage_for(record name, location, nbytes) -> the UntypedStorage holding that record (see fast_load)
_StorageFor = Callable[[str, str, int], torch.UntypedStorage]


class _NotFast(Exception):
    """The pickle needs more than the fast path knows: use torch's."""


class _StorageType(NamedTuple):
    """Stands for ``torch.FloatStorage`` etc. in a persistent id: its dtype,
    nothing callable, and (a tuple) nothing a pickle's BUILD can write into."""
    dtype: torch.dtype


class _Call:
    """A function the fast path lets a pickle call (REDUCE), and nothing more:
    no __dict__, no attribute or state a pickle could write (a function's
    __defaults__ or a bound method's __dict__ would outlive this load)."""

    __slots__ = ("_fn",)
    _fn: Callable[..., Any]

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _NotFast(f"attribute write on {self._fn.__name__}")

    def __setstate__(self, state: Any) -> None:
        raise _NotFast(f"BUILD on {self._fn.__name__}")


# torch.save names a storage by its legacy typed class ("torch FloatStorage"),
# or, for dtypes without one (float8, uint16, ...), "torch.storage
# UntypedStorage" with the dtype given to _rebuild_tensor_v3.
_STORAGE_TYPES = {("torch", name): _StorageType(dtype)
                  for dtype, name in torch.storage._dtype_to_storage_type_map().items()}
_STORAGE_TYPES["torch.storage", "UntypedStorage"] = _StorageType(torch.uint8)
_STORAGE_TYPES["torch", "UntypedStorage"] = _StorageType(torch.uint8)
_DTYPES = {name: getattr(torch, name) for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class _FastSkeleton(pickle.Unpickler):
    """With specs=True, tensors come back as TensorSpecs (no torch objects at
    all: a DCP rank file has one pickle per item), else as meta tensors."""

    def __init__(self, data: bytes, specs: bool = False) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._data = data
        self._specs = specs
        self.record_of: dict[int, str] = {}  # storage _cdata -> record name
        self._storages: dict[str, torch.UntypedStorage] = {}  # key -> meta storage
        self._alive: list[torch.UntypedStorage] = []

    def load(self) -> Any:
        if _C.check_pickle(self._data)[0] != "fast":
            return _NOT_FAST  # ckptio.api.unpickle_archive refuses it or torch's unpickler judges it
        try:
            return super().load()
        except Exception:  # _NotFast, or anything torch's unpickler should judge
            return _NOT_FAST

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _Call(self._rebuild_tensor)
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _Call(self._rebuild_tensor_v3)
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _Call(_rebuild_parameter)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if (module, name) in _STORAGE_TYPES:
            return _STORAGE_TYPES[module, name]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]  # a dtype object: not callable
        raise _NotFast(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        dtype, key, _location, nbytes = _storage_id(pid)
        if self._specs:
            return f"data/{key}", dtype
        storage = self._storages.get(key)
        if storage is None:
            storage = torch.UntypedStorage(nbytes, device="meta")
            self._storages[key] = storage
            self.record_of[storage._cdata] = f"data/{key}"
            self._alive.append(storage)
        return storage, dtype

    def _rebuild_tensor_v3(self, storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                           backward_hooks: Any, dtype: Any, metadata: Any = None) -> Any:
        if not isinstance(dtype, torch.dtype):
            raise _NotFast("tensor dtype")
        return self._rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata,
                                    dtype=dtype)

    def _rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                        backward_hooks: Any, metadata: Any = None, dtype: Any = None) -> Any:
        if not (isinstance(storage, tuple) and len(storage) == 2
                and isinstance(storage[0], (torch.UntypedStorage, str))):
            raise _NotFast("tensor storage")
        untyped, storage_dtype = storage
        dtype = dtype or storage_dtype
        if self._specs:
            if not (isinstance(storage_offset, int) and isinstance(size, (tuple, list))
                    and isinstance(stride, (tuple, list)) and len(size) == len(stride)):
                raise _NotFast("tensor layout")
            return TensorSpec(untyped, storage_offset, tuple(size), tuple(stride), dtype)
        t = torch.empty(0, dtype=dtype, device="meta")
        t.set_(untyped, storage_offset, tuple(size), tuple(stride))
        t.requires_grad = bool(requires_grad) and (dtype.is_floating_point or dtype.is_complex)
        return t


def _storage_id(pid: Any) -> tuple[torch.dtype, str, str, int]:
    """(dtype, key, location, nbytes) of torch.save's persistent id
    ('storage', storage type, key, location, numel), checked."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[4], int) and pid[4] >= 0):
        raise _NotFast("persistent id")
    _, storage_type, key, location, numel = pid
    return storage_type.dtype, str(key), str(location), numel * storage_type.dtype.itemsize


def _rebuild_parameter(data: Any, requires_grad: bool, backward_hooks: Any) -> Any:
    if isinstance(data, TensorSpec):
        return data
    if not isinstance(data, torch.Tensor):
        raise _NotFast("parameter data")
    return torch.nn.Parameter(data, requires_grad)


def fast_load(pickle_bytes: bytes, storage_for: _StorageFor) -> Any:
    """The real object graph of a pickle the fast path accepts, its tensors
    built by torch's own rebuild functions over ``storage_for(record name,
    location, nbytes) -> UntypedStorage``; None when the fast path does not
    accept it (then torch's unpickler must do it). What torch.load returns for
    the same pickle, without torch's pure-Python unpickler (~0.2 ms a tensor)."""
    graph = _FastLoader(pickle_bytes, storage_for).load()
    return None if graph is _NOT_FAST else graph


class _FastLoader(_FastSkeleton):
    def __init__(self, data: bytes, storage_for: _StorageFor) -> None:
        super().__init__(data)
        self._storage_for = storage_for
        self._typed: dict[str, torch.storage.TypedStorage] = {}  # key -> TypedStorage, as torch's loaded_storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter"):
            return _Call(getattr(torch._utils, name))
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        dtype, key, location, nbytes = _storage_id(pid)
        typed = self._typed.get(key)
        if typed is None:
            untyped = self._storage_for(f"data/{key}", location, nbytes)
            typed = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
            self._typed[key] = typed
        return typed


class _SkeletonArchive(_archive.LoadedArchive):
    """torch's zip reader interface with meta storages: no payload is read.
    Remembers which record each storage stands for."""

    def __init__(self, archive: _archive.Archive, metadata: dict[str, bytes]) -> None:
        super().__init__(archive, reader=None, known=metadata)
        self.record_of: dict[int, str] = {}  # storage _cdata -> record name
        self._alive: list[torch.UntypedStorage] = []  # keeps each placeholder (and so its _cdata) unique

    def get_storage_from_record(self, name: str, numel: int, storage_type: object) -> _archive._RecordStorage:
        self._archive.record(name)
        storage = torch.UntypedStorage(numel, device="meta")
        self.record_of[storage._cdata] = name
        self._alive.append(storage)
        return _archive._RecordStorage(storage)
