"""The wire under replicas: each rank paired with a partner rank on another
node, and parcels of files moved between them over torch.distributed (gloo).

- Pairing: rank r's partner is (r + local_world_size) % world_size
  (LOCAL_WORLD_SIZE, as torchrun sets it: the same local rank on the next
  node), or what ``partner(rank, world_size)`` says; it must be a
  permutation without fixed points. The link runs on a gloo process group of
  its own (never training's), with a timeout of CKPTIO_REPLICA_TIMEOUT_S, so
  a partner that hangs costs that timeout, not gloo's 30 minutes.
- A parcel is a JSON header (padded to HEADER_BYTES) and the bytes of the
  files it lists, each with its CRC-32: ``exchange`` sends this rank's
  parcel to its partner while receiving its source's (the rank whose
  partner it is); ``transfer`` sends parcels only to the ranks that asked.
  A parcel is CRC-checked on arrival (``unpack``).
- Every call here is collective over the link's group: every rank makes the
  same calls in the same order. Replication after a save runs on the link's
  own thread (``submit``), so that a partner that is slow or hangs holds
  replication only, never the save queue; ``drain`` waits for it.

What a replica is and where it is kept is the caller's:
ckptio.replication (a CheckpointManager's files) and ckptio.dcp_replicas
(a DCP checkpoint's rank files).
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from io import BufferedReader
from typing import Any, Callable, Optional

__all__ = ["PartnerLink", "default_partner", "pack", "unpack", "HEADER_BYTES"]

HEADER_BYTES = 4096  # the JSON that travels before a parcel's bytes, padded


def default_partner(rank: int, world_size: int) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or "1")
    return (rank + local) % world_size


def pack(sources: Sequence[str | BufferedReader]) -> tuple[list[list[Any]], bytearray]:
    """The files at `sources` (paths, or files opened earlier: a file pruned
    since is still read whole), read once into one buffer: ([[name, nbytes,
    crc32], ...], bytes). Files opened by the caller are closed here."""
    from . import _C

    opened = [open(s, "rb") if isinstance(s, str) else s for s in sources]
    try:  # (files opened by the caller too: closing twice is harmless)
        sizes = [os.fstat(f.fileno()).st_size for f in opened]
        data = bytearray(sum(sizes))
        files, at = [], 0
        view = memoryview(data)
        for f, size in zip(opened, sizes):
            f.seek(0)
            if f.readinto(view[at:at + size]) != size:
                raise OSError(f"{f.name}: changed size while it was read for its partner")
            files.append([os.path.basename(str(f.name)), size, _C.crc32(view[at:at + size])])
            at += size
        return files, data
    finally:
        for f in opened:
            f.close()


def unpack(header: dict[str, Any], data: memoryview, sender: int) -> list[tuple[str, memoryview]]:
    """The files of a received parcel, each CRC-checked against the CRC-32
    its sender computed: [(name, bytes)]. Raises ValueError on a bad name or
    a damaged file."""
    from . import _C

    out, at = [], 0
    for name, size, crc in header.get("files", []):
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"rank {sender} sent a file named {name!r:.200}")
        piece = data[at:at + size]
        if len(piece) != size or _C.crc32(piece) != crc:
            raise ValueError(f"rank {sender}'s {name} arrived damaged (CRC-32 differs from the sender's)")
        out.append((name, piece))
        at += size
    return out


class PartnerLink:
    """The pairing and the process group of one set of replicas (made on
    every rank at once, collectively)."""

    def __init__(self, partner: Optional[Callable[[int, int], int]] = None) -> None:
        import torch.distributed as dist

        from .config import replica_config

        self.timeout = replica_config().timeout_s  # a bad CKPTIO_REPLICA_TIMEOUT_S is named first
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("replicas= needs torch.distributed initialized (the same call on every rank)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        choose = partner or default_partner
        self.partners = [choose(r, self.world) for r in range(self.world)]
        if sorted(self.partners) != list(range(self.world)) or any(p == r for r, p in enumerate(self.partners)):
            raise ValueError(f"partner must pair each rank with another one, each once: got {self.partners} (set "
                             "LOCAL_WORLD_SIZE, or pass partner=)")
        self.partner = self.partners[self.rank]
        self.source = self.partners.index(self.rank)  # whose replicas this rank keeps
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout))
        self.broken: Optional[str] = None
        self.lock = threading.Lock()
        self._lane: Optional[ThreadPoolExecutor] = None
        self._last: Optional[Future[None]] = None

    def submit(self, what: str, paths: Sequence[str], job: Callable[[list[list[Any]], bytearray], None]) -> None:
        """Run job(*pack(paths)) on the link's own thread, after the jobs
        submitted before it (the same order on every rank), as
        replicating(what, ...): a slow or hung partner holds replication,
        never the saves behind it. The files are opened now: a pruning or
        a top-k removal before the thread reads them cannot pull them away."""
        if self.broken is not None:
            return
        opened: list[BufferedReader] = []
        try:
            for path in paths:
                opened.append(open(path, "rb"))
        except OSError as e:
            failure: Optional[OSError] = e
        else:
            failure = None

        def run() -> None:
            try:
                def packed_job() -> None:
                    if failure is not None:
                        raise failure  # this rank cannot send: replication fails here, as its partner's will
                    job(*pack(opened))
                self.replicating(what, packed_job)
            finally:
                for f in opened:
                    f.close()
        if self._lane is None:
            self._lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptio-replicas")
        self._last = self._lane.submit(run)

    def drain(self) -> None:
        """Block until the jobs submitted so far have run (each bounded by
        CKPTIO_REPLICA_TIMEOUT_S; their failures are warnings). Collective
        calls on the link (gather, transfer) come after a drain: the lane
        uses the same group."""
        last = self._last
        if last is not None:
            last.result()  # FIFO: the last job done, every one before it is

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (JSON-able), by rank."""
        import torch.distributed as dist

        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, obj, group=self.group)
        return everyone

    def replicating(self, what: str, job: Callable[[], None]) -> None:
        """Run one replication `job` unless the link broke; a failure breaks
        it (the group may be out of step) and is warned about once: the
        checkpoint it replicates is durable locally, and stays so."""
        with self.lock:
            if self.broken is not None:
                return
            try:
                job()
            except Exception as e:  # noqa: BLE001 - reported, never raised into a durable save
                self.broken = f"{type(e).__name__}: {e}"
                warnings.warn(f"ckptio: replicating {what} to rank {self.partner} failed ({self.broken}); the "
                              "checkpoint is durable here, and replication stops for this run", RuntimeWarning,
                              stacklevel=3)

    def exchange(self, header: dict[str, Any], data: bytearray) -> tuple[dict[str, Any], bytearray]:
        """Send (header, data) to the partner; return the source's."""
        received = self._headers({self.partner: header}, [self.source])[self.source]
        incoming = bytearray(_nbytes(received, self.source))
        self._payloads({self.partner: data}, {self.source: incoming})
        return received, incoming

    def transfer(self, needs: dict[int, int],
                 outgoing: Callable[[int], tuple[dict[str, Any], bytearray]]) -> Optional[tuple[dict[str, Any],
                                                                                            bytearray]]:
        """Partners send parcels to the ranks in `needs` ({rank: the rank
        sending to it}), each made by outgoing(rank); returns the parcel
        this rank received, or None. Ends with a barrier over the group."""
        import torch.distributed as dist

        parcels = {r: outgoing(r) for r, sender in needs.items() if sender == self.rank}
        sender = needs.get(self.rank)
        headers = self._headers({r: h for r, (h, _) in parcels.items()}, [sender] if sender is not None else [])
        incoming = bytearray(_nbytes(headers[sender], sender)) if sender is not None else None
        self._payloads({r: d for r, (_, d) in parcels.items()},
                       {sender: incoming} if sender is not None and incoming is not None else {})
        dist.barrier(group=self.group)
        return (headers[sender], incoming) if sender is not None and incoming is not None else None

    def _headers(self, outgoing: dict[int, dict[str, Any]], sources: list[int]) -> dict[int, dict[str, Any]]:
        import torch

        sends = {}
        for r, header in outgoing.items():
            raw = json.dumps(header).encode()
            if len(raw) > HEADER_BYTES:
                raise ValueError(f"a replica's header is too long to send ({len(raw)} > {HEADER_BYTES} bytes)")
            sends[r] = torch.frombuffer(bytearray(raw.ljust(HEADER_BYTES)), dtype=torch.uint8)
        buffers = {r: bytearray(HEADER_BYTES) for r in sources}  # received into in place (no numpy needed)
        self._run(sends, {r: torch.frombuffer(b, dtype=torch.uint8) for r, b in buffers.items()})
        out = {}
        for r, raw_in in buffers.items():
            try:
                out[r] = json.loads(bytes(raw_in).rstrip())
            except ValueError as e:
                raise ValueError(f"rank {r} sent a replica header that is not JSON") from e
        return out

    def _payloads(self, outgoing: dict[int, bytearray], incoming: dict[int, bytearray]) -> None:
        import torch

        self._run({r: torch.frombuffer(d, dtype=torch.uint8) for r, d in outgoing.items() if len(d)},
                  {r: torch.frombuffer(d, dtype=torch.uint8) for r, d in incoming.items() if len(d)})

    def _run(self, sends: dict[int, Any], receives: dict[int, Any]) -> None:
        import torch.distributed as dist

        ops = [dist.P2POp(dist.isend, t, r, group=self.group) for r, t in sends.items()]
        ops += [dist.P2POp(dist.irecv, t, r, group=self.group) for r, t in receives.items()]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()


def _nbytes(header: dict[str, Any], sender: int) -> int:
    files = header.get("files")
    if not isinstance(files, list) or not all(isinstance(f, list) and len(f) == 3 and isinstance(f[1], int)
                                              and f[1] >= 0 for f in files):
        raise ValueError(f"rank {sender} sent an unexpected replica header {header!r:.200}")
    return sum(f[1] for f in files)
