"""Every tuning knob, its environment variable, default and accepted range.

This is the one place environment variables are read. Values are validated at
first use; a bad value raises :class:`ckptio.errors.ConfigError` naming the
variable and what it accepts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from .errors import ConfigError

__all__ = [
    "EngineConfig",
    "RemoteCopyConfig",
    "StagingConfig",
    "engine_config",
    "ServiceConfig",
    "remote_copy_config",
    "ReplicaConfig",
    "replica_config",
    "resolve_snapshot_mode",
    "service_config",
    "staging_config",
    "verify_by_default",
]


def _int_var(name: str, default: int, lo: int, hi: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer; expected an integer in [{lo}, {hi}]") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={raw!r} is out of range; expected an integer in [{lo}, {hi}]")
    return value


_T = TypeVar("_T")


def _choice_var(name: str, default: str, choices: Mapping[str, _T]) -> _T:
    raw = os.environ.get(name)
    key = default if raw is None or raw.strip() == "" else raw.strip().lower()
    if key not in choices:
        raise ConfigError(f"{name}={raw!r} is not accepted; expected one of {', '.join(choices)}")
    return choices[key]


# csrc/engine/file_io.h: DirectIoMode.
DIRECT_AUTO, DIRECT_REQUIRE, DIRECT_OFF = 0, 1, 2

_BOOLEAN = {"1": True, "true": True, "0": False, "false": False}


@dataclass(frozen=True)
class EngineConfig:
    num_threads: int   # CKPTIO_NUM_THREADS: engine I/O + CRC threads
    block_bytes: int   # CKPTIO_BLOCK_MB: one aligned read/write request
    queue_depth: int   # CKPTIO_QUEUE_DEPTH: requests in flight per file
    direct: int        # CKPTIO_DIRECT_IO: auto / 1 (require) / 0 (buffered + fdatasync)
    zero_copy_reads: bool = False  # CKPTIO_READ_ZERO_COPY: O_DIRECT into page-aligned destinations


def engine_config() -> EngineConfig:
    """Read and validate the engine's environment variables."""
    return EngineConfig(
        num_threads=_int_var("CKPTIO_NUM_THREADS", min(4, os.cpu_count() or 1), 1, 256),
        block_bytes=_int_var("CKPTIO_BLOCK_MB", 8, 1, 1024) << 20,
        queue_depth=_int_var("CKPTIO_QUEUE_DEPTH", 4, 1, 256),
        direct=_choice_var(
            "CKPTIO_DIRECT_IO",
            "auto",
            {"auto": DIRECT_AUTO, "1": DIRECT_REQUIRE, "true": DIRECT_REQUIRE, "0": DIRECT_OFF, "false": DIRECT_OFF},
        ),
        zero_copy_reads=bool(_choice_var("CKPTIO_READ_ZERO_COPY", "0", _BOOLEAN)),
    )


def verify_by_default() -> bool:
    """CKPTIO_VERIFY: whether ckptio.load checks CRC-32s when not told (default 1)."""
    return bool(_choice_var("CKPTIO_VERIFY", "1", _BOOLEAN))


SNAPSHOT_MODES = ("eager", "lazy")


def resolve_snapshot_mode(snapshot: str | None) -> str:
    """An async save's snapshot mode: `snapshot` if given, else
    CKPTIO_SNAPSHOT (default "eager"). "eager" copies every tensor before
    async_save returns; "lazy" leaves parameters and optimizer state to a
    background copy that the next optimizer step waits for."""
    if snapshot is None:
        return _choice_var("CKPTIO_SNAPSHOT", "eager", {m: m for m in SNAPSHOT_MODES})
    if snapshot not in SNAPSHOT_MODES:
        raise ValueError(f"snapshot={snapshot!r} is not accepted; expected one of {', '.join(SNAPSHOT_MODES)}")
    return snapshot


@dataclass(frozen=True)
class StagingConfig:
    slots: int          # CKPTIO_STAGING_SLOTS: snapshot slots (2 = double buffered)
    budget_bytes: int   # CKPTIO_STAGING_BUDGET_MB: largest snapshot kept whole
    chunk_bytes: int    # CKPTIO_CHUNK_MB: chunk size in streaming mode
    max_pending: int    # CKPTIO_MAX_PENDING: saves queued or writing before async_save waits


def _half_of_ram_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2 // (1 << 20)
    except (ValueError, OSError):
        return 4096


def staging_config() -> StagingConfig:
    """Read and validate the async pipeline's environment variables."""
    return StagingConfig(
        slots=_int_var("CKPTIO_STAGING_SLOTS", 2, 1, 16),
        budget_bytes=_int_var("CKPTIO_STAGING_BUDGET_MB", _half_of_ram_mb(), 0, 1 << 30) << 20,
        chunk_bytes=_int_var("CKPTIO_CHUNK_MB", 64, 1, 4096) << 20,
        max_pending=_int_var("CKPTIO_MAX_PENDING", 2, 1, 1024),
    )


@dataclass(frozen=True)
class RemoteReadConfig:
    range_bytes: int      # CKPTIO_REMOTE_RANGE_MB: one ranged GET of a remote load
    ranges_in_flight: int  # CKPTIO_REMOTE_RANGES: ranged GETs at once (memory: this many ranges)


def remote_read_config() -> RemoteReadConfig:
    """Read (and check) the remote-load variables now."""
    return RemoteReadConfig(
        range_bytes=_int_var("CKPTIO_REMOTE_RANGE_MB", 64, 1, 4096) << 20,
        ranges_in_flight=_int_var("CKPTIO_REMOTE_RANGES", 4, 1, 256),
    )


@dataclass(frozen=True)
class RemoteCopyConfig:
    request_timeout_s: int  # CKPTIO_REMOTE_TIMEOUT_S: connect/read timeout of one request to the object store
    copy_timeout_s: int     # CKPTIO_REMOTE_COPY_TIMEOUT_S: one whole remote copy (upload, pointer) before abandoned


def remote_copy_config() -> RemoteCopyConfig:
    """Read (and check) the remote-copy variables now. A hung object store
    answers nothing, so every wait on it needs a bound: the request timeout
    is the library's own (where it has one: s3fs), the copy timeout ours."""
    return RemoteCopyConfig(
        request_timeout_s=_int_var("CKPTIO_REMOTE_TIMEOUT_S", 30, 1, 3600),
        copy_timeout_s=_int_var("CKPTIO_REMOTE_COPY_TIMEOUT_S", 600, 1, 7 * 24 * 3600),
    )


@dataclass(frozen=True)
class ServiceConfig:
    enabled: bool        # CKPTIO_SERVICE: route async saves through the per-node service
    directory: str       # CKPTIO_SERVICE_DIR: its socket, lock, log and memory tier (0700)
    idle_s: int          # CKPTIO_SERVICE_IDLE_S: how long it waits, with no client and no work, before exiting
    keep_s: int          # CKPTIO_MEMORY_KEEP_S: how long it keeps memory-tier checkpoints with no client
    memory_bytes: int    # CKPTIO_MEMORY_BYTES: the memory tier's budget, across every trainer of the node


def _quarter_of_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError):
        return 4 << 30


def service_config() -> ServiceConfig:
    """Read (and check) the service's variables now. The default directory
    is on /dev/shm (a tmpfs: the memory tier's checkpoints are RAM), one per
    user."""
    directory = os.environ.get("CKPTIO_SERVICE_DIR", "").strip() or f"/dev/shm/ckptio-{os.getuid()}"
    return ServiceConfig(
        enabled=bool(_choice_var("CKPTIO_SERVICE", "0", _BOOLEAN)),
        directory=os.path.abspath(directory),
        idle_s=_int_var("CKPTIO_SERVICE_IDLE_S", 30, 1, 7 * 24 * 3600),
        keep_s=_int_var("CKPTIO_MEMORY_KEEP_S", 900, 1, 7 * 24 * 3600),
        memory_bytes=_int_var("CKPTIO_MEMORY_BYTES", _quarter_of_ram_bytes(), 0, 1 << 60),
    )


@dataclass(frozen=True)
class ReplicaConfig:
    timeout_s: int  # CKPTIO_REPLICA_TIMEOUT_S: one replica exchange (or resume transfer) before it is given up on


def replica_config() -> ReplicaConfig:
    """Read (and check) the replication variables now (see ckptio.replication)."""
    return ReplicaConfig(timeout_s=_int_var("CKPTIO_REPLICA_TIMEOUT_S", 120, 1, 24 * 3600))

