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
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Optional

from . import api
from ._paths import committed_file, make_directories, normalize_path
from .errors import CheckpointNotFoundError, CkptioError, CorruptCheckpointError
from .load_into import load_into

__all__ = ["CheckpointManager"]

_POINTER = "latest"


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

    def __init__(self, directory: str | os.PathLike, keep_last: Optional[int] = 3, *,
                 async_save: bool = True, prefix: str = "step_", suffix: str = ".pt"):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None (keep all), not {keep_last}")
        if not re.fullmatch(r"[\w.-]*", prefix) or not re.fullmatch(r"[\w.-]*", suffix):
            raise ValueError("prefix and suffix may contain only letters, digits, '_', '.' and '-'")
        self.directory = normalize_path(directory)
        self.keep_last = keep_last
        self.async_save = async_save
        self._prefix, self._suffix = prefix, suffix
        self._pattern = re.compile(rf"^{re.escape(prefix)}(\d+){re.escape(suffix)}$")
        make_directories(self.directory)
        self._closed = False

    # --- paths ---------------------------------------------------------------

    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, f"{self._prefix}{int(step)}{self._suffix}")

    def steps(self) -> list:
        """Steps with a checkpoint file present, ascending (complete or not: use verify)."""
        found = []
        for name in os.listdir(self.directory):
            m = self._pattern.match(name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    # --- saving --------------------------------------------------------------

    def save(self, step: int, state: Any, *, snapshot: str | None = None):
        """Checkpoint `state` as `step`. Async by default: returns a SaveHandle
        once the state is snapshotted (`snapshot`: see ckptio.async_save); the
        pointer moves and old checkpoints go only after this one is durable."""
        if self._closed:
            raise CkptioError("CheckpointManager is closed")
        path = self.path_for(step)
        if not self.async_save:
            result = api.save(state, path)
            self._after_durable(step)
            return result

        from .background import stage, write_native

        def write(staged):
            result = write_native(staged, path)
            self._after_durable(step)
            return result

        return stage(state, path, write, snapshot=snapshot)

    def _after_durable(self, step: int) -> None:
        _write_pointer(self.directory, os.path.basename(self.path_for(step)))
        if self.keep_last is not None:
            for old in self.steps()[: -self.keep_last]:
                if old != step:
                    try:
                        os.remove(self.path_for(old))
                    except FileNotFoundError:
                        pass

    # --- resuming ------------------------------------------------------------

    def _candidates(self) -> list:
        """Checkpoint paths, newest first. Every ``step_<N>`` file is complete
        (writers rename into place only after fsync); ``latest`` names the
        newest one whose pointer update also finished."""
        self.wait()
        paths = [self.path_for(s) for s in reversed(self.steps())]
        pointed = _read_pointer(self.directory)
        if pointed is not None:
            target = os.path.join(self.directory, pointed)
            if target in paths:
                paths.remove(target)
                newer = [p for p in paths if self._step_of(p) > self._step_of(target)]
                paths = newer + [target] + [p for p in paths if p not in newer]
        return paths

    def latest(self) -> Optional[str]:
        """Path of the newest checkpoint, or None."""
        paths = self._candidates()
        return paths[0] if paths else None

    def latest_step(self) -> Optional[int]:
        path = self.latest()
        return None if path is None else self._step_of(path)

    def load_latest(self, map_location=None, *, weights_only: bool = True, into=None, strict: bool = True):
        """Load the newest checkpoint that is intact (CRC-verified), falling
        back to older ones if it was damaged; raises CheckpointNotFoundError
        if there is none.

        With `into` (e.g. ``{"model": model.state_dict(), "optimizer":
        opt.state_dict()}``) the tensors are read straight into those
        tensors, as ``ckptio.load_into(into, path, strict=strict)`` does. A
        damaged newest checkpoint may have been partly read into `into`
        before its damage showed; the older checkpoint then loaded rewrites
        every tensor it pairs with."""
        damaged = []
        for path in self._candidates():
            try:
                if into is not None:
                    return load_into(into, path, strict=strict, map_location=map_location,
                                     weights_only=weights_only)
                return api.load(path, map_location=map_location, weights_only=weights_only)
            except CorruptCheckpointError as e:
                damaged.append(e)
                warnings.warn(f"ckptio: skipping damaged checkpoint {path}: {e}", stacklevel=2)
        raise CheckpointNotFoundError(
            2, f"no intact checkpoint in this directory ({len(damaged)} damaged)", self.directory
        )

    def _step_of(self, path: str) -> Optional[int]:
        m = self._pattern.match(os.path.basename(path))
        return int(m.group(1)) if m else None

    # --- lifetime ------------------------------------------------------------

    def wait(self) -> None:
        """Block until every save is durable; raise a failure nobody has seen."""
        api.wait()

    def close(self) -> None:
        self.wait()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
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
