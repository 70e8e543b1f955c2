"""A DCP checkpoint's rank files in RAM: each rank's in its own node's memory
tier, and (with replicas) in its partner rank's, on another node.

A rank's image of a DCP checkpoint directory is its ``__<rank>_0.distcp``
file (ckptio's StorageWriter writes one per rank); rank 0's also holds
``.metadata`` and what the caller names (Lightning's ``meta.pt``). Images
live in the memory tier, in the folder named for the checkpoint directory
and the owner rank (``memory_folder``), whichever node holds them: a
partner's replica sits where the owner's own copy would sit on its node.

- After a save is durable: ``keep_in_memory`` copies this rank's files
  there; ``DcpReplicas.replicate`` (collective, on the save queue) sends
  them to the partner and keeps the source rank's, CRC-checked on arrival
  (their CRC-32s kept beside them, in ``.crc32``).
- Before a load: ``DcpReplicas.restore`` (collective) gives each rank whose
  files are in no memory of its node the partner's replica, checked again;
  then ``memory_copies`` lists what the StorageReader reads from RAM
  (falling back to the directory for a damaged copy).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

from .partner_link import PartnerLink, pack, unpack

__all__ = ["memory_folder", "keep_in_memory", "memory_copies", "rank_file", "DcpReplicas"]

CRC_FILE = ".crc32"  # in a replica's folder: {name: CRC-32} as its owner sent them (a dot file: no image)


def rank_file(rank: int) -> str:
    return f"__{rank}_0.distcp"


def memory_folder(path: Path, rank: int) -> str:
    """Where this node's memory tier keeps `rank`'s files of the DCP checkpoint `path`."""
    from .config import service_config
    from .service.memory_tier import folder_for

    return folder_for(service_config().directory, os.fspath(path), f"rank{rank}", "")


def _names(rank: int, rank0_extras: tuple[str, ...]) -> list[str]:
    return [rank_file(rank)] + ([".metadata", *rank0_extras] if rank == 0 else [])


def keep_in_memory(path: Path, rank: int, keep: int, rank0_extras: tuple[str, ...] = ()) -> None:
    """Copy this rank's durable files of `path` into the memory tier, within
    CKPTIO_MEMORY_BYTES; then keep the `keep` newest checkpoints of its
    directory there. A copy that does not fit is warned about: the files on
    disk stand."""
    from .service.memory_tier import file_copier

    names = _names(rank, rank0_extras)
    _keep(path, rank, keep, {n: (os.path.getsize(path / n), file_copier(os.fspath(path / n))) for n in names})


def _keep(path: Path, rank: int, keep: int, files: dict[str, tuple[int, Callable[[str], None]]]) -> None:
    """Keep `files` ({name: (bytes, write)}) as `rank`'s of `path` in this
    node's memory tier, then its `keep` newest checkpoints of that directory."""
    from .config import service_config
    from .service.memory_tier import folder_for, keep_here, prune_folders

    folder = memory_folder(path, rank)
    for name, (nbytes, write) in files.items():
        spec = {"folder": folder, "name": name, "keep": len(files), "order": "mtime", "source": os.fspath(path)}
        keep_here(spec, os.fspath(path / name), nbytes, write)
    service_directory, parent = service_config().directory, os.path.dirname(os.fspath(path))

    def same_rank_and_directory(other: str, source: str) -> bool:
        return os.path.dirname(source) == parent and other == folder_for(service_directory, source, f"rank{rank}", "")
    prune_folders(service_directory, same_rank_and_directory, keep)


def memory_copies(path: Path, world_size: int) -> dict[str, str]:
    """{rank file: its copy in this node's memory tier} for the copies there."""
    copies = {}
    for rank in range(world_size):
        copy = os.path.join(memory_folder(path, rank), rank_file(rank))
        if os.path.isfile(copy):
            copies[rank_file(rank)] = copy
    return copies


class DcpReplicas:
    """Replicas of DCP checkpoints' rank files (made on every rank at once,
    collectively; see ckptio.partner_link for the pairing)."""

    def __init__(self, keep: int, partner: Optional[Callable[[int, int], int]] = None,
                 rank0_extras: tuple[str, ...] = ()) -> None:
        self.link = PartnerLink(partner)
        self.newest, self.rank0_extras = keep, rank0_extras
        self.last_from_partner = False  # whether reader()'s restore brought this rank's files from its partner

    def after_save(self, path: str | os.PathLike[str]) -> None:
        """After ``dcp.save`` of `path` returned on every rank (its files
        durable): this rank's files into its node's memory tier and, on a
        thread of their own (``wait``), its partner's. Collective; a
        replication failure is a warning."""
        keep_in_memory(Path(path), self.link.rank, self.newest, self.rank0_extras)
        self.replicate(Path(path))

    def wait(self) -> None:
        """Block until the replication of every after_save so far has run
        (each exchange bounded by CKPTIO_REPLICA_TIMEOUT_S)."""
        self.link.drain()

    def reader(self, path: str | os.PathLike[str], **kwargs: Any) -> Any:
        """Collectively (``restore``): a ckptio StorageReader of `path` that
        reads this node's memory copies first, CRC-verified, falling back to
        the directory; `kwargs` go to it."""
        from .distributed import StorageReader

        self.last_from_partner = self.restore(Path(path))
        return StorageReader(path, memory_copies=memory_copies(Path(path), self.link.world), **kwargs)

    def replicate(self, path: Path) -> None:
        """Send this rank's files of `path` (durable; read from its memory
        copy where there is one) to the partner and keep the source rank's,
        on the link's thread. Called in the same order on every rank; never
        raises."""
        mine = memory_folder(path, self.link.rank)
        paths = [copy if os.path.isfile(copy := os.path.join(mine, name)) else os.fspath(path / name)
                 for name in _names(self.link.rank, self.rank0_extras)]

        def exchange(files: list[list[Any]], data: bytearray) -> None:
            header, incoming = self.link.exchange({"path": os.fspath(path), "owner": self.link.rank,
                                                   "files": files}, data)
            self._keep_replica(header, memoryview(incoming))
        self.link.submit(os.fspath(path), paths, exchange)

    def _keep_replica(self, header: dict[str, Any], data: memoryview) -> None:
        source = self.link.source
        if header.get("owner") != source or not isinstance(header.get("path"), str):
            raise ValueError(f"rank {source} sent an unexpected replica header {header!r:.200}")
        path = Path(header["path"])
        received = unpack(header, data, source)
        expected = _names(source, self.rank0_extras)
        if sorted(n for n, _ in received) != sorted(expected):
            raise ValueError(f"rank {source} sent {[n for n, _ in received]} for its files of {path}, not {expected}")
        from .service.memory_tier import bytes_writer

        self._write_crcs(path, source, {})  # a replica is whole only once its CRCs are back, after its files
        _keep(path, source, self.newest, {n: (len(b), bytes_writer(b, site="replica")) for n, b in received})
        self._write_crcs(path, source, {n: crc for n, _, crc in header["files"]})

    @staticmethod
    def _write_crcs(path: Path, owner: int, crcs: dict[str, int]) -> None:
        from ._paths import committed_file

        folder = memory_folder(path, owner)
        if os.path.isdir(folder):
            with committed_file(os.path.join(folder, CRC_FILE), site="replica") as f:
                f.write(json.dumps(crcs).encode())

    def _held(self, path: Path) -> Optional[tuple[list[str], dict[str, int]]]:
        """The source rank's files of `path` this rank holds, all there with
        the CRC-32s they arrived with ([paths], {name: crc}), or None. Their
        bytes are checked when sent (restore's outgoing)."""
        folder, names = memory_folder(path, self.link.source), _names(self.link.source, self.rank0_extras)
        try:
            with open(os.path.join(folder, CRC_FILE)) as f:
                crcs = json.load(f)
        except (OSError, ValueError):
            return None
        paths = [os.path.join(folder, n) for n in names]
        if not isinstance(crcs, dict) or set(crcs) != set(names) or not all(os.path.isfile(p) for p in paths):
            return None
        return paths, crcs

    def restore(self, path: Path) -> bool:
        """Collectively, before `path` is read: each rank with no copy of its
        rank file in its node's memory tier receives its partner's replica
        (if the partner holds it), CRC-checked on both ends, into its own
        memory folder. True on a rank that received its files so; a damaged
        replica is warned about, and the rank reads the directory."""
        self.link.drain()  # the replication before it uses the same group
        own = os.path.isfile(os.path.join(memory_folder(path, self.link.rank), rank_file(self.link.rank)))
        held = self._held(path)
        everyone = self.link.gather({"own": own, "held": held is not None})
        partners = self.link.partners
        needs = {r: partners[r] for r in range(self.link.world)
                 if not everyone[r]["own"] and everyone[partners[r]]["held"]}

        def outgoing(owner: int) -> tuple[dict[str, Any], bytearray]:
            assert held is not None  # this rank said it holds them
            paths, crcs = held
            files, data = pack(paths)
            damaged = [name for name, _, crc in files if crcs[name] != crc]
            if damaged:  # the RAM they sat in changed them: the owner reads its directory instead
                return {"owner": owner, "files": [], "damaged": damaged}, bytearray()
            return {"path": os.fspath(path), "owner": owner, "files": files}, data

        received = self.link.transfer(needs, outgoing)
        if received is None:
            return False
        header, data = received
        sender = needs[self.link.rank]
        if header.get("damaged"):
            import warnings

            warnings.warn(f"ckptio: rank {sender}'s replica of this rank's files of {path} is damaged "
                          f"({header['damaged']!r:.200}); reading them from the directory", RuntimeWarning,
                          stacklevel=2)
            return False
        files = unpack(header, memoryview(data), sender)
        from .service.memory_tier import bytes_writer

        _keep(path, self.link.rank, self.newest, {n: (len(b), bytes_writer(b, site="replica")) for n, b in files})
        return True
