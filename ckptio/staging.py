"""The staging arena: where async saves snapshot tensor bytes.

A snapshot copies every storage of a checkpoint into page-aligned,
pre-faulted host memory that is kept across saves (first-touch page faults
cost several times the copy), at page-aligned offsets, so the engine writes
whole blocks from it with O_DIRECT and no further copy. The arena has
CKPTIO_STAGING_SLOTS slots: with two, save N+1 snapshots into one while save
N is still being written from the other; when every slot is busy, the next
snapshot waits for one (memory stays bounded). Only the very first snapshot
faults memory on the caller's thread: the other slots are grown to its size
on a background thread (or ahead of time with ckptio.reserve_staging).

With CUDA tensors the slot is registered with cudaHostRegister and
device-to-host copies run non_blocking on a side stream, ending with one
event wait, so the snapshot moves at PCIe speed without extra pinned
allocations.

A lazy snapshot (ckptio.lazy_snapshot) leaves the copy of some storages to a
background thread (CPU) or to the side stream (CUDA) and returns at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Sequence
from itertools import accumulate

import torch

from . import _C
from ._engine import get_engine
from .lazy_snapshot import LazyCopy
from .service.segments import SharedSegment

__all__ = ["StagingArena", "Slot", "page_round"]

_PAGE = 4096
# A storage to copy: (storage, data_ptr, offset in the slot, size, device type).
_Item = tuple[torch.UntypedStorage, int, int, int, str]


def page_round(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


class Slot:
    """One reusable snapshot buffer."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.buffer: _C.AlignedBuffer | SharedSegment | None = None
        self.tensor: torch.Tensor | None = None  # uint8 view of the whole buffer, no copy
        self.pinned = False  # registered with cudaHostRegister

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else self.buffer.capacity

    def ensure_capacity(self, nbytes: int) -> None:
        """Grow to hold `nbytes` (pre-faulted, GIL released while faulting).
        While saves go through the service the memory is a shared segment
        (ckptio.service.segments), so that handing a save over copies nothing."""
        from .service import wanted

        shared = wanted()
        if nbytes <= self.capacity and (not shared or isinstance(self.buffer, SharedSegment)):
            return
        nbytes = max(nbytes, self.capacity)
        self._unpin()
        self.buffer = self.tensor = None  # free the old one before taking more
        self.buffer = _shared_or_none(nbytes) if shared else None
        if self.buffer is None:
            self.buffer = _C.AlignedBuffer(nbytes, nbytes, True)
        self.tensor = torch.frombuffer(self.buffer, dtype=torch.uint8)

    def retire(self) -> None:
        """Let go of this slot's memory for good (the next snapshot here gets
        new memory): a checkpoint service that was given up on may still hold
        the segment and, should it wake, write from it."""
        self._unpin()
        self.buffer = self.tensor = None

    def pin(self) -> None:
        if not self.pinned and self.buffer is not None and torch.cuda.is_available():
            rc = torch.cuda.cudart().cudaHostRegister(self.buffer.address, self.buffer.capacity, 0)
            self.pinned = int(rc) == 0 if not isinstance(rc, tuple) else int(rc[0]) == 0

    def _unpin(self) -> None:
        if self.pinned:
            assert self.buffer is not None  # pinned: a buffer
            torch.cuda.cudart().cudaHostUnregister(self.buffer.address)
            self.pinned = False


def _shared_or_none(nbytes: int) -> SharedSegment | None:
    """A shared segment, or None (with a warning, once) when the memory for
    one is short: saves then stage privately and are written in-process."""
    from .service.segments import create_segment

    try:
        return create_segment(nbytes)
    except OSError as e:
        import warnings

        warnings.warn(f"ckptio: no shared memory for a {nbytes}-byte staging segment ({e}); this save is written "
                      "in this process, not by the checkpoint service", RuntimeWarning, stacklevel=4)
        return None


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A 1-D uint8 tensor over the whole storage, on its device, no copy."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class StagingArena:
    """`slots` reusable snapshot buffers; acquire() waits while all are busy."""

    def __init__(self, slots: int) -> None:
        self._slots = [Slot(i) for i in range(slots)]
        self._free = list(self._slots)
        self._cond = threading.Condition()
        self._side_stream: torch.cuda.Stream | None = None
        self._grower: threading.Thread | None = None  # faults slots in off the caller's thread

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    def acquire(self) -> Slot:
        """The most recently released free slot: saves that do not overlap
        keep reusing one warm slot (whose pages are hottest), and the other
        slots, faulted in the background, serve saves that overlap a write."""
        with self._cond:
            while not self._free:
                self._cond.wait()
            return self._free.pop()

    def release(self, slot: Slot) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify_all()

    def grow_in_background(self, nbytes: int, at_most: int | None = None) -> None:
        """Fault in every free slot smaller than `nbytes` (at most `at_most`
        of them) on a background thread, so that a later snapshot finds warm
        memory instead of paying first-touch page faults on the caller's
        thread. A slot being grown is not handed out until it is ready
        (acquire() then waits for it only if no other slot is free)."""
        with self._cond:
            targets = [slot for slot in self._free if slot.capacity < nbytes][:at_most]
            if not targets:
                return
            for slot in targets:
                self._free.remove(slot)
            previous = self._grower
            self._grower = threading.Thread(target=self._grow, args=(targets, nbytes, previous),
                                            name="ckptio-staging-prefault", daemon=True)
            self._grower.start()

    def _grow(self, slots: list[Slot], nbytes: int, previous: threading.Thread | None) -> None:
        if previous is not None:
            previous.join()  # one grower at a time: memory is faulted once, in order
        for slot in slots:
            try:
                slot.ensure_capacity(nbytes)
            except MemoryError:
                pass  # the snapshot that needs it grows it, and reports a failure there
            finally:
                with self._cond:
                    self._free.insert(0, slot)  # behind the warm, most recently used slot
                    self._cond.notify_all()

    def join_background(self, timeout: float | None = None) -> None:
        """Wait for background faulting to finish (teardown leaves no thread)."""
        with self._cond:
            grower = self._grower
        if grower is not None:
            grower.join(timeout)

    def snapshot(self, slot: Slot, storages: Sequence[torch.UntypedStorage], *,
                 known: tuple[list[int], list[str], list[int], list[int]] | None = None,
                 lazy: Collection[int] | None = None) -> tuple[list[tuple[int, int]], LazyCopy | None]:
        """Copy `storages` into `slot`; returns each one's (address, size)
        there, and the LazyCopy still running (None if nothing is left).

        `known`, if given, is (nbytes, device types, data_ptrs, _cdata) of
        each storage, as a PickledState notes them while pickling: asking
        torch again costs ~1 us a storage. `lazy`, if given, is a set of
        storage ``_cdata`` keys whose copy may run in the background (see
        ckptio.lazy_snapshot); every other storage is copied before this
        returns, and the caller may then overwrite or free it.
        """
        if known is None:
            device_types = [s.device.type for s in storages]
            known = ([s.nbytes() for s in storages], device_types,
                     [s.data_ptr() if kind == "cpu" else 0 for s, kind in zip(storages, device_types)],
                     [s._cdata for s in storages])
        sizes, device_types, data_ptrs, cdatas = known  # data_ptrs are read for CPU storages only
        offsets = list(accumulate([-(-n // _PAGE) * _PAGE for n in sizes], initial=0))  # page_round, inlined
        total = offsets.pop()
        slot.ensure_capacity(max(total, _PAGE))
        self.grow_in_background(total)  # the next overlapping save finds its slot warm
        assert slot.buffer is not None  # ensure_capacity made one
        base = slot.buffer.address
        payloads = [(base + off, n) for off, n in zip(offsets, sizes)]
        # (storage, data_ptr, offset, size, device type) of each storage with bytes
        items: list[_Item] = [item for item in zip(storages, data_ptrs, offsets, sizes, device_types) if item[3]]
        later: list[_Item] = []
        if lazy:
            now: list[_Item] = []
            for item, cdata in zip(items, (c for c, n in zip(cdatas, sizes) if n)):
                (later if cdata in lazy and item[4] in _LAZY_DEVICES else now).append(item)
            items = now
        finish = self._start_cuda_copies(slot, items)
        self._copy_on_host(slot, items)
        finish()
        if not later:
            return payloads, None
        finish = self._start_cuda_copies(slot, later)  # queued now, behind the caller's queued work

        def copy_later() -> None:
            # Read each source again now: a storage resized in place since
            # the call (FSDP frees parameters with resize_(0)) must fail the
            # save, not be read at its old address or past its new end.
            for s, _, _, n, kind in later:
                if kind == "cpu" and s.nbytes() != n:
                    raise RuntimeError(f"a storage of {n} bytes was resized to {s.nbytes()} before its lazy "
                                       "snapshot copy: nothing was written (wait_snapshots() before resizing)")
            self._copy_on_host(slot, [(s, s.data_ptr() if kind == "cpu" else ptr, off, n, kind)
                                      for s, ptr, off, n, kind in later])
            finish()

        return payloads, LazyCopy(copy_later, keepalive=later)

    def _copy_on_host(self, slot: Slot, items: list[_Item]) -> None:
        """Copy the non-CUDA storages of [(storage, data_ptr, offset, size,
        device type)] into `slot`: CPU ones in one engine call (split across
        the engine's copy threads and this one, GIL released), other devices
        (e.g. XLA, MPS) by way of a host copy, storage by storage."""
        assert slot.buffer is not None and slot.tensor is not None  # the snapshot sized it
        base = slot.buffer.address
        cpu = [(ptr, base + off, n) for _, ptr, off, n, kind in items if kind == "cpu"]
        if cpu:
            get_engine().copy(cpu)
        for s, _, off, n, kind in items:
            if kind not in ("cpu", "cuda"):
                slot.tensor[off : off + n].copy_(_as_bytes(s.cpu()))

    def _start_cuda_copies(self, slot: Slot, items: list[_Item]) -> Callable[[], None]:
        """Queue device-to-host copies of the CUDA storages of `items` on a
        side stream that first waits for the work already queued on the
        caller's stream; returns a function that waits for them."""
        cuda = [(s, off, n) for s, _, off, n, kind in items if kind == "cuda"]
        if not cuda:
            return _nothing_to_wait_for
        assert slot.tensor is not None  # the snapshot sized it
        slot.pin()
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        stream = self._side_stream
        # The side stream must see every write the training stream queued.
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for s, off, n in cuda:
                slot.tensor[off : off + n].copy_(_as_bytes(s), non_blocking=slot.pinned)
            done = torch.cuda.Event()
            done.record(stream)
        return done.synchronize


def _nothing_to_wait_for() -> None:
    pass


# Devices whose storages a lazy snapshot may copy in the background: the
# engine's host copy and CUDA's side stream read them without the caller.
_LAZY_DEVICES = frozenset(("cpu", "cuda"))
