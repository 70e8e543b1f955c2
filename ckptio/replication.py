"""Replicas: each rank's newest checkpoint also in a partner rank's memory,
on another node, over torch.distributed (gloo), so that the loss of a node
costs no more than a restart from RAM.

- Pairing: rank r's partner is (r + local_world_size) % world_size
  (LOCAL_WORLD_SIZE, as torchrun sets it: the same local rank on the next
  node), or what ``partner(rank, world_size)`` says; it must be a
  permutation without fixed points. Replication runs on a gloo process group
  of its own (never training's), with a timeout of CKPTIO_REPLICA_TIMEOUT_S.
- After each save is durable, on the save queue (off the training thread):
  every rank sends its file to its partner and receives the file of the rank
  whose partner it is, CRC-verifies it, and keeps it in its own node's
  memory tier (``<service dir>/memory/<key of owner rank and directory>``),
  within CKPTIO_MEMORY_BYTES. The replica before it is dropped only once the
  new one is whole. Every rank must save the same steps (one manager per
  rank, saves in step): replication pairs the k-th save of each.
- A partner that cannot be reached fails replication, never the save: it is
  reported once and replication stops for this manager (the group may be
  broken); the local tiers go on.
- Resume (``CheckpointManager.load_latest`` with replicas, on every rank at
  once): the ranks agree on the newest step every rank can recover from
  some tier, its own (memory, local, remote) or its partner's replica; a
  rank that has lost it receives the replica over the group, CRC-verified,
  and says ``last_loaded.tier == "partner"``.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from datetime import timedelta
from typing import Any, Callable, Optional

__all__ = ["Replication", "default_partner"]

HEADER_BYTES = 4096  # the JSON that travels before a file's bytes, padded


def default_partner(rank: int, world_size: int) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or "1")
    return (rank + local) % world_size


class Replication:
    """One CheckpointManager's replicas (made on every rank, collectively)."""

    def __init__(self, directory: str, prefix: str, suffix: str,
                 partner: Optional[Callable[[int, int], int]] = None) -> None:
        import torch.distributed as dist

        from .config import replica_config

        self.timeout = replica_config().timeout_s  # a bad CKPTIO_REPLICA_TIMEOUT_S is named first
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("replicas= needs torch.distributed initialized (one CheckpointManager per rank)")
        self.directory, self.prefix, self.suffix = directory, prefix, suffix
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        choose = partner or default_partner
        self.partners = [choose(r, self.world) for r in range(self.world)]
        if sorted(self.partners) != list(range(self.world)) or any(p == r for r, p in enumerate(self.partners)):
            raise ValueError(f"partner must pair each rank with another one, each once: got {self.partners} (set "
                             "LOCAL_WORLD_SIZE, or pass partner=)")
        self.partner = self.partners[self.rank]
        self.source = self.partners.index(self.rank)  # whose replica this rank keeps
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout))
        # Every rank's directory: a replica's folder is named for its owner's.
        directories: list[Any] = [None] * self.world
        dist.all_gather_object(directories, directory, group=self.group)
        self.directories: list[str] = directories
        self.broken: Optional[str] = None
        self.lock = threading.Lock()
        self._held: dict[int, str] = {}  # agree()'s verified replicas, for transfer()

    # --- where replicas live ---------------------------------------------------

    def folder_of(self, owner: int) -> str:
        """The folder of this node's memory tier holding `owner`'s replicas."""
        from .config import service_config
        from .service.memory_tier import folder_for

        return folder_for(service_config().directory, f"replica of rank {owner}: {self.directories[owner]}",
                          self.prefix, self.suffix)

    def held_steps(self, pattern: Any) -> dict[int, str]:
        """{step: path} of the whole (CRC-verified) replicas this rank keeps for its source rank."""
        from . import api
        from .errors import CheckpointNotFoundError, CorruptCheckpointError
        from .service.memory_tier import images

        whole = {}
        for step, path in images(self.folder_of(self.source), pattern).items():
            try:
                api.verify(path)
                whole[step] = path
            except (CorruptCheckpointError, CheckpointNotFoundError):
                pass
        return whole

    # --- after each save -------------------------------------------------------

    def replicate(self, step: int, path: str, pattern: Any) -> None:
        """Send `path` (step `step`, durable) to the partner; receive and keep
        the source rank's. Run on the save queue; never raises."""
        with self.lock:
            if self.broken is not None:
                return
            try:
                self._exchange(step, path, pattern)
            except Exception as e:  # noqa: BLE001 - the save is durable: replication is reported, not raised
                self.broken = f"{type(e).__name__}: {e}"
                warnings.warn(f"ckptio: replicating {path} to rank {self.partner} failed ({self.broken}); the "
                              "checkpoint is durable here, and replication stops for this manager", RuntimeWarning,
                              stacklevel=2)

    def _exchange(self, step: int, path: str, pattern: Any) -> None:
        import torch

        with open(path, "rb") as f:  # read once, straight into what is sent
            data = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(data)
        header = json.dumps({"step": step, "name": os.path.basename(path), "owner": self.rank,
                             "nbytes": len(data)}).encode()
        if len(header) > HEADER_BYTES:
            raise ValueError(f"{path}: its name is too long to replicate ({len(header)} > {HEADER_BYTES} bytes)")
        header_in = bytearray(HEADER_BYTES)
        self._send_receive(torch.frombuffer(bytearray(header.ljust(HEADER_BYTES)), dtype=torch.uint8),
                           torch.frombuffer(header_in, dtype=torch.uint8))
        received = json.loads(bytes(header_in).rstrip())
        if received.get("owner") != self.source or not isinstance(received.get("step"), int) \
                or not isinstance(received.get("nbytes"), int) or received["nbytes"] <= 0:
            raise ValueError(f"rank {self.source} sent an unexpected replica header {received!r:.200}")
        incoming = bytearray(received["nbytes"])  # received into, in place (no numpy needed)
        self._send_receive(torch.frombuffer(data, dtype=torch.uint8), torch.frombuffer(incoming, dtype=torch.uint8))
        self._keep(received, memoryview(incoming), pattern)

    def _send_receive(self, outgoing: Any, incoming: Any) -> None:
        import torch.distributed as dist

        _run([dist.P2POp(dist.isend, outgoing, self.partner, group=self.group),
              dist.P2POp(dist.irecv, incoming, self.source, group=self.group)])

    def _keep(self, header: dict[str, Any], data: memoryview, pattern: Any) -> None:
        """Keep a received replica: written whole, verified, then the older ones go."""
        from . import api
        from .config import service_config
        from .errors import CorruptCheckpointError
        from .service.memory_tier import bytes_writer, prune, store

        folder, name = self.folder_of(self.source), str(header["name"])
        if os.path.basename(name) != name or not pattern.match(name):
            raise ValueError(f"rank {self.source} sent a replica named {name!r}")
        config = service_config()
        spec = {"folder": folder, "name": name, "pattern": pattern.pattern, "keep": 2,
                "source": f"replica of rank {self.source}: {self.directories[self.source]}"}
        kept = store(config.directory, config.memory_bytes, spec, len(data), bytes_writer(data, site="replica"))
        if "error" in kept:
            warnings.warn(f"ckptio: the replica of rank {self.source}'s {name} is not kept: {kept['error']}",
                          RuntimeWarning, stacklevel=2)
            return
        try:
            api.verify(kept["path"])
        except CorruptCheckpointError as e:
            os.remove(kept["path"])
            raise ValueError(f"the replica of rank {self.source}'s {name} arrived damaged: {e}") from e
        prune(folder, pattern, 1)  # the older replica goes once this one is whole

    # --- resume ----------------------------------------------------------------

    def agree(self, near: set[int], far: set[int], pattern: Any) -> tuple[int, dict[int, int]]:
        """Collectively: the newest step every rank can recover and which
        ranks take it from their partner ({rank: partner}). `near`: steps
        this rank holds in its memory or local tier (read before a partner's
        replica); `far`: in its remote tier (read after). Raises
        CheckpointNotFoundError (on every rank) when there is none."""
        import torch.distributed as dist

        from .errors import CheckpointNotFoundError

        self._held = self.held_steps(pattern)  # whole replicas only: transfer() sends one of these
        mine = {"near": sorted(near), "far": sorted(far), "held": sorted(self._held)}
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine, group=self.group)
        replicas = [set(everyone[self.partners[r]]["held"]) for r in range(self.world)]  # r's, at its partner
        recoverable = [set(everyone[r]["near"]) | replicas[r] | set(everyone[r]["far"]) for r in range(self.world)]
        common = set.intersection(*recoverable)
        if not common:
            raise CheckpointNotFoundError(2, "no step every rank can recover from its memory, local or remote tier "
                                          "or its partner's replica (steps per rank: "
                                          f"{[sorted(s) for s in recoverable]})", self.directory)
        step = max(common)
        needs = {r: self.partners[r] for r in range(self.world)
                 if step not in everyone[r]["near"] and step in replicas[r]}
        return step, needs

    def transfer(self, step: int, needs: dict[int, int], pattern: Any,
                 keep_own: Callable[[int, memoryview], str]) -> Optional[str]:
        """Collectively: partners send the replicas of `step` to the ranks in
        `needs`; on such a rank, keep_own(step, bytes) keeps it and returns
        its path (returned here); None elsewhere."""
        import torch
        import torch.distributed as dist

        send_to = [r for r, p in needs.items() if p == self.rank]  # at most one: pairing is a permutation
        data = bytearray()
        if send_to:
            with open(self._held[step], "rb") as f:  # verified by agree()
                data = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(data)
        size_in = torch.zeros(1, dtype=torch.int64)
        sizes = [dist.P2POp(dist.isend, torch.tensor([len(data)], dtype=torch.int64), r, group=self.group)
                 for r in send_to]
        if self.rank in needs:
            sizes.append(dist.P2POp(dist.irecv, size_in, needs[self.rank], group=self.group))
        _run(sizes)
        buffer = bytearray(int(size_in.item()))
        payloads = [dist.P2POp(dist.isend, torch.frombuffer(data, dtype=torch.uint8), r, group=self.group)
                    for r in send_to]
        if self.rank in needs:
            payloads.append(dist.P2POp(dist.irecv, torch.frombuffer(buffer, dtype=torch.uint8), needs[self.rank],
                                       group=self.group))
        _run(payloads)
        received = keep_own(step, memoryview(buffer)) if self.rank in needs else None
        dist.barrier(group=self.group)
        return received


def _run(ops: list[Any]) -> None:
    import torch.distributed as dist

    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
