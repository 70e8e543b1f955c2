"""ckptio.load_into: read a checkpoint straight into tensors that already exist.

A resume usually owns its destination memory before it reads a byte: the
model and optimizer are built, and their state_dict() tensors share storage
with the live parameters and optimizer state. Reading into that memory skips
what every other loader pays: allocating, faulting in and then copying a
second copy of the state.

Two passes over the pickle, one over the payloads:

1. The pickle is unpickled with placeholder (meta) storages: that gives the
   checkpoint's object graph, and for every tensor its record, offset, shape,
   stride and dtype, without reading a payload.
2. Tensors are paired with the target by key path (dict keys and list/tuple
   indices). A record is *placed* in the target when one paired tensor covers
   it whole and its target is contiguous CPU memory that no other record is
   placed into. Strict mode refuses any unpaired or mismatched tensor here,
   before anything is written.
3. The engine reads every record, placed ones straight into the target's
   memory (CRC-32 checked as each block lands), the rest into fresh buffers,
   while torch's own unpickler rebuilds the object graph over those storages.
   Paired tensors that could not be placed (non-contiguous or non-CPU
   targets, tied target storage) are then copied in with ``copy_``.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.serialization

from . import archive as _archive, remote
from ._paths import normalize_path
from .api import _resolve_weights_only, load, unpickle_archive, with_local_copy
from .config import verify_by_default
from .errors import CheckpointNotFoundError, CkptioError, CorruptCheckpointError, StateMismatchError
from .save_queue import get_queue
from .skeleton import fast_load, native_byte_order, unpickle_skeleton

__all__ = ["load_into"]

_MISSING = object()
_KeyPath = tuple[Any, ...]  # dict keys and list/tuple indices, outermost first


def load_into(target: Any, path: str | os.PathLike[str], *, strict: bool = True, verify: bool | None = None,
              weights_only: bool | None = True, map_location: Any = None) -> Any:
    """Load the checkpoint at `path` into the tensors of `target`.

    `target` is a nested dict/list of tensors shaped like the checkpoint,
    typically ``{"model": model.state_dict(), "optimizer": opt.state_dict()}``.
    Every checkpoint tensor whose key path exists in `target` with the same
    shape and dtype ends up in that target tensor's memory (read there
    directly where the layout allows, else copied in); the returned object is
    the checkpoint's object graph with those tensors being `target`'s own
    tensor objects, and everything else (steps, hyperparameters, tensors
    `target` has no place for) as ``ckptio.load`` would return it.

    strict=True (the default) raises StateMismatchError naming every key
    path that is in one but not the other, or whose shape or dtype differ,
    before writing anything into `target`. strict=False loads unpaired
    checkpoint tensors into fresh memory and leaves unpaired target tensors
    as they are.

    verify (default CKPTIO_VERIFY) checks every record's CRC-32 while its
    bytes are read. A damaged record raises CorruptCheckpointError naming it;
    its ``written_keys`` lists the target key paths whose memory the load had
    already written into (they may hold partial data). Every other target
    tensor is untouched. Records smaller than a quarter of a read block are
    checked before they are copied, so a damaged small record never reaches
    `target`.
    """
    path = normalize_path(path)
    get_queue().wait_path(path)
    if remote.is_url(path):
        return with_local_copy(path, lambda local: load_into(target, local, strict=strict, verify=verify,
                                                             weights_only=weights_only, map_location=map_location))
    verify = verify_by_default() if verify is None else bool(verify)
    weights_only = _resolve_weights_only(weights_only)
    if not os.path.exists(path):
        raise CheckpointNotFoundError.missing_checkpoint(path)
    if os.path.isfile(path) and os.path.getsize(path) > 0 and not _archive.is_zip_checkpoint(path):
        # A pre-1.6 torch file: no records to place; load it and copy.
        return _copy_into(target, load(path, map_location, weights_only=weights_only, verify=verify), strict, path)

    arc = _archive.open_archive(path)
    if "constants.pkl" in arc.records:
        raise CkptioError(f"{path}: is a TorchScript archive; load it with torch.jit.load")
    metadata = _archive.read_small_records(path, {None: arc}, verify=verify)[None]
    skeleton, record_of = unpickle_skeleton(arc, metadata, weights_only, path, unpickle_archive)
    pairs, missing = _pair(skeleton, target)
    _check(pairs, missing, strict, path)
    plan = _Plan.of(arc, pairs, record_of)
    native = native_byte_order(metadata.get("byteorder"))
    if not native:
        # torch byte-swaps each storage as its unpickler meets it, before the
        # bytes would have arrived in place: read fresh, then copy.
        plan = _Plan(placed={}, copies=plan.pairs, pairs=plan.pairs)
    result = _read(arc, metadata, plan, verify, weights_only, map_location, path, fast=native)
    return _adopt(result, target, plan)


# --------------------------------------------------------------------------
# Pairing checkpoint tensors with target tensors by key path
# --------------------------------------------------------------------------

@dataclass
class _Pair:
    key: _KeyPath         # the key path
    saved: torch.Tensor   # the checkpoint's tensor (meta)
    target: Any           # the target's value at `key`, or _MISSING

    @property
    def matches(self) -> bool:
        t = self.target
        return (isinstance(t, torch.Tensor) and t.shape == self.saved.shape and t.dtype == self.saved.dtype
                and t.layout == self.saved.layout)


def _children(obj: object) -> list[tuple[Any, Any]] | None:
    """(key, value) of a container load_into walks into; None for a leaf."""
    if isinstance(obj, Mapping):
        return list(obj.items())
    if isinstance(obj, (list, tuple)):
        return list(enumerate(obj))
    return None


def _lookup(container: object, key: Any) -> Any:
    if isinstance(container, Mapping):
        return container.get(key, _MISSING)
    if isinstance(container, (list, tuple)) and isinstance(key, int) and 0 <= key < len(container):
        return container[key]
    return _MISSING


def _pair(skeleton: Any, target: Any) -> tuple[list[_Pair], list[_KeyPath]]:
    """Pairs every checkpoint tensor reachable through dicts/lists/tuples with
    the target's value at the same key path; also lists the key paths of
    target tensors the checkpoint has no tensor for."""
    pairs: list[_Pair] = []

    def walk(saved: Any, tgt: Any, key: _KeyPath) -> None:
        if isinstance(saved, torch.Tensor):
            pairs.append(_Pair(key, saved, tgt))
            return
        for k, v in _children(saved) or ():
            walk(v, _lookup(tgt, k) if tgt is not _MISSING else _MISSING, key + (k,))

    walk(skeleton, target, ())
    saved_keys = {p.key for p in pairs}
    missing: list[_KeyPath] = []

    def walk_target(tgt: Any, key: _KeyPath) -> None:
        if isinstance(tgt, torch.Tensor):
            if key not in saved_keys:
                missing.append(key)
            return
        for k, v in _children(tgt) or ():
            walk_target(v, key + (k,))

    walk_target(target, ())
    return pairs, missing


def key_path(key: _KeyPath) -> str:
    """A key path as error messages show it: "model/layer.weight", "optimizer/state/0/exp_avg"."""
    return "/".join(str(k) for k in key) or "<the whole object>"


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{tuple(t.shape)} {t.dtype}" + ("" if t.layout == torch.strided else f" {t.layout}")
    return type(t).__name__


def _check(pairs: list[_Pair], missing: list[_KeyPath], strict: bool, path: str) -> None:
    if not strict:
        return
    unexpected = [key_path(p.key) for p in pairs if p.target is _MISSING]
    mismatched = {key_path(p.key): (_describe(p.saved), _describe(p.target))
                  for p in pairs if p.target is not _MISSING and not p.matches}
    missing_paths = [key_path(k) for k in missing]
    if unexpected or mismatched or missing_paths:
        raise StateMismatchError(path, missing=missing_paths, unexpected=unexpected, mismatched=mismatched)


# --------------------------------------------------------------------------
# Placing records in target memory
# --------------------------------------------------------------------------

class MemoryClaims:
    """Byte ranges of target memory that records are placed into; a range
    overlapping one already claimed (tied weights, a tensor under two keys) is
    refused, so no two concurrent reads write the same bytes."""

    def __init__(self) -> None:
        self._starts: list[int] = []  # sorted; the claimed ranges never overlap
        self._ends: list[int] = []

    def claim(self, start: int, size: int) -> bool:
        i = bisect.bisect_right(self._starts, start)
        if i > 0 and self._ends[i - 1] > start:
            return False
        if i < len(self._starts) and self._starts[i] < start + size:
            return False
        self._starts.insert(i, start)
        self._ends.insert(i, start + size)
        return True


@dataclass
class _Placement:
    storage: torch.UntypedStorage  # what the unpickler builds the record's tensors on
    address: int                   # where the engine writes the record's bytes
    keys: list[str] = field(default_factory=list)  # target key paths this record writes into


@dataclass
class _Plan:
    placed: dict[str, _Placement]  # record name -> _Placement
    copies: list[_Pair]  # _Pairs whose bytes are copied in after the read
    pairs: list[_Pair]   # every matching _Pair

    @classmethod
    def of(cls, arc: _archive.Archive, pairs: list[_Pair], record_of: dict[int, str]) -> _Plan:
        matching = [p for p in pairs if p.matches]
        by_record: dict[str | None, list[_Pair]] = {}
        for p in matching:
            by_record.setdefault(record_of.get(p.saved.untyped_storage()._cdata), []).append(p)
        by_record.pop(None, None)
        placed: dict[str, _Placement] = {}
        claimed = MemoryClaims()
        for name, group in by_record.items():
            assert name is not None  # popped
            placement = _placement(arc.records[name].size, group, claimed)
            if placement is not None:
                placed[name] = placement
        copies = [p for p in matching if not _lands_in_place(p, record_of, placed)]
        return cls(placed, copies, matching)


def _placement(size: int, group: list[_Pair], claimed: MemoryClaims) -> _Placement | None:
    """Where record bytes can go straight into a target: a paired tensor that
    covers the record whole (contiguous, from its start) whose target is
    contiguous CPU memory no other record is placed into."""
    for p in group:
        saved, tgt = p.saved, p.target
        if not (saved.is_contiguous() and saved.storage_offset() == 0 and saved.nbytes == size and size > 0):
            continue
        if tgt.device.type != "cpu" or not tgt.is_contiguous() or tgt.is_quantized or tgt.is_sparse:
            continue
        start = tgt.data_ptr()
        if not claimed.claim(start, size):
            continue  # tied or overlapping target memory: copied in order instead
        storage = tgt.untyped_storage()
        offset = start - storage.data_ptr()
        if offset != 0 or storage.nbytes() != size:
            storage = storage[offset:offset + size]  # a view that keeps the target's storage alive
        return _Placement(storage, start, [key_path(p.key)])
    return None


def _lands_in_place(p: _Pair, record_of: dict[int, str], placed: dict[str, _Placement]) -> bool:
    """Whether the tensor the unpickler builds for `p` on its placed record's
    storage is exactly p.target's memory (then nothing is left to copy)."""
    record = record_of.get(p.saved.untyped_storage()._cdata)
    placement = placed.get(record) if record is not None else None
    if placement is None:
        return False
    itemsize = p.saved.element_size()
    address = placement.address + p.saved.storage_offset() * itemsize
    in_place = (address == p.target.data_ptr() and p.saved.stride() == p.target.stride()
                and p.target.device.type == "cpu")
    if in_place and key_path(p.key) not in placement.keys:
        placement.keys.append(key_path(p.key))
    return in_place


# --------------------------------------------------------------------------
# Pass 2: read and rebuild
# --------------------------------------------------------------------------

class _PlacedArchive(_archive.LoadedArchive):
    """torch's zip reader interface over one engine read: placed records are
    the target's memory, the others fresh buffers."""

    def __init__(self, archive: _archive.Archive, reader: _archive.RecordReader, metadata: dict[str, bytes],
                 plan: _Plan) -> None:
        super().__init__(archive, reader, known=metadata)
        self._plan = plan
        self.placed_storages: set[int] = set()  # _cdata of the storages that are target memory

    def get_storage_from_record(self, name: str, numel: int, storage_type: object) -> _archive._RecordStorage:
        placement = self._plan.placed.get(name)
        if placement is None:
            return super().get_storage_from_record(name, numel, storage_type)
        self.check_size(name, numel)
        self.placed_storages.add(placement.storage._cdata)
        return _archive._RecordStorage(placement.storage)  # filled in the background; checked by finish()


def _read(arc: _archive.Archive, metadata: dict[str, bytes], plan: _Plan, verify: bool, weights_only: bool,
          map_location: Any, path: str, fast: bool) -> Any:
    records = [(name, r) for name, r in arc.records.items() if name.startswith("data/")]
    destinations = {name: (p.address, p.storage) for name, p in plan.placed.items()}
    reader = _archive.RecordReader(arc.path, records, verify=verify, destinations=destinations)
    zip_reader = _PlacedArchive(arc, reader, metadata, plan)
    restore = torch.serialization._get_restore_location(map_location)

    def place(storage: torch.UntypedStorage, location: str) -> Any:
        if storage._cdata in zip_reader.placed_storages:
            return storage  # target memory stays where it is
        return restore(storage, location)

    def storage_for(name: str, location: str, nbytes: int) -> torch.UntypedStorage:
        return place(zip_reader.get_storage_from_record(name, nbytes, None)._untyped_storage, location)

    try:
        result = fast_load(metadata["data.pkl"], storage_for) if fast else None  # it does not byte-swap
        if result is None:
            result = unpickle_archive(zip_reader, place, weights_only, path)
        reader.finish()
    except CorruptCheckpointError as e:
        reader.abandon()
        written = [k for name, placement in plan.placed.items() if reader.written(name) for k in placement.keys]
        e.written_keys = tuple(written)
        if written:
            e.args = (f"{e.args[0]}\nload_into had already written into these target tensors (they may hold "
                      f"partial data; every other target tensor is untouched): {', '.join(written)}",)
        raise
    except BaseException:
        reader.abandon()
        raise
    return result


def _adopt(result: Any, target: Any, plan: _Plan) -> Any:
    """Copies in the paired tensors that could not be placed, then puts the
    target's own tensor objects into the result at their key paths.

    Copies to CUDA targets are queued on a side stream (host-to-device while
    the next copy is prepared) and waited for before returning; the rest are
    plain copy_ in the checkpoint's order (so tied targets end up holding the
    last tensor written to them, as load_state_dict leaves them)."""
    stream: torch.cuda.Stream | None = None
    with torch.no_grad():
        for p in plan.copies:
            loaded = _get(result, p.key)
            if p.target.device.type == "cuda":
                stream = stream or torch.cuda.Stream(device=p.target.device)
                with torch.cuda.stream(stream):
                    p.target.copy_(loaded, non_blocking=True)
            else:
                p.target.copy_(loaded)
    if stream is not None:
        stream.synchronize()  # the loaded host tensors may be freed once we return
    for p in plan.pairs:
        result = _set(result, p.key, p.target)
    return result


def _get(obj: Any, key: _KeyPath) -> Any:
    for k in key:
        obj = obj[k]
    return obj


def _set(obj: Any, key: _KeyPath, value: Any) -> Any:
    """obj with the value at `key` replaced (tuples are rebuilt, others set in place)."""
    if not key:
        return value
    head, rest = key[0], key[1:]
    child = _set(obj[head], rest, value)
    if isinstance(obj, tuple):
        items = list(obj)
        items[head] = child
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    obj[head] = child
    return obj


def _copy_into(target: Any, loaded: Any, strict: bool, path: str) -> Any:
    """load_into for a file with no records to place (legacy format): pair,
    check, copy."""
    pairs, missing = _pair(loaded, target)
    _check(pairs, missing, strict, path)
    plan = _Plan(placed={}, copies=[p for p in pairs if p.matches], pairs=[p for p in pairs if p.matches])
    return _adopt(loaded, target, plan)
