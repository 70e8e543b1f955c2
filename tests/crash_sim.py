"""A power-loss simulator: which states can a power cut during a save leave?

SIGKILL tests cannot see a missing fsync (the page cache survives a killed
process, not a power cut). This harness records every file-system effect a
save has, then rebuilds every state a power cut could leave, under a
conservative model (as LevelDB's FaultInjectionTestEnv, RocksDB's
FaultInjectionTestFS, SQLite's crash VFS and ALICE do):

- data written to a file since its last fsync may be lost or partly
  persisted: any subset of its changed 4 KiB blocks, with the old size or the
  new one (blocks past the old end that did not persist read as zeros);
- a name created, renamed or unlinked in a directory since that directory's
  last fsync may or may not persist: each such name independently keeps its
  durable binding or any binding it had since;
- os.sync() makes everything durable.

Recording: the engine logs its own effects (csrc/engine/crash_recorder.h);
Python's os.fsync, rename, replace, unlink, remove, mkdir, rmdir and sync are
wrapped while recording, so torch.save's commit, the manager's pointer and
DCP's .metadata (torch's own code) are logged the same way. Every event
carries a snapshot of the watched tree, taken just after the effect.

A crash "window" k lies between event k and event k+1. A scenario marks
``done:<version>`` when a save has returned (or its future resolved); from
then on that version, or a newer one, must be what the checker finds.
"""

from __future__ import annotations

import builtins
import hashlib
import itertools
import os
import random
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

from ckptio import _C

BLOCK = 4096
ABSENT = "absent"           # what a checker reports when there is no checkpoint to load
MAX_NAMESPACES = 64         # per window: all combinations up to this, else a seeded sample
MAX_DATA_VARIANTS = 32      # per unsynced visible file: block subsets tried (each with either size)


@dataclass
class Event:
    kind: str
    path: str
    path2: str
    inode: int
    names: dict      # relative path -> (inode, is_dir)
    contents: dict   # inode -> bytes


# --- recording ------------------------------------------------------------------

_real = {name: getattr(os, name) for name in
         ("fsync", "fdatasync", "rename", "replace", "unlink", "remove", "mkdir", "rmdir", "sync")}


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _resolve(path, dir_fd) -> str:
    path = os.fsdecode(os.fspath(path))
    if dir_fd is not None and not os.path.isabs(path):
        return os.path.join(_fd_path(dir_fd), path)
    return os.path.abspath(path)


def _wrap_sync(real):
    def synced(fd):
        real(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            _C._crash_record("fsync_dir", _fd_path(fd))
        else:
            _C._crash_record("fsync", _fd_path(fd), "", fd)
    return synced


def _wrap_rename(real):
    def renamed(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        real(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        _C._crash_record("rename", _resolve(src, src_dir_fd), _resolve(dst, dst_dir_fd))
    return renamed


def _wrap_path_op(real, kind):
    def operated(path, *args, dir_fd=None, **kwargs):
        real(path, *args, dir_fd=dir_fd, **kwargs)
        _C._crash_record(kind, _resolve(path, dir_fd))
    return operated


def _synced_all():
    _real["sync"]()
    _C._crash_record("sync", "")


@dataclass
class Recording:
    root: str
    events: list = field(default_factory=list)

    def mark(self, label: str) -> None:
        """A point in the scenario's story ("done:2"), with a snapshot."""
        _C._crash_record("mark:" + label, "")


@contextmanager
def recording(root: str):
    """Record every file-system effect under `root` inside the block. What is
    there when the block starts counts as durable (os.sync() first)."""
    root = os.path.abspath(root)
    os.sync()
    rec = Recording(root)
    _C._crash_record_start(root)
    patched = {
        "fsync": _wrap_sync(_real["fsync"]), "fdatasync": _wrap_sync(_real["fdatasync"]),
        "rename": _wrap_rename(_real["rename"]), "replace": _wrap_rename(_real["replace"]),
        "unlink": _wrap_path_op(_real["unlink"], "unlink"), "remove": _wrap_path_op(_real["remove"], "unlink"),
        "mkdir": _wrap_path_op(_real["mkdir"], "mkdir"), "rmdir": _wrap_path_op(_real["rmdir"], "rmdir"),
        "sync": _synced_all,
    }
    for name, fn in patched.items():
        setattr(os, name, fn)
    try:
        rec.mark("begin")
        yield rec
    finally:
        for name, fn in _real.items():
            setattr(os, name, fn)
        raw = _C._crash_record_stop()
        rec.events = [_event(*e) for e in raw]


def _event(kind, path, path2, inode, tree) -> Event:
    names, contents = {}, {}
    for rel, ino, is_dir, data in tree:
        names[rel] = (ino, is_dir)
        if not is_dir:
            contents[ino] = data
    return Event(kind, path, path2, inode, names, contents)


# --- the states a power cut may leave -----------------------------------------------

@dataclass
class Window:
    index: int               # crash after event `index`, before the next one
    after: str               # that event, for reports
    last_done: Optional[int] # the newest version whose save had returned
    in_flight: bool          # a save had started and not yet returned
    states: list             # [{relative path: bytes | None (a directory)}]


def _parent(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else ""


def _relative(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)
    return "" if rel == "." else rel


def crash_windows(rec: Recording, seed: int = 0) -> list:
    """Every crash window of the recording with the distinct states it may leave."""
    events = rec.events
    rng = random.Random(seed)
    begin = events[0]
    # Durable view, advanced event by event.
    durable_names = dict(begin.names)                    # rel -> (inode, is_dir), as persisted
    synced_at = {rel: 0 for rel, (_, d) in begin.names.items() if d}
    synced_at[""] = 0                                    # directory rel -> index of its last fsync
    durable_data = dict(begin.contents)                  # inode -> bytes at its last fsync
    last_done, in_flight = None, False
    windows = []
    for k, event in enumerate(events):
        if event.kind == "sync":
            durable_names = dict(event.names)
            synced_at = {rel: k for rel, (_, d) in event.names.items() if d}
            synced_at[""] = k
            durable_data = dict(event.contents)
        elif event.kind == "fsync_dir":
            directory = _relative(rec.root, event.path)
            durable_names = {rel: v for rel, v in durable_names.items() if _parent(rel) != directory}
            durable_names.update({rel: v for rel, v in event.names.items() if _parent(rel) == directory})
            synced_at[directory] = k
        elif event.kind == "fsync":
            if event.inode in event.contents:
                durable_data[event.inode] = event.contents[event.inode]
        elif event.kind.startswith("mark:start:"):
            in_flight = True
        elif event.kind.startswith("mark:done:"):
            last_done, in_flight = int(event.kind.rsplit(":", 1)[1]), False
        following = events[k + 1] if k + 1 < len(events) else event
        states = _states(events, k, following, durable_names, synced_at, durable_data, rng)
        label = event.kind + (" " + _relative(rec.root, event.path) if event.path else "")
        windows.append(Window(k, label, last_done, in_flight, states))
    return windows


def _binding_options(events, k, durable_names, synced_at) -> dict:
    """rel -> the bindings (inode, is_dir) | None a power cut in window k may
    leave for it: its durable one, or any it had since its directory's last
    fsync, up to the next event's snapshot (what happened between the two
    events, a file created and written, shows only there; the next event's
    own effect adds no binding a later window does not have anyway)."""
    options = {}
    last = min(k + 1, len(events) - 1)
    every_name = set(durable_names)
    for event in events[: last + 1]:
        every_name.update(event.names)
    for rel in every_name:
        seen = [durable_names.get(rel)]
        since = synced_at.get(_parent(rel), None)
        first = 0 if since is None else since + 1   # a directory never fsynced: everything since it appeared
        for event in events[first : last + 1]:
            seen.append(event.names.get(rel))
        unique = list(dict.fromkeys(seen))
        options[rel] = unique
    return options


def _states(events, k, following, durable_names, synced_at, durable_data, rng) -> list:
    options = _binding_options(events, k, durable_names, synced_at)
    varying = sorted(rel for rel, opts in options.items() if len(opts) > 1)
    fixed = {rel: opts[0] for rel, opts in options.items() if len(opts) == 1}
    total = 1
    for rel in varying:
        total *= len(options[rel])
    if total <= MAX_NAMESPACES:
        combos = itertools.product(*(options[rel] for rel in varying))
    else:
        combos = [tuple(options[rel][0] for rel in varying), tuple(options[rel][-1] for rel in varying)]
        combos += [tuple(rng.choice(options[rel]) for rel in varying) for _ in range(MAX_NAMESPACES - 2)]
    current = events[k]
    states, seen = [], set()
    for combo in combos:
        bindings = dict(fixed)
        bindings.update(zip(varying, combo))
        visible = _visible(bindings)
        per_file = []
        for rel, (inode, is_dir) in sorted(visible.items()):
            if is_dir:
                per_file.append([(rel, None)])
                continue
            old = durable_data.get(inode, b"")
            new = following.contents.get(inode, current.contents.get(inode, old))
            per_file.append([(rel, data) for data in _data_variants(old, new, rng)])
        for choice in _bounded_product(per_file, rng):
            state = dict(choice)
            key = _state_key(state)
            if key not in seen:
                seen.add(key)
                states.append(state)
    return states


def _visible(bindings: dict) -> dict:
    """The bound names whose every parent directory is bound too."""
    visible = {}
    for rel in sorted(bindings, key=lambda r: r.count("/")):
        entry = bindings[rel]
        if entry is None:
            continue
        parent = _parent(rel)
        if parent == "" or (parent in visible and visible[parent][1]):
            visible[rel] = entry
    return visible


def _data_variants(old: bytes, new: bytes, rng) -> list:
    """What a file may hold after a power cut: `old` is durable, `new` was
    written since. Any subset of the changed blocks, with either size."""
    if old == new:
        return [old]
    length = max(len(old), len(new))
    padded_old, padded_new = old.ljust(length, b"\0"), new.ljust(length, b"\0")
    changed = [b for b in range(0, length, BLOCK) if padded_old[b : b + BLOCK] != padded_new[b : b + BLOCK]]
    subsets = [(), tuple(changed)]
    if len(changed) <= 3:
        subsets = [s for r in range(len(changed) + 1) for s in itertools.combinations(changed, r)]
    else:
        subsets += [tuple(c for c in changed if c != drop) for drop in (changed[0], changed[-1])]
        subsets += [(changed[0],), (changed[-1],)]
        while len(subsets) < MAX_DATA_VARIANTS:
            subsets.append(tuple(c for c in changed if rng.random() < 0.5))
    variants = []
    for subset in subsets:
        data = bytearray(padded_old)
        for b in subset:
            data[b : b + BLOCK] = padded_new[b : b + BLOCK]
        for size in dict.fromkeys((len(old), len(new))):
            variants.append(bytes(data[:size]))
    return list(dict.fromkeys(variants))


def _bounded_product(per_file: list, rng, limit: int = 64) -> list:
    total = 1
    for options in per_file:
        total *= len(options)
    if total <= limit:
        return list(itertools.product(*per_file))
    picks = [tuple(options[0] for options in per_file), tuple(options[-1] for options in per_file)]
    picks += [tuple(rng.choice(options) for options in per_file) for _ in range(limit - 2)]
    return picks


def _state_key(state: dict) -> tuple:
    return tuple(sorted((rel, None if data is None else hashlib.sha1(data).hexdigest())
                        for rel, data in state.items()))


# --- replaying and checking -----------------------------------------------------------

@dataclass
class Report:
    windows: int = 0
    states: int = 0            # (window, state) pairs checked
    distinct_states: int = 0   # distinct file-system states replayed
    violations: list = field(default_factory=list)


def replay(state: dict, into: str) -> None:
    """Build `state` ({relative path: bytes | None for a directory}) under `into`."""
    for rel, data in sorted(state.items(), key=lambda kv: kv[0].count("/")):
        path = os.path.join(into, rel)
        if data is None:
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with builtins.open(path, "wb") as f:
                f.write(data)


def check_recording(rec: Recording, checker: Callable[[str], object], scratch: str, *,
                    refusal_in_flight: bool = False) -> Report:
    """Replay every state of every window into a real directory under
    `scratch` and ask `checker(directory)` which version it finds (an int,
    or ABSENT); anything but a version at least as new as the last one
    reported done (or ABSENT before any was) is a violation, and so is any
    exception the checker raises. With `refusal_in_flight`, ABSENT is also
    allowed while a save is in flight (a DCP directory without .metadata)."""
    report = Report()
    observed = {}  # state key -> version | "error: ..."
    for window in crash_windows(rec):
        report.windows += 1
        for state in window.states:
            report.states += 1
            key = _state_key(state)
            if key not in observed:
                directory = tempfile.mkdtemp(dir=scratch)
                try:
                    replay(state, directory)
                    observed[key] = checker(directory)
                except KeyboardInterrupt:
                    raise
                except BaseException as e:  # noqa: BLE001 - every failure is a finding (DCP's are BaseException)
                    observed[key] = f"error: {type(e).__name__}: {e}"
                finally:
                    shutil.rmtree(directory, ignore_errors=True)
            found = observed[key]
            allowed = found == ABSENT and (window.last_done is None or (refusal_in_flight and window.in_flight))
            allowed = allowed or (isinstance(found, int) and (window.last_done is None or found >= window.last_done))
            if not allowed:
                report.violations.append(
                    f"crash after #{window.index} {window.after} (last done: {window.last_done}): "
                    f"found {found!r} in {sorted(state)}")
    report.distinct_states = len(observed)
    return report
