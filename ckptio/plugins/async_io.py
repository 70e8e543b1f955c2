"""AsyncCheckpointIO: any backend's saves, in the background, through the
one shared queue."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, Optional

from .._paths import make_parent_directories, normalize_path
from ..config import resolve_snapshot_mode
from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..save_queue import SaveHandle, get_queue
from .checkpoint_io import _PATH, CheckpointIO, SaveReport, _reject_storage_options, record_save
from .registration import stands_for

if TYPE_CHECKING:
    from ..background import NativeWrite, Staged
    from ..tiers import RemoteTier

__all__ = ["AsyncCheckpointIO"]


class AsyncCheckpointIO(CheckpointIO):
    """Wraps a CheckpointIO (default: FastCheckpointIO) so saves return after a snapshot.

    - ``save_checkpoint`` copies the checkpoint's tensors into the staging
      arena and returns; the write happens in the background. The caller may
      then change or free every tensor. With ``snapshot="lazy"`` it returns
      sooner: parameters and optimizer state are copied while the next
      training step runs forward and backward, and that step's
      ``optimizer.step()`` waits for the copy (see ckptio.async_save).
    - Any base plugin works: ckptio's own backends write straight from the
      snapshot; any other plugin (one derived from Lightning's CheckpointIO,
      from ckptio's, or a ckptio backend whose ``save_checkpoint`` is
      overridden) gets its own ``save_checkpoint`` called in the background
      with a copy of the checkpoint that it owns (tensors on the CPU, as
      Lightning's AsyncCheckpointIO hands them over).
    - Saves, removes and loads stay in order: ``remove_checkpoint(p)`` and
      ``load_checkpoint(p)`` wait for queued saves of ``p``.
    - A background failure is raised once, with its original type, by the
      next save/remove/load or by ``teardown()``.
    - ``teardown()`` waits for every queued save; the plugin stays usable.

    Wrapping an XLA plugin gives an instance Lightning's XLA strategies
    accept (they take only XLACheckpointIO plugins).
    """

    def __new__(cls, checkpoint_io: Optional[CheckpointIO] = None, **kwargs: Any) -> AsyncCheckpointIO:
        if cls is AsyncCheckpointIO and _is_xla_plugin(checkpoint_io):
            cls = _AsyncXLACheckpointIO
        return super().__new__(cls)

    def __init__(self, checkpoint_io: Optional[CheckpointIO] = None, *, reserve: Any = None,
                 snapshot: Optional[str] = None, remote: Optional[str] = None, remote_every: int = 1,
                 service: bool = False, memory: int = 0) -> None:
        """`reserve`: a state like the checkpoints to come (or their tensor
        bytes) to fault the staging memory in for, in the background, now
        (see ckptio.reserve_staging); by default the first optimizer step
        sizes it from the optimizers' parameters and state, also in the
        background (see ckptio.early_reserve): no save pays for first-touch
        page faults on the training thread. Pass the real size (e.g. the
        model's state_dict() for weights-only checkpoints) where that
        estimate would be too large.

        `snapshot`: "eager" or "lazy" (see ckptio.async_save); None reads
        CKPTIO_SNAPSHOT at each save (default "eager").

        `remote`: an fsspec URL prefix (s3://bucket/run), or a file:// directory
        on another disk or a shared mount, for a second tier:
        every `remote_every`-th checkpoint, once durable locally, is copied
        there under its file name from the committed file, in the tier's own
        lane (see ckptio.remote_lane: saves, loads and the training loop never
        wait for the network; ``wait``/``teardown`` do, bounded by
        CKPTIO_REMOTE_COPY_TIMEOUT_S); ``remove_checkpoint`` removes both copies, and
        ``load_checkpoint`` of a path whose local copy is missing or damaged
        loads the remote one. Needs ckptio's engine as the base plugin.

        `service`: write through the per-node checkpoint service (as
        CKPTIO_SERVICE=1 does): a save handed over survives the trainer's
        death (see ckptio.service). `memory`: also keep the `memory` newest
        checkpoints in the service's memory tier; ``load_checkpoint`` of a
        path the tier holds (the same checkpoint, or its file is gone) reads
        it from RAM, CRC-verified (``last_loaded_tier`` says "memory"); a
        resume with ``ckpt_path="last"`` after a killed run is served from
        there. Both need ckptio's engine as the base plugin."""
        super().__init__()
        if not isinstance(remote_every, int) or remote_every < 1:
            raise ValueError(f"remote_every must be an int >= 1, not {remote_every!r}")
        from ..tiers import COPIES_WAITING, RemoteTier

        # Lightning's checkpoints are not a sequence where the newest makes the
        # others moot (save_top_k keeps the best): a few wait for their copy.
        self.remote = RemoteTier(remote, max_waiting=COPIES_WAITING) if remote is not None else None
        self.remote_every = remote_every
        self._saves = 0
        if snapshot is not None:
            resolve_snapshot_mode(snapshot)  # a bad value fails here, not at the first save
        self.snapshot = snapshot
        from ..background import reserve_before_saves, reserve_staging

        if reserve is not None:
            reserve_staging(reserve)  # exact: no estimate needed
        else:
            reserve_before_saves()
        if checkpoint_io is None:
            from .fast_io import FastCheckpointIO

            checkpoint_io = FastCheckpointIO()
        if self.remote is not None and not _saves_natively(_innermost(checkpoint_io)):
            raise ValueError("remote= copies the staged bytes the engine writes: use it with ckptio's "
                             f"FastCheckpointIO as the base plugin, not {type(checkpoint_io).__name__}")
        if not isinstance(memory, int) or isinstance(memory, bool) or memory < 0:
            raise ValueError(f"memory must be an int >= 0 (checkpoints kept in RAM), not {memory!r}")
        from .fast_io import FastCheckpointIO

        if (service or memory) and not isinstance(_innermost(checkpoint_io), FastCheckpointIO):
            raise ValueError("service= and memory= hand the engine's writes to the checkpoint service: use them with "
                             f"ckptio's FastCheckpointIO as the base plugin, not {type(checkpoint_io).__name__}")
        self.memory = memory
        self.last_loaded_tier: Optional[str] = None
        if service or memory:
            from .. import service as checkpoint_service

            checkpoint_service.want()
        # Kept as given, even another AsyncCheckpointIO (Lightning's wrappers
        # nest the same way); saves go to the innermost plugin, once.
        self.checkpoint_io = checkpoint_io
        self.last_handle: SaveHandle | None = None

    @property
    def _base_checkpoint_io_configured(self) -> bool:
        # Lightning's wrapper attribute: ckptio's always has a base (by
        # default its engine), so Lightning never swaps one in.
        return True

    # Returns the save's handle too (an addition to Lightning's interface, whose callers ignore the result).
    def save_checkpoint(  # type: ignore[override]
            self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> SaveHandle:
        base = _innermost(self.checkpoint_io)  # one snapshot and one queued write, not one per layer
        copy_remotely = False
        if self.remote is not None:
            copy_remotely = self._saves % self.remote_every == 0
            self._saves += 1
        native = self._native_write(normalize_path(path))
        if copy_remotely:
            assert self.remote is not None  # copies go to the remote tier
            _reject_storage_options(self, storage_options)
            handle = _save_with_remote_copy(checkpoint, normalize_path(path), self.remote, self.snapshot, native)
        elif native is not None:  # the engine's own save, with a memory-tier image
            from .fast_io import FastCheckpointIO

            assert isinstance(base, FastCheckpointIO)  # memory= needs it (checked in __init__)
            _reject_storage_options(self, storage_options)
            handle = base._async_save(checkpoint, normalize_path(path), storage_options, self.snapshot, native)
        elif _saves_natively(base):
            _reject_storage_options(self, storage_options)  # the error names the plugin the user passed
            handle = base._async_save(checkpoint, normalize_path(path), storage_options, self.snapshot)
        else:
            handle = _save_through_plugin(base, checkpoint, path, storage_options, self.snapshot)
        handle.add_done_callback(_report)
        self.last_handle = handle
        return handle

    # Load and remove pass the caller's arguments on as they came: a user's
    # plugin may not take every keyword Lightning's interface has (e.g. an
    # older load_checkpoint without weights_only).
    def load_checkpoint(self, path: _PATH, *args: Any, **kwargs: Any) -> dict[str, Any]:
        get_queue().wait_path(normalize_path(path))
        self.last_loaded_tier = "local"
        image = self._memory_image(normalize_path(path)) if self.memory else None
        if image is not None:
            try:
                loaded = self.checkpoint_io.load_checkpoint(image, *args, **kwargs)
                self.last_loaded_tier = "memory"
                return loaded
            except (CheckpointNotFoundError, CorruptCheckpointError) as e:
                warnings.warn(f"ckptio: skipping the memory tier's copy of {path}: {e}", stacklevel=2)
        if self.remote is None:
            return self.checkpoint_io.load_checkpoint(path, *args, **kwargs)
        try:
            return self.checkpoint_io.load_checkpoint(path, *args, **kwargs)
        except (CheckpointNotFoundError, CorruptCheckpointError) as e:
            url = self.remote.url_for(os.path.basename(normalize_path(path)))
            warnings.warn(f"ckptio: {path}: {e}; loading the remote copy {url}", stacklevel=2)
            return self.checkpoint_io.load_checkpoint(url, *args, **kwargs)

    def _native_write(self, path: str) -> Optional[NativeWrite]:
        """The memory-tier image to keep of a save to `path` (None without a memory tier)."""
        if not self.memory or "://" in path:
            return None
        from ..background import NativeWrite

        return NativeWrite(memory=self.memory_spec(path))

    def memory_spec(self, path: str) -> dict[str, Any]:
        """Where the memory tier keeps the image of a save to `path`
        (service.memory_tier.store's spec): a folder named for its directory."""
        from ..config import service_config
        from ..service.memory_tier import folder_for

        folder = folder_for(service_config().directory, os.path.dirname(path), "", "")
        return {"folder": folder, "name": os.path.basename(path), "pattern": "", "order": "mtime",
                "keep": self.memory, "source": os.path.dirname(path)}

    def _memory_image(self, path: str) -> Optional[str]:
        """The memory tier's image of `path`, if it holds that very checkpoint (or the file is gone)."""
        from ..service.memory_tier import same_checkpoint

        spec = self.memory_spec(path)
        image = os.path.join(spec["folder"], spec["name"])
        return image if os.path.isfile(image) and same_checkpoint(image, path) else None

    def remove_checkpoint(self, path: _PATH, *args: Any, **kwargs: Any) -> None:
        get_queue().wait_path(normalize_path(path))
        self.checkpoint_io.remove_checkpoint(path, *args, **kwargs)
        if self.remote is not None:  # Lightning's retention (save_top_k) holds for both tiers, in the remote lane
            self.remote.lane.remove(os.path.basename(normalize_path(path)))
        image = self._memory_image(normalize_path(path)) if self.memory else None
        if image is not None:  # ... and for the memory tier
            os.remove(image)

    def wait(self, timeout: Optional[float] = None) -> list[str]:
        """Block until every queued save is durable (raising a pending
        failure), then for remote copies to settle, up to `timeout` s (None:
        CKPTIO_REMOTE_COPY_TIMEOUT_S); returns the remote work still pending."""
        get_queue().wait_all()
        return self._wait_remote(timeout)

    def teardown(self) -> None:
        """Wait for queued saves (showing progress if that takes a while),
        raise a pending failure, let remote copies settle (for up to one
        copy's deadline: what is left is warned about), and tear down the
        wrapped plugin."""
        _drain_with_progress()
        pending = self._wait_remote(None)
        if pending:
            warnings.warn(f"ckptio: remote work still pending at teardown: {'; '.join(pending)}", RuntimeWarning,
                          stacklevel=2)
        get_queue().join_idle_worker()
        from ..background import get_arena

        get_arena().join_background()
        self.checkpoint_io.teardown()

    def _wait_remote(self, timeout: Optional[float]) -> list[str]:
        if self.remote is None:
            return []
        from ..config import remote_copy_config

        return self.remote.wait(float(remote_copy_config().copy_timeout_s) if timeout is None else timeout)

    def __getstate__(self) -> dict[str, Any]:
        # Lightning pickles the Trainer (ddp_spawn, some loggers); a handle
        # holds locks and belongs to this process's queue anyway.
        state = self.__dict__.copy()
        state["last_handle"] = None
        return state


@stands_for("XLACheckpointIO")  # Lightning's XLA strategies take only XLACheckpointIO plugins
class _AsyncXLACheckpointIO(AsyncCheckpointIO):
    """AsyncCheckpointIO over an XLA plugin. ckptio.lightning registers this
    class as a virtual subclass of Lightning's XLACheckpointIO, so the XLA
    strategies (Trainer and Fabric) take it."""


def _innermost(plugin: CheckpointIO) -> CheckpointIO:
    while isinstance(plugin, AsyncCheckpointIO):
        plugin = plugin.checkpoint_io
    return plugin


def _save_with_remote_copy(checkpoint: dict[str, Any], path: str, tier: RemoteTier,
                           snapshot: Optional[str], native: Optional[NativeWrite] = None) -> SaveHandle:
    """Stage `checkpoint`; on the queue, write it to `path` durably; then
    the tier's lane copies the committed file under its name (see
    ckptio.remote_lane: the network never holds up the queue)."""
    from ..tiers import save_with_remote_copy

    make_parent_directories(path)
    return save_with_remote_copy(tier, checkpoint, path, snapshot, native=native)


def _is_xla_plugin(plugin: object) -> bool:
    # ckptio's XLACheckpointIO, Lightning's (either package), or a subclass;
    # by name, so that neither torch_xla nor Lightning has to be imported.
    return any(klass.__name__ == "XLACheckpointIO" for klass in type(plugin).__mro__)


def _saves_natively(plugin: object) -> bool:
    """True when `plugin` is one of ckptio's backends with its own
    save_checkpoint in effect: its async save can then write straight from
    the snapshot. A subclass (or an instance attribute, e.g. a Mock wrapping
    it) that replaces save_checkpoint must have that replacement called."""
    from .fast_io import FastCheckpointIO
    from .torch_io import TorchCheckpointIO
    from .xla_io import XLACheckpointIO

    native = (FastCheckpointIO.save_checkpoint, TorchCheckpointIO.save_checkpoint, XLACheckpointIO.save_checkpoint)
    return getattr(getattr(plugin, "save_checkpoint", None), "__func__", None) in native


def _save_through_plugin(plugin: Any, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any],
                         snapshot: Optional[str]) -> SaveHandle:
    """Snapshot `checkpoint` now; in the background, call the plugin's own
    ``save_checkpoint`` with a copy it owns (it may keep it, or hand it to a
    thread of its own, without ever seeing a later training step). The
    handle's result is None: what reaches storage, and how, is the plugin's."""
    from ..background import stage

    if _is_xla_plugin(plugin):
        from .xla_io import to_host

        checkpoint = to_host(checkpoint, True)  # XLA tensors to host copies first

    def call_plugin(staged: Staged) -> None:
        obj, _ = staged.rebuild(own_memory=True)
        if storage_options is None:  # as Lightning's launchers call it: plugins need not take the keyword
            plugin.save_checkpoint(obj, path)
        else:
            plugin.save_checkpoint(obj, path, storage_options=storage_options)
        return None

    return stage(checkpoint, normalize_path(path), call_plugin, local=False, snapshot=snapshot)


def _report(handle: SaveHandle) -> None:
    if handle._exception is None and handle._result is not None:
        r = handle._result
        copy = getattr(r, "remote", None)
        copy_error = None if copy is None or copy.committed else f"{type(copy.error).__name__}: {copy.error}"
        record_save(SaveReport(handle.path, handle.stall_seconds, r.write_seconds, r.bytes,
                               None if copy is None else copy.seconds, copy_error))


def _drain_with_progress(interval: float = 2.0) -> None:
    import sys
    import time

    queue = get_queue()
    start = time.monotonic()
    while not queue.wait_all_for(interval):
        print(f"ckptio: waiting for {queue.pending()} checkpoint save(s) to become durable "
              f"({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
    queue.raise_pending_error()
