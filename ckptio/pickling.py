"""Turn a Python object into the records of a torch.save archive.

The pickler below is torch.serialization._save's, line for line: protocol 2,
storages replaced by the persistent id ``("storage", storage_type, key,
location, numel)``, keys numbered in the order the pickler first meets each
storage, and the same refusal of two views of one storage with different
dtypes. The difference is what happens to the storages: torch copies device
storages to the host and writes them; we only list them, so the caller
decides how their bytes reach the engine (directly for a sync save of CPU
tensors, through the staging arena for async saves and device tensors).
"""

from __future__ import annotations

import contextlib
import copyreg
import gc
import io
import os
import pickle
import secrets
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Union

import torch
from torch.serialization import location_tag, normalize_storage_type

from . import _C
from ._compat import tensor_state_is_instance_dict

if TYPE_CHECKING:
    from typing_extensions import TypeAlias

    # A record's bytes: a bytes-like object, or (address, size) of memory an owner keeps alive.
    Payload: TypeAlias = Union[bytes, bytearray, memoryview, tuple[int, int]]
    NamedPayload: TypeAlias = tuple[str, Payload]  # (name in the archive, payload)

__all__ = ["ALIGNMENT", "PickledState", "archive_prefix", "gc_paused", "pickle_state"]

# Payload alignment: every payload starts on a page, so the engine can write
# it with O_DIRECT and mmap'd tensors are page aligned.
ALIGNMENT = 4096
_PICKLE_PROTOCOL = 2  # torch.load's weights-only unpickler accepts only protocol 2


@dataclass
class PickledState:
    """An object reduced to torch.save's records, its storages not yet copied.

    ``head`` holds the small records before the storages (data.pkl and the
    metadata records), ``storages`` the storages in key order, ``tail`` the
    records after them. ``records_for(payloads)`` puts them in file order.
    """

    prefix: str
    head: list[tuple[str, bytes]] = field(default_factory=list)
    storages: list[torch.UntypedStorage] = field(default_factory=list)  # in key order
    locations: list[str] = field(default_factory=list)  # their location tags ("cpu", "cuda:0", ...)
    # What the snapshot asks of each storage, noted while pickling (one
    # call fewer per storage and fact: ~10 ms for 10,000 tensors).
    nbytes: list[int] = field(default_factory=list)
    device_types: list[str] = field(default_factory=list)  # "cpu", "cuda", ...
    data_ptrs: list[int] = field(default_factory=list)
    cdatas: list[int] = field(default_factory=list)  # storage._cdata: which storage it is
    tail: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def storage_bytes(self) -> int:
        return sum(self.nbytes)

    def registry(self) -> list[list[Any]]:
        """The per-storage lists, in the order the C reducer appends to them."""
        return [self.storages, self.locations, self.nbytes, self.device_types, self.data_ptrs, self.cdatas]

    def register(self, storage: torch.UntypedStorage, location: str) -> None:
        for facts, fact in zip(self.registry(), (storage, location, storage.nbytes(), storage.device.type,
                                                 storage.data_ptr(), storage._cdata)):
            facts.append(fact)

    def storage_name(self, key: int) -> str:
        return f"{self.prefix}/data/{key}"

    def records_for(self, payloads: Iterable[Payload]) -> list[NamedPayload]:
        """File-order records with payloads[i] (bytes or (address, size)) for storage i."""
        middle: list[NamedPayload] = [(self.storage_name(i), p) for i, p in enumerate(payloads)]
        return [*self.head, *middle, *self.tail]

    def cpu_records(self) -> tuple[list[NamedPayload], list[torch.UntypedStorage]]:
        """Records pointing straight at the storages' memory (copying device
        storages to the host first), and the objects that own that memory."""
        owners: list[torch.UntypedStorage] = []
        payloads: list[Payload] = []
        for s, kind, ptr, n in zip(self.storages, self.device_types, self.data_ptrs, self.nbytes):
            if kind != "cpu":
                s = s.cpu()
                ptr = s.data_ptr()
            owners.append(s)
            payloads.append((ptr, n))
        return self.records_for(payloads), owners


def archive_prefix(path: str) -> str:
    """The top-level directory torch.save uses inside the zip for `path`.

    torch.save names it after the file's basename without its last extension
    (caffe2/serialize/inline_container.cc ``basename``); a non-ASCII path goes
    through a Python file object, which gets "archive".
    """
    try:
        path.encode("ascii")
    except UnicodeEncodeError:
        return "archive"
    base = path.replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return stem or "archive"


# --- the fast path for plain dense tensors --------------------------------------
#
# A checkpoint is mostly plain tensors, and torch's Tensor.__reduce_ex__ (plus
# a TypedStorage per tensor, plus persistent_id's checks on every pickled
# object) costs ~30 us a tensor: 0.3 s of the caller's time for a 10,000-tensor
# state. For exactly torch.Tensor on the CPU or CUDA, strided, not quantized,
# without Python state or hooks, the reduction below returns the tuple torch's
# _reduce_ex_internal returns (same rebuild function, same arguments), with
# the storage passed as a _DenseStorage that persistent_id turns into the same
# persistent id torch's pickler writes. Everything else takes torch's own
# path. The bytes are identical either way (tests/test_roundtrip.py).
#
# The same reduction and storage registration run in C
# (csrc/python/pickle_fast_path.cc, ~1.5 us a tensor instead of ~7) whenever
# a tensor's Python state is its instance dict, which is what the C version
# checks; _reduce_dense below is the reference and the fallback.

class _DenseStorage:
    """What the fast reduction hands persistent_id: a tensor's storage and dtype."""

    __slots__ = ("storage", "dtype")

    def __init__(self, storage: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.storage, self.dtype = storage, dtype


_FAST_DEVICES = frozenset(("cpu", "cuda"))
_V3_DTYPES = frozenset(torch.storage._new_dtypes())  # torch reduces these with _rebuild_tensor_v3
# Objects persistent_id can dismiss by type alone (never a storage).
_NEVER_STORAGE = frozenset((int, float, bool, str, bytes, type(None), tuple, list, dict, torch.Size, torch.dtype))
# Tensors are reduced, never persisted: the C filter answers None for these
# exact types (so persistent_id runs in Python only for what may be a storage).
_NEVER_PERSISTED = (torch.Tensor, torch.nn.Parameter)
# dtype -> torch.<Dtype>Storage, as TypedStorage._pickle_storage_type names it
_storage_types: dict[torch.dtype, type] = {}


def _storage_type_of(dtype: torch.dtype) -> type:
    t = _storage_types.get(dtype)
    if t is None:
        typed = torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(0), dtype=dtype, _internal=True)
        t = _storage_types[dtype] = getattr(torch, typed._pickle_storage_type())
    return t


def _cpu_storages_tag_as_cpu() -> bool:
    """Whether location_tag(s) is "cpu" for every CPU storage s: torch's CPU
    tagger is the first one asked, but for taggers marked as never tagging
    what ckptio's pickler meets (ckptio's own staged-location tagger answers
    only inside torch.save calls made by its torch backend). A tagger anyone
    else registers ahead of it is honoured, storage by storage."""
    for _, tagger, _ in torch.serialization._package_registry:
        if tagger is torch.serialization._cpu_tag:
            return True
        if not getattr(tagger, "ckptio_silent_in_pickle_state", False):
            return False
    return False


def _torch_reduction(t: torch.Tensor) -> Any:
    return t.__reduce_ex__(_PICKLE_PROTOCOL)


def _reduce_dense(t: torch.Tensor) -> Any:
    if (t.device.type not in _FAST_DEVICES or t.layout is not torch.strided or t.is_quantized
            or t.dtype in _V3_DTYPES or t._backward_hooks or torch._utils._get_obj_state(t)):
        return _torch_reduction(t)
    args: tuple[Any, ...] = (_DenseStorage(t.untyped_storage(), t.dtype), t.storage_offset(), tuple(t.size()),
                             t.stride(), t.requires_grad, OrderedDict())
    metadata = torch._utils.get_tensor_metadata(t)
    if metadata:
        args = args + (metadata,)
    return (torch._utils._rebuild_tensor_v2, args)



@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block (nestable). A pickling
    pass lists every storage as a Python object, and those are GC-tracked:
    10,000 of them alive when a collection starts cost it ~5 ms, so callers
    that drop them soon (the snapshot) keep the pause until they have."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _Pickler(pickle.Pickler):
    """pickle.Pickler at protocol 2 with a persistent_id, as torch.save
    makes it: a method of a subclass (Python 3.13.0's C Pickler refuses the
    attribute on its instances)."""

    def __init__(self, file: IO[bytes], persistent_id: Callable[[Any], Any]) -> None:
        super().__init__(file, protocol=_PICKLE_PROTOCOL)
        self._persistent_id = persistent_id

    def persistent_id(self, obj: Any) -> Any:
        return self._persistent_id(obj)


# Tests switch this off to compare the native pickler with pickle.Pickler.
_use_native_pickler = True


def pickle_state(obj: object, path: str | os.PathLike[str]) -> PickledState:
    """Pickle `obj` as torch.save(obj, path) would and list its records."""
    state = PickledState(prefix=archive_prefix(os.fspath(path)))
    keys: dict[int, str] = {}
    storage_dtypes: dict[int, torch.dtype] = {}

    def add_storage(storage: torch.UntypedStorage, storage_dtype: torch.dtype, storage_type: type,
                    storage_numel: int, location: str) -> tuple[str, type, str, str, int]:
        if storage.data_ptr() != 0 and str(storage.device) != "meta":
            seen = storage_dtypes.setdefault(storage.data_ptr(), storage_dtype)
            if seen != storage_dtype:
                raise RuntimeError(
                    "Cannot save multiple tensors or storages that view the same data as different types"
                )
        key = keys.get(storage._cdata)
        if key is None:
            key = keys[storage._cdata] = str(len(keys))
            state.register(storage, location)
        return ("storage", storage_type, key, location, storage_numel)

    def persistent_id(o: Any) -> tuple[str, type, str, str, int] | None:
        cls = type(o)
        if cls in _NEVER_STORAGE:
            return None
        if cls is _DenseStorage:
            storage, dtype = o.storage, o.dtype
            location = "cpu" if cpu_is_cpu and storage.device.type == "cpu" else location_tag(storage)
            return add_storage(storage, dtype, _storage_type_of(dtype), storage.nbytes() // dtype.itemsize, location)
        if isinstance(o, torch.storage.TypedStorage) or torch.is_storage(o):
            if isinstance(o, torch.storage.TypedStorage):
                storage = o._untyped_storage
                storage_dtype = o.dtype
                storage_type = getattr(torch, o._pickle_storage_type())
                storage_numel = o._size()
            else:
                storage = o
                storage_dtype = torch.uint8
                storage_type = normalize_storage_type(type(o))
                storage_numel = storage.nbytes()
            if getattr(o, "_fake_device", None) is not None:
                location = str(o._fake_device)
            else:
                location = location_tag(storage)
            return add_storage(storage, storage_dtype, storage_type, storage_numel, location)
        return None

    buf = io.BytesIO()
    # Called for every pickled object: built-in values are answered in C.
    filtered_persistent_id = _C.persistent_id_filter(persistent_id, _NEVER_PERSISTED)
    pickler = _Pickler(buf, filtered_persistent_id)
    cpu_is_cpu = _cpu_storages_tag_as_cpu()
    reduce_tensor = None
    if not torch.serialization._serialization_tls.skip_data:
        if tensor_state_is_instance_dict():  # then the C reducer reads t.__dict__, never __getstate__
            # _reduce_dense and add_storage in C, sharing this pass's tables.
            reduce_tensor = _C.dense_reducer(
                _torch_reduction, torch._utils._rebuild_tensor_v2, torch.strided, _V3_DTYPES,
                torch._C._get_tensor_metadata,  # type: ignore[attr-defined]  # absent from torch's stubs
                OrderedDict, keys, storage_dtypes, state.registry(),
                _storage_types, _storage_type_of, location_tag, cpu_is_cpu)
            pickler.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: reduce_tensor}
        else:
            pickler.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _reduce_dense}
        # Exact type only: Parameters and tensor subclasses keep their own reductions.
        # A plain dict (a ChainMap's lookups run in Python, once per object),
        # copied each time so later copyreg registrations are honoured.
    # The pickler's memo keeps every object it makes alive, so the cyclic
    # GC would rescan an ever larger heap over and over (a third of the time
    # of a 10,000-tensor state); nothing made here forms a cycle.
    with gc_paused():
        data = None
        if reduce_tensor is not None and _use_native_pickler:
            # The same pickle, written in C (csrc/python/native_pickler.cc);
            # None where it leaves the object to pickle.Pickler.
            data = _C.pickle_protocol2(obj, filtered_persistent_id, reduce_tensor, pickler.dispatch_table,
                                       torch.Tensor)
            if data is None:  # start the pass again, its tables empty
                tables: tuple[dict[Any, Any] | list[Any], ...] = (keys, storage_dtypes, *state.registry())
                for table in tables:
                    table.clear()
        if data is None:
            pickler.dump(obj)
            data = buf.getvalue()
    p = state.prefix
    state.head = [
        (f"{p}/data.pkl", data),
        (f"{p}/.format_version", b"1"),
        (f"{p}/.storage_alignment", str(ALIGNMENT).encode()),
        (f"{p}/byteorder", sys.byteorder.encode()),
    ]
    # What PyTorchStreamWriter::writeEndOfFile appends.
    state.tail = [(f"{p}/version", b"3\n"), (f"{p}/.data/serialization_id", _serialization_id())]
    return state


def _serialization_id() -> bytes:
    # torch uses 40 decimal digits (a hash of names and CRCs, used only for
    # logging); random digits serve the same purpose.
    return "".join(str(secrets.randbelow(10)) for _ in range(40)).encode()
