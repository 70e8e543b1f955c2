"""Sharded checkpoints of Lightning's FSDP and ModelParallel strategies
through ckptio: asynchronous, durable, read in place.

Lightning's sharded strategies never call the CheckpointIO plugin: they call
``torch.distributed.checkpoint.save`` (synchronous, DCP's stock writer, no
directory fsync), ``torch.save`` a ``meta.pt`` on rank 0, and load with DCP's
stock reader. ``ShardedCheckpoints``, mixed in before the strategy (see
ckptio.lightning.ModelParallelStrategy / FSDPStrategy), saves instead with
``dcp.async_save`` through ckptio's StorageWriter:

- the training step waits only for the snapshot (into the writer's reusable
  staging buffer); DCP's collectives run in a background thread on a gloo
  group of their own (never interleaved with training's);
- a job on ckptio's save queue waits for that save, then rank 0 commits
  ``meta.pt`` (temporary file, fsync, rename, directory fsync). Lightning
  takes a directory for a sharded checkpoint only once ``meta.pt`` is there,
  so ``meta.pt`` goes first when a directory is saved over, and comes back
  last: a directory Lightning would load is always whole;
- the next sharded save, a load, ``remove_checkpoint`` (ModelCheckpoint's
  top-k) and teardown wait for the saves before them; a save's failure is
  raised there, on every rank where it happened;
- with ``replicas=1`` (and a memory tier), each rank's files also go to
  its partner rank's node's memory tier, on a thread of their own, once
  durable; a load first gives each rank whose node holds none of its files
  its partner's replica (ckptio.dcp_replicas);
- loads use ckptio's StorageReader (CRC-verified, metadata unpickled with an
  allowlist), straight into the module's and optimizers' own tensors.

``state_dict_type="full"`` (FSDP) and ``save_distributed_checkpoint=False``
(ModelParallel) go through the CheckpointIO plugin as before.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .._paths import committed_file, fsync_directory, make_directories
from ..preemption import durable_if_signalled
from ..results import SaveResult
from ..save_queue import SaveHandle, get_queue

__all__ = ["ShardedCheckpoints", "METADATA_FILENAME"]

METADATA_FILENAME = "meta.pt"  # Lightning's _METADATA_FILENAME: what makes a directory a sharded checkpoint


class ShardedCheckpoints:
    """Mixed in before Lightning's FSDPStrategy or ModelParallelStrategy."""

    _ckptio_model_key = "state_dict"  # the model's key in the DCP state (FSDPStrategy: "model")
    _ckptio_writer: Any = None
    _ckptio_group: Any = None
    _ckptio_pending: Optional[SaveHandle] = None
    memory = 0  # sharded checkpoints of each directory kept in the memory tier (see ckptio.lightning)
    replicas = 0  # 1: each rank's files also in its partner rank's memory tier (ckptio.dcp_replicas)
    partner: Optional[Callable[[int, int], int]] = None  # the pairing (ckptio.partner_link)
    _ckptio_replicas: Any = None
    last_loaded_tier: Optional[str] = None  # "memory", "partner" or "local": where the last load read this rank's files

    # What the strategy class decides (overridden per base in ckptio.lightning).
    def _ckptio_saves_sharded(self) -> bool:
        raise NotImplementedError

    def _ckptio_load_sharded(self, path: Path, weights_only: Optional[bool]) -> dict[str, Any]:
        raise NotImplementedError

    # --- Lightning's interface -------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"`{type(self).__name__}.save_checkpoint(..., storage_options=...)` is not supported: "
                            "sharded checkpoints are written by ckptio's DCP StorageWriter, not a CheckpointIO")
        self.wait_for_checkpoints()  # one at a time: the staging buffer is reused, and the path may be the same
        if not self._ckptio_saves_sharded():
            super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]
            return
        path = Path(self.broadcast(filepath))  # type: ignore[attr-defined]
        if self._ckptio_replicas is None:  # collective, on every rank (a load may have made it already)
            self._ckptio_replicas = self._ckptio_replica_link()
        self._ckptio_pending = self._save_sharded(checkpoint, path)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        self.wait_for_checkpoints()
        self.barrier("ckptio_load_checkpoint")  # type: ignore[attr-defined]  # every rank's saves, meta.pt too
        path = Path(self.broadcast(checkpoint_path))  # type: ignore[attr-defined]
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)  # type: ignore[misc]
        return self._ckptio_load_sharded(path, weights_only)

    def remove_checkpoint(self, filepath: Any) -> None:
        self.wait_for_checkpoints()  # never remove what is still being written
        path = Path(filepath)
        if not path.is_dir() or path.is_symlink():  # a full checkpoint: the CheckpointIO plugin's (it may write it)
            super().remove_checkpoint(filepath)  # type: ignore[misc]
        elif self.is_global_zero:  # type: ignore[attr-defined]
            shutil.rmtree(path)

    def teardown(self) -> None:
        try:
            self.wait_for_checkpoints()  # drains: the last checkpoint is durable before the processes go
        finally:
            super().teardown()  # type: ignore[misc]

    # --- ckptio's additions ----------------------------------------------------

    def wait_for_checkpoints(self) -> None:
        """Block until this rank's sharded save in progress (if any) is
        durable, meta.pt included, and replicated (replicas=1); raise its
        failure."""
        pending, self._ckptio_pending = self._ckptio_pending, None
        if pending is not None:
            pending.result()
        if self._ckptio_replicas is not None:  # and its replication, on the link's thread
            self._ckptio_replicas.link.drain()

    def _ckptio_replica_link(self) -> Any:
        """The replicas' pairing and group (made collectively, on the first
        save or load, on every rank), or None without replicas."""
        if not self.replicas:
            return None
        from ..dcp_replicas import DcpReplicas

        return DcpReplicas(self.memory, self.partner, (METADATA_FILENAME,))

    def _save_sharded(self, checkpoint: dict[str, Any], path: Path) -> SaveHandle:
        import torch
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        from ..distributed import StorageWriter

        queue = get_queue()
        queue.reserve()  # raises an earlier background failure; waits while the queue is full
        start = time.perf_counter()
        rank0 = self.global_rank == 0  # type: ignore[attr-defined]
        if path.is_file():
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # another rank's unlink
        make_directories(os.fspath(path))
        if rank0:
            _retire(path / METADATA_FILENAME)  # saved over, the directory is no checkpoint until it comes back
        state = {self._ckptio_model_key: checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        metadata = None
        if rank0:  # what is left (loops, callbacks, hyperparameters), as of now
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            metadata = buffer.getvalue()
        distributed = dist.is_available() and dist.is_initialized()
        if self._ckptio_writer is None:
            self._ckptio_writer = StorageWriter(path)
            if distributed:  # DCP's collectives run in its background thread: a group of their own, never training's
                self._ckptio_group = dist.new_group(backend="gloo")
        alone: dict[str, Any] = {} if distributed else {"no_dist": True}  # (an argument of newer torch only)
        response: Any = dcp.async_save(state, checkpoint_id=path, storage_writer=self._ckptio_writer,
                                       process_group=self._ckptio_group, **alone)
        future = getattr(response, "upload_completion", response)  # a Future, or in a response beside staging's
        handle = SaveHandle(os.fspath(path), "staged")
        handle.stall_seconds = time.perf_counter() - start

        def finish() -> SaveResult:
            future.result()  # every rank's files and .metadata are durable
            if metadata is not None:
                with committed_file(os.fspath(path / METADATA_FILENAME), site="meta") as f:
                    f.write(metadata)
            if self.memory:
                from ..dcp_replicas import keep_in_memory
                from ..service.client import keep_running

                keep_running()  # the service frees the tier once idle past CKPTIO_MEMORY_KEEP_S
                keep_in_memory(path, self.global_rank, self.memory, (METADATA_FILENAME,))  # type: ignore[attr-defined]
                if self._ckptio_replicas is not None:  # every rank's queue runs this job in the same order
                    self._ckptio_replicas.replicate(path)
            size = sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
            return SaveResult(os.fspath(path), size, time.perf_counter() - start, False)  # direct_io: not known

        return durable_if_signalled(queue.submit(handle, finish))


def _retire(path: Path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        return
    fsync_directory(os.fspath(path.parent), "meta.retire.directory")


def _is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / METADATA_FILENAME).is_file()


def load_metadata(path: Path, weights_only: Optional[bool]) -> dict[str, Any]:
    """meta.pt, CRC-verified (weights_only=None: torch's default, True)."""
    from .. import api

    return api.load(path / METADATA_FILENAME, weights_only=True if weights_only is None else weights_only)


def load_model_parallel(strategy: Any, path: Path, weights_only: Optional[bool]) -> dict[str, Any]:
    """ModelParallelStrategy's sharded load, through ckptio's StorageReader,
    into the module's and optimizers' own (sharded) tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    module = strategy.model
    readers = _Readers(strategy, path)
    module_state = {"state_dict": get_model_state_dict(module)}
    dcp.load(module_state, storage_reader=readers.new())
    module.load_state_dict(module_state["state_dict"], strict=strategy.lightning_module.strict_loading)
    for idx, optimizer in enumerate(strategy.optimizers):
        key = f"optimizer_{idx}"
        optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
        dcp.load(optimizer_state, storage_reader=readers.new())
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state[key],
                                 options=StateDictOptions(cpu_offload=True))
    readers.report()
    return load_metadata(path, weights_only)


class _Readers:
    """ckptio StorageReaders of a sharded checkpoint for one load, reading
    the memory tier's copies first where the strategy keeps some; report()
    sets strategy.last_loaded_tier."""

    def __init__(self, strategy: Any, path: Path) -> None:
        from ..dcp_replicas import memory_copies

        self.strategy, self.path = strategy, path
        self.from_partner = False
        if strategy.replicas:  # collective: a rank whose files are in no RAM of its node gets its partner's replica
            if strategy._ckptio_replicas is None:
                strategy._ckptio_replicas = strategy._ckptio_replica_link()
            self.from_partner = strategy._ckptio_replicas.restore(path)
        self.copies = memory_copies(path, strategy.world_size) if strategy.memory else {}
        self.made: list[Any] = []

    def new(self) -> Any:
        from ..distributed import StorageReader

        reader = StorageReader(self.path, memory_copies=self.copies)
        self.made.append(reader)
        return reader

    def report(self) -> None:
        from_disk = any(r.files_from_disk for r in self.made)
        from_memory = any(r.files_from_memory for r in self.made)
        in_memory = "partner" if self.from_partner else "memory"
        self.strategy.last_loaded_tier = in_memory if from_memory and not from_disk else "local"


def load_fsdp(strategy: Any, path: Path, weights_only: Optional[bool]) -> dict[str, Any]:
    """FSDPStrategy's (FSDP1) sharded load, as Lightning's, through ckptio's
    StorageReader. FSDP1 needs a GPU: written here, checked where one is lent."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
    from torch.distributed.fsdp import (
        FullyShardedDataParallel as FSDP,  # noqa: N817 - torch's own name for it
        ShardedOptimStateDictConfig,
        ShardedStateDictConfig,
        StateDictType,
    )

    model = strategy.model
    readers = _Readers(strategy, path)
    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(offload_to_cpu=True),
                              ShardedOptimStateDictConfig(offload_to_cpu=True)):  # as Lightning's own context
        module_state = {"model": model.state_dict()}
        dcp.load(module_state, storage_reader=readers.new())
        model.load_state_dict(module_state["model"], strict=strategy.lightning_module.strict_loading)
        if strategy.lightning_module.trainer.state.fn == "fit" and strategy.optimizers:
            for idx, optimizer in enumerate(strategy.optimizers):
                key = f"optimizer_{idx}"
                state = load_sharded_optimizer_state_dict(model_state_dict=module_state["model"], optimizer_key=key,
                                                          storage_reader=readers.new())
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(optim_state_dict=state[key], model=model,
                                                                        optim=optimizer))
    readers.report()
    return load_metadata(path, weights_only)
