"""Replicas of Lightning's DDP checkpoints: rank 0's checkpoint (written by
ckptio's AsyncCheckpointIO with a memory tier) also kept in its partner
rank's node's memory tier, so that a restart after the loss of rank 0's node
reads it from RAM on another node.

Under DDP only global rank 0 calls the CheckpointIO plugin, so the plugin
alone cannot reach the other ranks. ``ReplicatedCheckpoints``, mixed in
before Lightning's DDPStrategy (ckptio.lightning.DDPStrategy), is called on
every rank:

- ``save_checkpoint``: after the plugin has queued rank 0's save, every rank
  queues one job on a replication lane of its own (one thread, FIFO, the
  same jobs in the same order on every rank): rank 0's waits for that save
  to be durable and sends its memory-tier image (else the file) to its
  partner, which keeps it, CRC-checked on arrival, in its node's memory tier
  in the very folder the plugin reads there. The other ranks exchange empty
  parcels. A failure is warned about once and stops replication; the save
  is durable all the same (ckptio.partner_link).
- ``load_checkpoint``: the lane drained, every rank at once: a rank that
  has neither the file nor its image in its node's memory receives it from
  its partner where that node holds it; then the plugin loads as before.
  ``last_loaded_tier`` says "partner" for a rank served so.
- ``teardown`` drains the lane: the last replica lands before the
  processes go.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from .._paths import normalize_path

__all__ = ["ReplicatedCheckpoints"]


class ReplicatedCheckpoints:
    """Mixed in before Lightning's DDPStrategy."""

    replicas = 0
    partner: Optional[Callable[[int, int], int]] = None  # the pairing (ckptio.partner_link)
    last_loaded_tier: Optional[str] = None  # "memory", "partner" or "local": where the last load read the checkpoint
    _ckptio_link: Any = None

    # --- Lightning's interface -------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        plugin = self._ckptio_plugin()  # with replicas, checked before anything is saved
        super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]  # rank 0 queues it
        if self.replicas and self._ckptio_distributed():
            handle = plugin.last_handle if self.is_global_zero else None  # type: ignore[attr-defined]
            self._ckptio_replicate(normalize_path(self.broadcast(filepath)), handle)  # type: ignore[attr-defined]

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        plugin = self._ckptio_plugin()
        from_partner = False
        if self.replicas and self._ckptio_distributed():
            self.wait_for_replicas()
            from_partner = self._ckptio_restore(normalize_path(self.broadcast(checkpoint_path)))  # type: ignore[attr-defined]
        loaded = super().load_checkpoint(checkpoint_path, weights_only)  # type: ignore[misc]
        tier = getattr(plugin, "last_loaded_tier", None)
        self.last_loaded_tier = "partner" if from_partner and tier == "memory" else tier
        return loaded

    def teardown(self) -> None:
        try:
            self.wait_for_replicas()  # the last replica lands before the processes go
        finally:
            super().teardown()  # type: ignore[misc]

    # --- ckptio's additions ----------------------------------------------------

    def wait_for_replicas(self) -> None:
        """Block until this rank's replication jobs so far have run (each
        bounded by CKPTIO_REPLICA_TIMEOUT_S; failures are warnings)."""
        if self._ckptio_link is not None:
            self._ckptio_link.drain()

    def _ckptio_distributed(self) -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _ckptio_plugin(self) -> Any:
        """The Trainer's ckptio AsyncCheckpointIO with a memory tier (replicas live there)."""
        from .async_io import AsyncCheckpointIO

        plugin = self.checkpoint_io  # type: ignore[attr-defined]
        if self.replicas and not (isinstance(plugin, AsyncCheckpointIO) and plugin.memory >= 1):
            raise ValueError("replicas=1 needs the Trainer's checkpoint_io to be ckptio's AsyncCheckpointIO with "
                             f"memory >= 1 (replicas live in the memory tier), not {plugin!r:.100}")
        return plugin

    def _ckptio_link_made(self) -> Any:
        """The pairing and group: made on the first save or load, which every rank makes."""
        if self._ckptio_link is None:
            from ..partner_link import PartnerLink

            self._ckptio_link = PartnerLink(self.partner)
        return self._ckptio_link

    def _ckptio_replicate(self, path: str, handle: Any) -> None:
        link, plugin = self._ckptio_link_made(), self._ckptio_plugin()

        def exchange(_: list[list[Any]], __: bytearray) -> None:  # its file exists only once rank 0's save is done
            from ..partner_link import pack, unpack
            from ..service.memory_tier import bytes_writer, keep_here

            files: list[list[Any]] = []
            data = bytearray()
            if handle is not None and handle.exception() is None:  # durable, its image kept (a failure is the
                image = plugin._memory_image(path)                      # plugin's to raise: nothing to send then)
                files, data = pack([image if image is not None else path])
            header, incoming = link.exchange({"path": path, "owner": link.rank, "files": files}, data)
            for name, replica in unpack(header, memoryview(incoming), link.source):
                spec = plugin.memory_spec(str(header["path"]))
                if name != spec["name"]:
                    raise ValueError(f"rank {link.source} sent {name!r} for {header['path']!r:.200}")
                keep_here(spec, str(header["path"]), len(replica), bytes_writer(replica, site="replica"))

        link.submit(path, [], exchange)  # on the link's thread, after rank 0's save (it waits for it)

    def _ckptio_restore(self, path: str) -> bool:
        """Collectively: a rank with neither `path` nor its image in its node's
        memory receives the image from its partner, if that node holds it."""
        from .. import api
        from ..errors import CheckpointNotFoundError, CorruptCheckpointError
        from ..partner_link import pack, unpack
        from ..service.memory_tier import bytes_writer, keep_here

        link, plugin = self._ckptio_link_made(), self._ckptio_plugin()
        link.drain()  # the replication of earlier saves uses the same group
        image = plugin._memory_image(path)
        everyone = link.gather({"own": image is not None or os.path.isfile(path), "has": image is not None})
        needs = {r: link.partners[r] for r in range(link.world)
                 if not everyone[r]["own"] and everyone[link.partners[r]]["has"]}

        def outgoing(owner: int) -> tuple[dict[str, Any], bytearray]:
            assert image is not None  # this rank said its node holds it
            try:
                api.verify(image)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                return {"files": [], "damaged": str(e)}, bytearray()
            files, data = pack([image])
            return {"files": files}, data

        received = link.transfer(needs, outgoing)
        if received is None:
            return False
        header, data = received
        if header.get("damaged"):
            import warnings

            warnings.warn(f"ckptio: rank {needs[link.rank]}'s replica of {path} is damaged ({header['damaged']:.200});"
                          " loading from this rank's own tiers", RuntimeWarning, stacklevel=2)
            return False
        ((_, replica),) = unpack(header, memoryview(data), needs[link.rank])
        keep_here(plugin.memory_spec(path), path, len(replica), bytes_writer(replica, site="replica"))
        return True
