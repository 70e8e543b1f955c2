"""CheckpointManager: rotating checkpoints for custom training loops.

A directory holds ``step_<N>.pt`` files and a ``latest`` pointer. The
invariants that make a crash at any moment safe:

- each checkpoint is committed durably (temp file, fsync, rename, fsync dir);
- ``latest`` names a checkpoint only after that checkpoint is durable, and is
  itself replaced atomically (temp, fsync, rename, fsync dir);
- old checkpoints are deleted only after a newer one is durable and
  ``latest`` points at it.

``load_latest`` loads the newest checkpoint (CRC-verified) and falls back to
older ones if it finds damage.

With ``remote=`` (an fsspec URL prefix) the manager keeps a second tier:
every ``remote_every``-th checkpoint, once durable locally, is copied there
from the committed file in the tier's own lane (see ckptio.tiers and
ckptio.remote_lane: a hung object store never delays a local save, a load,
or ``save()``; when it falls behind, a few copies wait and then only the
newest are kept), the remote ``latest`` moves after the copy is whole, and
the remote tier keeps its own ``keep_remote`` newest, pruned in that lane.

With ``memory=K`` the checkpoint service (ckptio.service) writes the saves
and keeps the newest K of them, once durable, as whole images in RAM that
outlive the trainer: a restarted process resumes from there.

``load_latest`` takes the newest checkpoint that is whole in any tier
(memory first, then local, then remote at an equal step).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Union

from . import api
from ._paths import committed_file, make_directories, normalize_path
from .errors import CheckpointIOError, CheckpointNotFoundError, CkptioError, CorruptCheckpointError
from .load_into import load_into
from .tiers import COPIES_WAITING, RemoteCopy, RemoteTier, save_with_remote_copy

if TYPE_CHECKING:
    from .background import NativeWrite, Staged
    from .results import SaveResult
    from .save_queue import SaveHandle

__all__ = ["CheckpointManager", "LoadedCheckpoint"]


class LoadedCheckpoint(NamedTuple):
    """Which checkpoint load_latest returned: its step, "memory", "local", "remote" or "partner", and path or URL."""
    step: int
    tier: str
    path: str

_POINTER = "latest"
_TIER_ORDER = {"memory": 0, "local": 1, "remote": 2}  # at an equal step, the fastest to read first


class CheckpointManager:
    """Save every few steps, keep the last `keep_last`, resume from the newest.

    ::

        manager = ckptio.CheckpointManager("ckpt", keep_last=3)
        start = manager.latest_step() or 0
        if start: state = manager.load_latest(map_location="cpu")
        for step in range(start, steps):
            ...
            if step % 100 == 0:
                manager.save(step, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step})
        manager.close()
    """

    def __init__(self, directory: Union[str, os.PathLike[str]], keep_last: Optional[int] = 3, *,
                 async_save: bool = True, prefix: str = "step_", suffix: str = ".pt",
                 remote: Optional[str] = None, keep_remote: Optional[int] = None, remote_every: int = 1,
                 memory: int = 0, replicas: int = 0, partner: Optional[Callable[[int, int], int]] = None) -> None:
        """`remote`: an fsspec URL prefix (s3://bucket/run), or a file://
        directory on another disk or a shared mount, for the second tier;
        every `remote_every`-th save is copied there and the newest
        `keep_remote` copies are kept (None: all).

        `memory`: keep the newest `memory` checkpoints in the checkpoint
        service's memory tier too (implies the service for async saves; see
        ckptio.service), within CKPTIO_MEMORY_BYTES for the whole node.

        `replicas`: 1 keeps each rank's newest checkpoint in a partner rank's
        memory too, on another node, over torch.distributed (made on every
        rank at once; `partner(rank, world_size)`: see ckptio.replication).
        ``load_latest`` then resumes every rank collectively."""
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None (keep all), not {keep_last}")
        if keep_remote is not None and keep_remote < 1:
            raise ValueError(f"keep_remote must be >= 1 or None (keep all), not {keep_remote}")
        if not isinstance(remote_every, int) or remote_every < 1:
            raise ValueError(f"remote_every must be an int >= 1, not {remote_every!r}")
        if not isinstance(memory, int) or isinstance(memory, bool) or memory < 0:
            raise ValueError(f"memory must be an int >= 0 (checkpoints kept in RAM), not {memory!r}")
        if replicas not in (0, 1) or isinstance(replicas, bool):
            raise ValueError(f"replicas must be 0 or 1 (a partner rank's copy), not {replicas!r}")
        if not re.fullmatch(r"[\w.-]*", prefix) or not re.fullmatch(r"[\w.-]*", suffix):
            raise ValueError("prefix and suffix may contain only letters, digits, '_', '.' and '-'")
        self.directory = normalize_path(directory)
        if remote is not None and os.path.abspath(normalize_path(str(remote)).rstrip("/")) == \
                os.path.abspath(self.directory):
            raise ValueError(f"remote {remote!r} is the manager's own directory: a second tier must be another one")
        self.keep_last = keep_last
        self.async_save = async_save
        if async_save:  # staging memory faulted in at the first optimizer step, not at the first save
            from .background import reserve_before_saves

            reserve_before_saves()
        self._prefix, self._suffix = prefix, suffix
        self._pattern = re.compile(rf"^{re.escape(prefix)}(\d+){re.escape(suffix)}$")
        make_directories(self.directory)
        # When the remote falls behind, copies that keep_remote would keep may
        # wait (a few: each holds its file open); past that the oldest waiting
        # one is dropped, so the tier catches up to the newest checkpoint.
        waiting = COPIES_WAITING if keep_remote is None else min(keep_remote, COPIES_WAITING)
        self.remote = (RemoteTier(remote, on_commit=self._remote_committed, max_waiting=waiting,
                                  keep_newest=None if keep_remote is None else (self._pattern, keep_remote))
                       if remote is not None else None)
        self.keep_remote = keep_remote
        self.remote_every = remote_every
        self.memory = memory
        from .config import service_config
        from .service.memory_tier import folder_for

        self._memory_folder = folder_for(service_config().directory, self.directory, prefix, suffix)
        if memory and async_save:
            from . import service

            service.want()
        self._replication = None
        if replicas:
            from .replication import Replication

            self._replication = Replication(self.directory, prefix, suffix, partner)
        self._saves = 0
        self.last_durable_step: Optional[int] = None  # newest step durable locally (set on the queue)
        self.last_remote_step: Optional[int] = None   # newest step committed remotely
        self.last_loaded: Optional[LoadedCheckpoint] = None
        self._closed = False

    # --- paths ---------------------------------------------------------------

    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, f"{self._prefix}{int(step)}{self._suffix}")

    def steps(self) -> list[int]:
        """Steps with a checkpoint file present, ascending (complete or not: use verify)."""
        found = []
        for name in os.listdir(self.directory):
            m = self._pattern.match(name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    # --- saving --------------------------------------------------------------

    def save(self, step: int, state: Any, *, snapshot: Optional[str] = None) -> Union[SaveResult, SaveHandle]:
        """Checkpoint `state` as `step`. Async by default: returns a SaveHandle
        once the state is snapshotted (`snapshot`: see ckptio.async_save); the
        pointer moves and old checkpoints go only after this one is durable.
        With a remote tier, the result's ``remote`` (a tiers.RemoteCopy, or
        None when this step is not copied) tells how the copy went; the
        handle completes once the copy has settled (``handle.local``, once
        the file is durable). The copy runs in the tier's own lane: this
        call, the local write and loads of the file never wait for it.
        Synchronous (async_save=False), the call returns once the file is
        durable; its ``remote`` is then ``pending`` (``wait()`` settles it,
        ``last_remote_step`` says what the remote tier holds)."""
        if self._closed:
            raise CkptioError("CheckpointManager is closed")
        path = self.path_for(step)
        copy_remotely = self.remote is not None and self._saves % self.remote_every == 0
        self._saves += 1
        if not self.async_save:
            result = api.save(state, path)
            self._after_durable(step)
            memory = self._native_write(step).memory
            if memory is not None:
                from .service.memory_tier import file_copier, keep_here

                keep_here(memory, path, result.bytes, file_copier(path))
            if copy_remotely:
                result = dataclasses.replace(result, remote=self._copy_in_the_lane(path))
            return result
        native = self._native_write(step)
        if copy_remotely:
            assert self.remote is not None  # copy_remotely says there is a tier
            return save_with_remote_copy(self.remote, state, path, snapshot, lambda: self._after_durable(step), native)

        from .background import stage, write_native

        def write(staged: Staged) -> SaveResult:
            result = write_native(staged, path)
            self._after_durable(step)  # again, where the service did it: the same pointer, nothing left to prune
            return result

        return stage(state, path, write, snapshot=snapshot, native=native)

    def _native_write(self, step: int) -> NativeWrite:
        """What the checkpoint service does after writing `step`, should this
        process be gone by then: the pointer, pruning, the memory tier."""
        from .background import NativeWrite

        name = os.path.basename(self.path_for(step))
        after: dict[str, Any] = {"pointer": {"directory": self.directory, "name": name, "step": step,
                                             "pattern": self._pattern.pattern}}
        if self.keep_last is not None:
            after["prune"] = {"directory": self.directory, "pattern": self._pattern.pattern, "step": step,
                              "keep_last": self.keep_last, "prefix": self._prefix, "suffix": self._suffix}
        return NativeWrite(after, self._memory_spec(name, self.memory) if self.memory else None)

    def _memory_spec(self, name: str, keep: int) -> dict[str, Any]:
        """What the memory tier needs to keep `name` among this directory's `keep` newest images."""
        return {"folder": self._memory_folder, "name": name, "pattern": self._pattern.pattern, "keep": keep,
                "source": os.path.join(self.directory, self._prefix + "<N>" + self._suffix)}

    def memory_inventory(self) -> dict[int, str]:
        """{step: "whole" or "damaged"} of the memory tier's images of this directory."""
        from .service.memory_tier import images

        return {step: _state_of(path) or "damaged" for step, path in images(self._memory_folder, self._pattern).items()}

    def memory_steps(self) -> list[int]:
        """Steps the memory tier holds for this directory, ascending."""
        from .service.memory_tier import images

        return sorted(images(self._memory_folder, self._pattern))

    def _after_durable(self, step: int) -> None:
        _write_pointer(self.directory, os.path.basename(self.path_for(step)))
        self.last_durable_step = step
        if self.keep_last is not None:
            for old in self.steps()[: -self.keep_last]:
                if old != step:
                    try:
                        os.remove(self.path_for(old))
                    except FileNotFoundError:
                        pass
        if self._replication is not None:  # on the save queue (or the caller's thread, saving synchronously)
            self._replication.replicate(step, self.path_for(step), self._pattern)

    def _copy_in_the_lane(self, path: str) -> RemoteCopy:
        """A synchronous save's remote copy: queued in the lane like any
        other (it warns if it fails); the save does not wait for it."""
        assert self.remote is not None  # called for a manager with a remote tier
        name = os.path.basename(path)
        self.remote.lane.submit(name, path, lambda copy: None)
        return RemoteCopy(self.remote.url_for(name), 0.0, pending=True)

    def _remote_committed(self, name: str) -> None:
        """After a copy is whole, `latest` names it and the tier is pruned
        to keep_remote (in the lane, or in the checkpoint service): record it."""
        step = self._step_of(name)
        if step is not None and (self.last_remote_step is None or step > self.last_remote_step):
            self.last_remote_step = step

    def remote_steps(self) -> list[int]:
        """Steps with a copy in the remote tier, ascending ([] without one)."""
        if self.remote is None:
            return []
        matches = (self._pattern.match(n) for n in self.remote.names(self._pattern))  # names() matched them
        return sorted(int(m.group(1)) for m in matches if m is not None)

    def _remote_steps_in_time(self) -> list[int]:
        """remote_steps(), or TimeoutError once a few requests' timeouts have
        passed: a hung object store must not hold up a resume from local disk."""
        assert self.remote is not None  # asked only with a remote tier
        from .config import remote_copy_config
        from .remote import S3_ATTEMPTS
        from .remote_lane import call_with_deadline

        seconds = remote_copy_config().request_timeout_s * S3_ATTEMPTS
        return call_with_deadline(seconds, f"listing {self.remote.prefix}", self.remote_steps)

    def _remote_url(self, step: int) -> str:
        assert self.remote is not None  # asked about a step found in the remote tier
        return self.remote.url_for(os.path.basename(self.path_for(step)))

    # --- resuming ------------------------------------------------------------

    def _candidates(self) -> list[str]:
        """Checkpoint paths, newest first. Every ``step_<N>`` file is complete
        (writers rename into place only after fsync); ``latest`` names the
        newest one whose pointer update also finished."""
        api.wait()  # local saves only: the remote tier is listed as it stands
        paths = [self.path_for(s) for s in reversed(self.steps())]
        pointed = _read_pointer(self.directory)
        if pointed is not None:
            target = os.path.join(self.directory, pointed)
            if target in paths:
                paths.remove(target)
                newer = [p for p in paths if self._step_in(p) > self._step_in(target)]
                paths = newer + [target] + [p for p in paths if p not in newer]
        return paths

    def _tiered_candidates(self, remote: bool = True) -> list[tuple[int, str, str]]:
        """(step, tier, path or URL), newest first, memory before local before
        remote at an equal step; an unreachable remote tier is warned about
        and skipped (`remote=False`: not listed)."""
        found = [(self._step_in(p), "local", p) for p in self._candidates()]
        from .service.memory_tier import images

        if self.memory:  # a manager made without a memory tier reads disk only
            found += [(s, "memory", p) for s, p in images(self._memory_folder, self._pattern).items()]
        if self.remote is not None and remote:
            try:
                found += [(s, "remote", self._remote_url(s)) for s in self._remote_steps_in_time()]
            except Exception as e:  # noqa: BLE001 - the local tier still serves
                warnings.warn(f"ckptio: cannot list the remote tier {self.remote.prefix} ({type(e).__name__}: {e}); "
                              "resuming from local checkpoints only", RuntimeWarning, stacklevel=3)
        return sorted(found, key=lambda c: (-c[0], _TIER_ORDER[c[1]]))

    def latest(self) -> Optional[str]:
        """Path (or, with a remote tier, URL) of the newest checkpoint, or None."""
        candidates = self._tiered_candidates()
        return candidates[0][2] if candidates else None

    def latest_step(self) -> Optional[int]:
        candidates = self._tiered_candidates()
        return candidates[0][0] if candidates else None

    def load_latest(self, map_location: Any = None, *, weights_only: bool = True, into: Any = None,
                    strict: bool = True) -> Any:
        """Load the newest checkpoint that is intact (CRC-verified), in either
        tier, falling back to older ones if it was damaged; raises
        CheckpointNotFoundError if there is none. ``last_loaded`` then says
        which step, tier and path served it.

        With `into` (e.g. ``{"model": model.state_dict(), "optimizer":
        opt.state_dict()}``) the tensors are read straight into those
        tensors, as ``ckptio.load_into(into, path, strict=strict)`` does. A
        damaged newest checkpoint may have been partly read into `into`
        before its damage showed; the older checkpoint then loaded rewrites
        every tensor it pairs with."""
        candidates = self._tiered_candidates() if self._replication is None else self._agree_with_the_other_ranks()
        damaged: list[CheckpointIOError | CorruptCheckpointError] = []
        for step, tier, path in candidates:
            try:
                if into is not None:
                    def load_into_target(p: str) -> Any:
                        return load_into(into, p, strict=strict, map_location=map_location, weights_only=weights_only)

                    state = load_into_target(path) if tier != "remote" else api.with_local_copy(path, load_into_target)
                else:
                    state = api.load(path, map_location=map_location, weights_only=weights_only)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                damaged.append(e)
                warnings.warn(f"ckptio: skipping damaged or missing {tier} checkpoint {path}: {e}", stacklevel=2)
                continue
            except CheckpointIOError as e:
                if tier == "local":
                    raise
                if tier == "memory":  # the service pruned it meanwhile, or its RAM is gone: the disk serves
                    continue
                damaged.append(e)
                warnings.warn(f"ckptio: cannot read remote checkpoint {path}: {e}", stacklevel=2)
                continue
            self.last_loaded = LoadedCheckpoint(step, tier, path)
            return state
        where = self.directory + (f" or {self.remote.prefix}" if self.remote is not None else "")
        raise CheckpointNotFoundError(2, f"no intact checkpoint in {where} ({len(damaged)} damaged or unreadable)",
                                      self.directory)

    def _agree_with_the_other_ranks(self) -> list[tuple[int, str, str]]:
        """Collectively: the newest step every rank can recover, this rank's
        candidates for it (its partner's replica, received now, where it has
        none of its own). The remote tier is listed only when it might hold
        a newer step than the other tiers give every rank (listing an object
        store takes seconds), and for a fallback if the step fails to load."""
        assert self._replication is not None  # called with replicas only
        self._replication.link.drain()  # the replication of earlier saves uses the same group
        candidates = self._tiered_candidates(remote=False)
        near = {s for s, _, _ in candidates}
        self._replication.check_held(self._pattern)
        step, needs = self._replication.agree(near, None)
        listed_remote = step is None
        if listed_remote:
            candidates = self._tiered_candidates()
            step, needs = self._replication.agree(near, {s for s, tier, _ in candidates if tier == "remote"})
        assert step is not None  # agreed, or raised, with the remote tiers listed
        received = self._replication.transfer(step, needs, self._keep_restored)
        if received is not None:
            return [(step, "partner", received)]
        chosen = [c for c in candidates if c[0] == step]
        if not listed_remote and self.remote is not None:  # tried (unlisted) only if the nearer ones fail
            chosen.append((step, "remote", self._remote_url(step)))
        return chosen

    def _keep_restored(self, step: int, data: memoryview) -> str:
        """This rank's checkpoint, back from its partner: kept in its own
        memory-tier folder (it is an image of this directory again)."""
        from .config import service_config
        from .service.memory_tier import bytes_writer, store

        name = os.path.basename(self.path_for(step))
        config = service_config()
        kept = store(config.directory, config.memory_bytes, self._memory_spec(name, max(self.memory, 1)), len(data),
                     bytes_writer(data, site="replica"))
        if "error" in kept:
            raise CheckpointIOError(28, f"cannot keep {name}, received from the partner rank: {kept['error']}",
                                    self._memory_folder)
        return str(kept["path"])  # load_latest reads it CRC-verified, as any checkpoint

    def _step_of(self, path: str) -> Optional[int]:
        m = self._pattern.match(os.path.basename(path))
        return int(m.group(1)) if m else None

    def _step_in(self, path: str) -> int:
        """The step of a checkpoint path this manager listed (it matches the pattern)."""
        step = self._step_of(path)
        assert step is not None, path
        return step

    def inventory(self) -> list[tuple[int, Optional[str], Optional[str]]]:
        """Every step in either tier, newest first, as (step, local, remote):
        each "whole" (every CRC checked), "damaged" or None (no copy); a
        remote tier that cannot be listed shows as "unreachable"."""
        api.wait()
        local = {s: self.path_for(s) for s in self.steps()}
        try:
            remote_urls = {s: self._remote_url(s) for s in self.remote_steps()}
            unreachable = False
        except Exception:  # noqa: BLE001 - reported in the listing
            remote_urls, unreachable = {}, self.remote is not None
        rows = []
        for step in sorted(set(local) | set(remote_urls), reverse=True):
            rows.append((step, _state_of(local.get(step)),
                         "unreachable" if unreachable else _state_of(remote_urls.get(step))))
        return rows

    # --- lifetime ------------------------------------------------------------

    def wait(self, timeout: Optional[float] = None) -> list[str]:
        """Block until every local save is durable (raising a failure nobody
        has seen) and replicated (replicas=1: each exchange bounded by
        CKPTIO_REPLICA_TIMEOUT_S), then for the remote tier's copies to settle, up to
        `timeout` seconds (None: CKPTIO_REMOTE_COPY_TIMEOUT_S, one copy's
        deadline). Returns the remote work still pending, in words ([] when
        none): a hung object store never holds this for longer."""
        api.wait()
        if self._replication is not None:  # replication after the saves, on its link's thread
            self._replication.link.drain()
        if self.remote is None:
            return []
        return self.remote.wait(self._remote_timeout(timeout))

    def close(self, timeout: Optional[float] = None) -> list[str]:
        """wait(timeout), then refuse further saves. Remote work still
        pending then is warned about and returned; it goes on in the
        background (and at interpreter exit, for up to one copy's deadline)."""
        pending = self.wait(timeout)
        self._closed = True
        if pending:
            assert self.remote is not None  # only a remote tier has pending work
            warnings.warn(f"ckptio: closing with remote work still pending after "
                          f"{self._remote_timeout(timeout):g} s: {'; '.join(pending)}", RuntimeWarning, stacklevel=2)
        return pending

    @staticmethod
    def _remote_timeout(timeout: Optional[float]) -> float:
        from .config import remote_copy_config

        return float(remote_copy_config().copy_timeout_s) if timeout is None else timeout

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_pointer(directory: str, target: str) -> None:
    """Atomically replace `directory`/latest with `target`, durably."""
    with committed_file(os.path.join(directory, _POINTER), "w", site="pointer") as f:
        f.write(target + "\n")


def _read_pointer(directory: str) -> Optional[str]:
    try:
        with open(os.path.join(directory, _POINTER)) as f:
            name = f.read().strip()
    except OSError:
        return None
    return name if name and "/" not in name and name not in (".", "..") else None


def _state_of(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    try:
        api.verify(path)
        return "whole"
    except (CorruptCheckpointError, CheckpointNotFoundError):
        return "damaged"
