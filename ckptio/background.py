"""Async saves: snapshot on the caller's thread, write on the shared queue.

``stage(obj, path, write_staged)`` is the one path every backend's async
save takes: pickle the object (torch.save's pickler), copy its storages into
the staging arena, and queue ``write_staged(staged)`` on the shared FIFO
queue. The caller gets a SaveHandle as soon as the copy is done.

When the storages exceed CKPTIO_STAGING_BUDGET_MB the save streams instead:
the engine writes straight from the caller's tensors through a pair of
CKPTIO_CHUNK_MB chunks, and the caller waits until the last chunk has left
its tensors (memory stays at two chunks; the file is the same).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._engine import get_engine
from ._paths import check_destination, remove_stale_temporaries
from .config import resolve_snapshot_mode, staging_config
from .early_reserve import available_memory_bytes, reserve_at_optimizer_steps, stop_reserving
from .lazy_snapshot import lazily_copyable_storages
from .pickling import ALIGNMENT, PickledState, gc_paused, pickle_state
from .preemption import durable_if_signalled
from .results import SaveResult
from .save_queue import SaveHandle, get_queue
from .staging import Slot, StagingArena

if TYPE_CHECKING:
    import torch

    from .pickling import NamedPayload
    from .service.client import Handover

__all__ = ["NativeWrite", "Staged", "stage", "get_arena", "reserve_staging", "reserve_before_saves", "write_native",
           "streaming_native_save"]


@dataclass
class NativeWrite:
    """A save the engine writes, which the checkpoint service may therefore
    finish without the trainer (see ckptio.service): what else it does then."""

    after: dict[str, Any] | None = None   # a CheckpointManager's pointer and pruning (service.server._prune)
    memory: dict[str, Any] | None = None  # the memory-tier image to keep (service.memory_tier.store)
    remote: dict[str, Any] | None = None  # the remote copy to make (remote_tier.RemoteTier.service_spec, and name)


@dataclass
class Staged:
    """A checkpoint whose bytes live in a staging slot (or, streaming, in the caller's tensors)."""

    state: PickledState
    payloads: list[tuple[int, int]]  # (address, size) of each storage's bytes
    slot: Slot | None = None
    native: NativeWrite | None = None  # the engine writes it (where the service may)
    handover: Handover | None = None   # the service has it

    def records(self) -> list[NamedPayload]:
        return self.state.records_for(self.payloads)

    def storage_views(self) -> list[torch.UntypedStorage]:
        """Each staged storage as its own CPU UntypedStorage over slot memory (no copy)."""
        import torch

        assert self.slot is not None and self.slot.buffer is not None  # staged, not streamed
        views = []
        base = self.slot.buffer.address
        mv = memoryview(self.slot.buffer)
        for address, size in self.payloads:
            if size == 0:
                views.append(torch.UntypedStorage(0))
            else:
                off = address - base
                views.append(torch.frombuffer(mv[off : off + size], dtype=torch.uint8).untyped_storage())
        return views

    def rebuild(self, *, own_memory: bool = False) -> tuple[Any, list[torch.UntypedStorage]]:
        """The checkpoint object again, every storage on the CPU; returns
        (object, storages).

        torch's own unpickling rebuilds it from the snapshot's pickle (ours,
        made from the caller's object, so trusted). The tensors view slot
        memory, valid until the slot is released, unless `own_memory`: then
        each storage is a copy the receiver may keep for as long as it likes.
        """
        import pickle

        import torch.serialization

        from .archive import _RecordStorage

        storages = self.storage_views()
        if own_memory:
            storages = [s.clone() for s in storages]
        records = {name.split("/", 1)[1]: data for name, data in self.state.head + self.state.tail}

        class _Snapshot:
            def has_record(self, name: str) -> bool:
                return name in records

            def get_record(self, name: str) -> bytes:
                return records[name]

            def get_storage_from_record(self, name: str, numel: int, storage_type: object) -> _RecordStorage:
                return _RecordStorage(storages[int(name.rsplit("/", 1)[1])])

            def serialization_id(self) -> str:
                return ""

        obj = torch.serialization._load(_Snapshot(), lambda storage, location: storage, pickle, encoding="utf-8")
        return obj, storages


_arena: StagingArena | None = None
_arena_lock = threading.Lock()


def get_arena() -> StagingArena:
    global _arena
    with _arena_lock:
        if _arena is None:
            _arena = StagingArena(staging_config().slots)
        return _arena


def reserve_staging(size: object, *, wait: bool = False) -> int:
    """Fault in every staging slot now, in the background (or before
    returning, with wait=True), so that not even the first async saves pay
    for first-touch page faults; returns the bytes reserved per slot.

    `size` is either a state like the ones you will save (e.g.
    ``{"model": model.state_dict(), "optimizer": opt.state_dict()}``: its
    storages are measured exactly) or a number of tensor bytes (1% and 1 MiB
    are added for the page alignment of each storage). A larger checkpoint
    later still works: its slot grows then.
    """
    from .staging import page_round

    if isinstance(size, int) and not isinstance(size, bool):
        if size < 0:
            raise ValueError(f"reserve_staging: size must be >= 0 bytes, not {size}")
        nbytes = page_round(size + size // 100 + (1 << 20))
    else:
        nbytes = sum(page_round(n) for n in pickle_state(size, "reserve").nbytes)
    arena = get_arena()
    arena.grow_in_background(nbytes)
    if wait:
        arena.join_background()
    return nbytes


def reserve_before_saves() -> None:
    """From the next optimizer step on, keep the staging slots as large as
    the checkpoint the optimizers' parameters and state make (faulted in the
    background, see ckptio.early_reserve): no save, not even the first, pays
    first-touch page faults on the training thread. Called by what saves
    whole training states asynchronously (AsyncCheckpointIO, an async
    CheckpointManager) when it is built."""
    reserve_at_optimizer_steps(_grow_arena)


def _grow_arena(nbytes: int) -> None:
    if nbytes > staging_config().budget_bytes:
        return  # larger states stream through chunks, not the arena
    # An estimate may be larger than what is saved (weights-only checkpoints):
    # reserve only as many slots as half of the memory available now holds.
    available = available_memory_bytes()
    slots = get_arena().num_slots if available is None else min(get_arena().num_slots, available // 2 // nbytes)
    if slots > 0:
        get_arena().grow_in_background(nbytes, at_most=slots)


def reset() -> None:
    """Finish queued saves, then forget the queue and arena so the next save
    re-reads CKPTIO_STAGING_SLOTS / CKPTIO_MAX_PENDING (tests use this)."""
    global _arena
    from . import save_queue

    if save_queue._queue is not None:
        save_queue._queue.wait_all(raise_errors=False)
    with _arena_lock:
        if _arena is not None:
            _arena.join_background()
        _arena = None
    save_queue._queue = None
    stop_reserving()
    from . import service

    service.forget()


def _join_background_at_exit() -> None:
    # A daemon thread still faulting memory when the interpreter finalizes
    # would be stopped inside native code (std::terminate): let it finish.
    arena = _arena
    if arena is not None:
        arena.join_background()


atexit.register(_join_background_at_exit)


def _reset_after_fork() -> None:
    global _arena, _arena_lock
    _arena_lock = threading.Lock()
    _arena = None


os.register_at_fork(after_in_child=_reset_after_fork)


def stage(obj: object, path: str, write_staged: Callable[[Staged], SaveResult | None], *,
          stream: Callable[[PickledState, str, SaveHandle, float], None] | None = None, local: bool = True,
          snapshot: str | None = None, native: NativeWrite | None = None) -> SaveHandle:
    """Snapshot `obj` and queue ``write_staged(staged) -> SaveResult``.

    `stream(state, path, handle)` handles states over the staging budget; if
    None, such states are staged anyway (the budget only bounds backends that
    can stream). `snapshot` is "eager" (every storage copied before this
    returns), "lazy" (see ckptio.lazy_snapshot) or None (CKPTIO_SNAPSHOT).

    `native`: `write_staged` writes with write_native. While saves go through
    the checkpoint service, an eager snapshot is handed over to it before
    this returns (a lazy one once its copy is done): from then on the
    trainer's death loses nothing.
    """
    start = time.perf_counter()
    lazy = resolve_snapshot_mode(snapshot) == "lazy"
    if local:
        check_destination(path)
    queue = get_queue()
    queue.reserve()  # raises a pending background error; waits while the queue is full (and for lazy copies)
    with gc_paused():  # until the listed storages are dropped (see gc_paused)
        state = pickle_state(obj, path)
        cfg = staging_config()
        if stream is not None and state.storage_bytes > cfg.budget_bytes:
            handle = SaveHandle(path, "streaming")
            stream(state, path, handle, start)
            return durable_if_signalled(handle)
        arena = get_arena()
        slot = arena.acquire()
        try:
            background = lazily_copyable_storages() if lazy else None
            payloads, copying = arena.snapshot(
                slot, state.storages, lazy=background,
                known=(state.nbytes, state.device_types, state.data_ptrs, state.cdatas))
        except BaseException:
            arena.release(slot)
            raise
        staged = Staged(state, payloads, slot, native)
        if copying is None:
            _hand_over_if_wanted(staged, path)
        state.storages = []  # the caller's tensors are no longer needed (a lazy copy holds its own)
    handle = SaveHandle(path, "staged", copying)
    handle.stall_seconds = time.perf_counter() - start

    def write() -> SaveResult | None:
        if copying is not None:
            copying.wait()
            copying.check()  # a failed copy fails the save: nothing is written
            _hand_over_if_wanted(staged, path)
        return write_staged(staged)

    handle = queue.submit(handle, write, cleanup=lambda: arena.release(slot))
    return durable_if_signalled(handle)  # a save from a signal handler: the process may end next


def _hand_over_if_wanted(staged: Staged, path: str) -> None:
    from . import service

    if staged.native is not None and service.wanted():
        from .service.client import hand_over

        segment = staged.slot.buffer if staged.slot is not None else None
        staged.handover = hand_over(staged.state, staged.payloads, segment, path, ALIGNMENT, after=staged.native.after,
                                    memory=staged.native.memory, remote=staged.native.remote)


def write_native(staged: Staged, path: str) -> SaveResult:
    """Write a staged checkpoint with the engine: whole blocks straight from
    the slot; or wait for the service to, where it was handed over (if the
    service dies first, write it here, from the same memory)."""
    if staged.handover is not None:
        from .service.client import finish_handover

        done = finish_handover(staged.handover)
        if done is not None:
            return done
    remove_stale_temporaries(os.path.dirname(path))
    records = staged.records()
    ticket = get_engine().save(path, records, ALIGNMENT, staged)
    ticket.wait()
    ticket.check()
    result = SaveResult.from_stats(ticket.stats())
    if staged.handover is not None and staged.slot is not None:
        staged.slot.retire()  # a service given up on may wake and write from it: never reuse that memory
    if staged.native is not None and staged.native.memory is not None:  # no service: keep the image from here
        from .service.memory_tier import engine_writer, keep_here

        keep_here(staged.native.memory, path, result.bytes, engine_writer(records, ALIGNMENT, staged))
    return result


def streaming_native_save(state: PickledState, path: str, handle: SaveHandle, start: float) -> None:
    """Stream a state larger than the staging budget; returns once its
    tensors are no longer read, with the rest of the write queued."""
    queue = get_queue()
    queue.wait_all(raise_errors=False)  # FIFO: every earlier save lands first (reserve() raised ours)
    cfg = staging_config()
    remove_stale_temporaries(os.path.dirname(path))
    records, owners = state.cpu_records()
    ticket = get_engine().save(path, records, ALIGNMENT, owners, cfg.chunk_bytes, 2)
    try:
        ticket.wait_sources_released()
    except BaseException:
        ticket.cancel()
        ticket.wait_uninterruptible()
        raise
    handle.stall_seconds = time.perf_counter() - start

    def finish() -> SaveResult:
        ticket.wait()
        ticket.check()
        return SaveResult.from_stats(ticket.stats())

    queue.submit(handle, finish)
