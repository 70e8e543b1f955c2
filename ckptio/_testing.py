"""Test helpers that reach into the engine. Not part of the public API."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from . import _C

__all__ = ["inject_fault", "delay_lazy_copies", "skip_fsyncs", "FSYNC_SITES"]


@contextmanager
def inject_fault(kind: str, *, errno: int = 0, at_byte: int = 0, max_chunk: int = 0, count: int = 0) -> Iterator[None]:
    """Make the engine's file layer misbehave inside the block.

    kind: "write_error_at_byte" (writes reaching `at_byte` fail with `errno`),
    "fsync_error" (fdatasync fails with `errno`), "short_writes" (each write
    moves at most `max_chunk` bytes), "eintr_storm" (the next `count` writes
    and syncs fail with EINTR), "copy_error" (the next batched snapshot copy
    fails with `errno` before copying anything: what a device copy error looks
    like to a lazy snapshot).
    """
    _C._arm_fault(kind, errno, at_byte, max_chunk, count)
    try:
        yield
    finally:
        _C._disarm_faults()


@contextmanager
def delay_lazy_copies(seconds: float) -> Iterator[None]:
    """Inside the block, every lazy snapshot's background copy starts only
    `seconds` after its save returned: whatever the caller does meanwhile
    (forward, backward, an optimizer step) happens before the copy, so a
    missing barrier shows up as a wrong file instead of as a rare race."""
    from . import lazy_snapshot

    previous, lazy_snapshot._test_start_delay = lazy_snapshot._test_start_delay, seconds
    try:
        yield
    finally:
        lazy_snapshot._test_start_delay = previous


# Every fsync a commit makes, by site: the engine's (file data, the directory
# after the rename) and the Python-side writers' (torch.save through
# committed_file, the manager's pointer, DCP's rank files and .metadata, and
# the parent of a directory a save creates).
FSYNC_SITES = (
    "engine.file", "engine.directory",
    "torch_save.file", "torch_save.directory",
    "pointer.file", "pointer.directory",
    "dcp.shard.file", "dcp.shard.directory",
    "dcp.metadata.file", "dcp.metadata.directory", "dcp.retire_metadata.directory",
    "new_directory",
)


@contextmanager
def skip_fsyncs(*sites: str) -> Iterator[None]:
    """Leave out the named fsyncs (see FSYNC_SITES) inside the block: the
    mutation that proves the power-loss simulator notices a missing one."""
    from . import _paths

    unknown = set(sites) - set(FSYNC_SITES)
    if unknown:
        raise ValueError(f"unknown fsync sites: {sorted(unknown)}; known: {FSYNC_SITES}")
    previous = _paths._skipped_fsyncs
    _paths._skipped_fsyncs = frozenset(sites)
    _C._skip_syncs("engine.file" in sites, "engine.directory" in sites)
    try:
        yield
    finally:
        _paths._skipped_fsyncs = previous
        _C._skip_syncs("engine.file" in previous, "engine.directory" in previous)
