"""A remote tier: an fsspec URL prefix (or a file:// directory) that holds
copies of local checkpoints, and the lane its copies run in.

No torch here: the checkpoint service (ckptio.service) makes a trainer's
remote copies with this same class, so that a trainer's death does not cut
them short (see ckptio.tiers for how a save's copy is routed).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Callable, Optional

from . import remote as _remote
from .remote_lane import RemoteLane

__all__ = ["RemoteTier", "POINTER", "PROCESS_LOCAL_PROTOCOLS"]

POINTER = "latest"
PROCESS_LOCAL_PROTOCOLS = ("memory://",)  # another process (the service) would write into its own copy of it


class RemoteTier:
    def __init__(self, prefix: str, on_commit: Optional[Callable[[str], object]] = None, max_waiting: int = 1,
                 keep_newest: Optional[tuple[re.Pattern[str], int]] = None) -> None:
        """`on_commit(name)`: run in the lane after each committed copy (and
        pruning). `max_waiting`: copies queued behind the running one; past
        that the oldest is dropped (1: only the newest checkpoint's copy
        waits). `keep_newest` (pattern, n): after each commit, remove all but
        the n newest copies whose names match `pattern` (its group 1 is the
        step), never one a late pointer write may still name."""
        prefix = str(prefix).rstrip("/")
        if not (_remote.is_url(prefix) or _remote.is_directory_url(prefix)):
            raise ValueError(f"remote must be an fsspec URL prefix such as 's3://bucket/run' (or a file:// "
                             f"directory: another disk, a shared mount), not {prefix!r}")
        self.prefix = prefix
        from .config import remote_copy_config

        remote_copy_config()  # a bad CKPTIO_REMOTE_* value fails here, not later in the lane where nobody sees it
        self._on_commit = on_commit
        self.max_waiting = max_waiting
        self.keep_newest = keep_newest
        self._lane: Optional[RemoteLane] = None
        self._lane_lock = threading.Lock()
        self._init_elsewhere()

    def _init_elsewhere(self) -> None:
        self._elsewhere: dict[str, float] = {}  # name -> since when the checkpoint service has been copying it
        self._elsewhere_cond = threading.Condition()

    @property
    def lane(self) -> RemoteLane:
        """The lane this tier's copies and removals run in (made at first use)."""
        with self._lane_lock:
            if self._lane is None:
                self._lane = RemoteLane(self, self._committed, self.max_waiting)
            return self._lane

    def _committed(self, name: str, keep: frozenset[str]) -> None:
        if self.keep_newest is not None:
            pattern, newest = self.keep_newest
            steps = sorted((int(m.group(1)), n) for n in self.names(pattern) if (m := pattern.match(n)))
            for _, old in steps[:-newest]:
                if old not in keep:
                    self.remove(old)
        if self._on_commit is not None:
            self._on_commit(name)

    def committed_elsewhere(self, name: str) -> None:
        """The checkpoint service committed `name` (and pruned the tier):
        what on_commit records, here."""
        if self._on_commit is not None:
            self._on_commit(name)

    def service_spec(self) -> Optional[dict[str, Any]]:
        """What the checkpoint service needs to make this tier's copies
        itself (None: a tier only this process can reach)."""
        if self.prefix.startswith(PROCESS_LOCAL_PROTOCOLS):
            return None
        spec: dict[str, Any] = {"prefix": self.prefix, "waiting": self.max_waiting}
        if not _remote.is_directory_url(self.prefix):
            options = _remote.options_to_hand_over(self.prefix)  # its endpoint and credentials are ours
            if options is None:
                return None
            spec["options"] = options
        if self.keep_newest is not None:
            spec["pattern"], spec["keep"] = self.keep_newest[0].pattern, self.keep_newest[1]
        return spec

    @classmethod
    def from_service_spec(cls, spec: dict[str, Any]) -> RemoteTier:
        keep = (re.compile(spec["pattern"]), int(spec["keep"])) if "pattern" in spec else None
        if isinstance(spec.get("options"), dict):
            _remote.use_handed_options(str(spec["prefix"]), spec["options"])
        return cls(str(spec["prefix"]), max_waiting=int(spec["waiting"]), keep_newest=keep)

    def __getstate__(self) -> dict[str, Any]:
        # Lightning pickles its plugins (ddp_spawn, some loggers): the lane, its
        # threads and locks belong to this process.
        state = self.__dict__.copy()
        for unpicklable in ("_lane", "_lane_lock", "_elsewhere", "_elsewhere_cond"):
            state[unpicklable] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lane_lock=threading.Lock())
        self._init_elsewhere()

    def copying_elsewhere(self, name: str) -> Callable[[], None]:
        """Note that the checkpoint service is copying `name` (pending() and
        wait() count it); returns what to call once that copy has settled."""
        with self._elsewhere_cond:
            self._elsewhere[name] = time.monotonic()

        def settled() -> None:
            with self._elsewhere_cond:
                self._elsewhere.pop(name, None)
                self._elsewhere_cond.notify_all()
        return settled

    def pending(self) -> list[str]:
        """Remote work not done yet, in words ([] when none)."""
        return ([] if self._lane is None else self._lane.pending()) + self._pending_elsewhere()

    def _pending_elsewhere(self) -> list[str]:
        now = time.monotonic()
        with self._elsewhere_cond:
            return [f"copy of {name} to {self.prefix} (by the checkpoint service, {now - since:.0f} s)"
                    for name, since in self._elsewhere.items()]

    def wait(self, timeout: Optional[float]) -> list[str]:
        """Wait up to `timeout` s for the lane (and the service's copies) to
        settle; returns what is still pending."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._lane is not None:
            self._lane.wait(timeout)
        with self._elsewhere_cond:
            self._elsewhere_cond.wait_for(lambda: not self._elsewhere,
                                          None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.pending()

    def url_for(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def write_pointer(self, name: str) -> None:
        _remote.write_small_file(self.url_for(POINTER), (name + "\n").encode())  # the pointer is old or new

    def names(self, pattern: re.Pattern[str]) -> list[str]:
        """Names under the prefix matching `pattern` (none if the prefix does not exist yet)."""
        fs, path = _remote.fs_for(self.prefix)
        try:
            listed = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in listed]
        return [n for n in names if pattern.match(n)]

    def pointer(self) -> Optional[str]:
        fs, path = _remote.fs_for(self.url_for(POINTER))
        try:
            name = fs.cat_file(path).decode(errors="replace").strip()
        except FileNotFoundError:
            return None
        return name if name and "/" not in name else None

    def remove(self, name: str) -> None:
        fs, path = _remote.fs_for(self.url_for(name))
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
