"""Replicas of a CheckpointManager: each rank's newest checkpoint also in a
partner rank's memory, on another node, over torch.distributed (gloo), so
that the loss of a node costs no more than a restart from RAM.

- Pairing and transport: ckptio.partner_link (rank + LOCAL_WORLD_SIZE by
  default, a gloo group of its own, CKPTIO_REPLICA_TIMEOUT_S, CRC-32 checked
  on arrival).
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

import os
import warnings
from typing import Any, Callable, Optional

from .partner_link import PartnerLink, default_partner, pack, unpack

__all__ = ["Replication", "default_partner"]


class Replication:
    """One CheckpointManager's replicas (made on every rank, collectively)."""

    def __init__(self, directory: str, prefix: str, suffix: str,
                 partner: Optional[Callable[[int, int], int]] = None) -> None:
        self.link = PartnerLink(partner)
        self.directory, self.prefix, self.suffix = directory, prefix, suffix
        self.rank, self.source = self.link.rank, self.link.source
        self.directories: list[str] = self.link.gather(directory)  # a replica's folder is named for its owner's
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
        the source rank's, on the link's thread. Called on the save queue, in
        the same order on every rank; never raises."""
        def exchange(files: list[list[Any]], data: bytearray) -> None:
            header, incoming = self.link.exchange({"step": step, "owner": self.rank, "files": files}, data)
            if header.get("owner") != self.source or not isinstance(header.get("step"), int) \
                    or len(header["files"]) != 1:
                raise ValueError(f"rank {self.source} sent an unexpected replica header {header!r:.200}")
            ((name, replica),) = unpack(header, memoryview(incoming), self.source)
            self._keep(name, replica, pattern)
        self.link.submit(path, [path], exchange)

    def _keep(self, name: str, data: memoryview, pattern: Any) -> None:
        """Keep a received replica: written whole, verified, then the older ones go."""
        from . import api
        from .config import service_config
        from .errors import CorruptCheckpointError
        from .service.memory_tier import bytes_writer, prune, store

        folder = self.folder_of(self.source)
        if not pattern.match(name):
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

    def check_held(self, pattern: Any) -> None:
        """Find the whole replicas this rank holds, for agree() and transfer()."""
        self._held = self.held_steps(pattern)

    def agree(self, near: set[int], far: Optional[set[int]]) -> tuple[Optional[int], dict[int, int]]:
        """Collectively: the newest step every rank can recover and which
        ranks take it from their partner ({rank: partner}), the replicas
        held being those check_held() found. `near`: steps this rank holds in
        its memory or local tier (read before a partner's replica); `far`:
        in its remote tier (read after), or None when not listed yet: then
        (None, {}) on every rank if the remote tiers might matter, and the
        caller lists them and agrees again. Raises CheckpointNotFoundError
        (on every rank) when there is none."""
        from .errors import CheckpointNotFoundError

        everyone = self.link.gather({"near": sorted(near), "far": sorted(far or ()), "held": sorted(self._held)})
        world, partners = self.link.world, self.link.partners
        replicas = [set(everyone[partners[r]]["held"]) for r in range(world)]  # r's, at its partner
        recoverable = [set(everyone[r]["near"]) | replicas[r] | set(everyone[r]["far"]) for r in range(world)]
        common = set.intersection(*recoverable)
        if far is None:
            # A rank copies a step to its remote tier only once it is durable locally, and every rank saves
            # the same steps: no remote tier holds a step newer than the newest any rank still holds near
            # it or in a replica. When every rank can recover that one, listing the remote tiers (seconds on
            # an object store) cannot change the answer; otherwise it may.
            newest = max((max(r) for r in recoverable if r), default=None)
            if newest is None or newest not in common:
                return None, {}
        if not common:
            raise CheckpointNotFoundError(2, "no step every rank can recover from its memory, local or remote tier "
                                          "or its partner's replica (steps per rank: "
                                          f"{[sorted(s) for s in recoverable]})", self.directory)
        step = max(common)
        needs = {r: partners[r] for r in range(world) if step not in everyone[r]["near"] and step in replicas[r]}
        return step, needs

    def transfer(self, step: int, needs: dict[int, int], keep_own: Callable[[int, memoryview], str]) -> Optional[str]:
        """Collectively: partners send the replicas of `step` to the ranks in
        `needs`; on such a rank, keep_own(step, bytes) keeps it (CRC-checked
        on arrival) and returns its path (returned here); None elsewhere."""
        def outgoing(owner: int) -> tuple[dict[str, Any], bytearray]:
            files, data = pack([self._held[step]])  # verified by agree()
            return {"step": step, "owner": owner, "files": files}, data

        received = self.link.transfer(needs, outgoing)
        if received is None:
            return None
        header, data = received
        ((_, replica),) = unpack(header, memoryview(data), needs[self.rank])
        return keep_own(step, replica)
