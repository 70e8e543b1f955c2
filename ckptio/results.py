"""What saves and verifications return (its own module: the writers that
build these, api, background and remote, need not import each other)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SaveResult", "VerifyResult"]


@dataclass(frozen=True)
class SaveResult:
    path: str
    bytes: int          # size of the checkpoint file
    write_seconds: float  # from handing the records to the engine to durable
    direct_io: bool     # whether O_DIRECT carried the writes
    block_bytes: int = 0  # size of one write request (CKPTIO_BLOCK_MB, or CKPTIO_CHUNK_MB when streaming)
    remote: Any = None  # a CheckpointManager's copy to its remote tier: tiers.RemoteCopy, or None

    @classmethod
    def from_stats(cls, st: dict[str, Any]) -> SaveResult:
        return cls(st["path"], st["bytes"], st["seconds"], st["direct_io"], st["block_bytes"])


@dataclass(frozen=True)
class VerifyResult:
    path: str
    records: int
    bytes: int
