"""Lightning integration: its Trainer and Fabric accept ckptio's plugins.

Lightning checks plugins with ``isinstance(plugin, CheckpointIO)`` against
its own class, and ``lightning`` and ``pytorch_lightning`` are two separate
class hierarchies that reject each other's plugins. ckptio's classes are
registered as virtual subclasses (``ABCMeta.register``) of the CheckpointIO
(and XLACheckpointIO, with AsyncCheckpointIO over an XLA plugin) of every
Lightning package installed (ckptio.plugins.registration, re-exported here),
so one ckptio plugin works with whichever the user imports. Lightning stays
optional: nothing runs unless a ckptio plugin is created.

``CheckpointMetrics`` (a Callback, for either package) logs every async
save's stall, time to durable and throughput to the Trainer's loggers.

``ModelParallelStrategy`` and ``FSDPStrategy`` (Lightning's, of either
package) write their sharded checkpoints with ckptio: asynchronously,
durably, read back in place (ckptio.plugins.sharded).

``DDPStrategy`` (Lightning's, of either package) with ``replicas=1`` keeps
rank 0's checkpoints (written by ckptio's AsyncCheckpointIO with a memory
tier) in its partner rank's node's RAM too (ckptio.plugins.replicated).

``ResumeInPlace`` (a Callback, for either package) makes a resume
(``trainer.fit(..., ckpt_path=...)``) read the model's tensors straight into
the LightningModule's own parameters and buffers (``ckptio.load_into``)
instead of into fresh memory that ``load_state_dict`` then copies from.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any, Callable, Optional

from .plugins.registration import _FABRIC_IO_MODULES, register_plugins, registered_namespaces

if TYPE_CHECKING:
    from .plugins.fast_io import FastCheckpointIO

__all__ = ["register_plugins", "registered_namespaces", "CheckpointMetrics", "ResumeInPlace", "ModelParallelStrategy",
           "FSDPStrategy", "DDPStrategy"]


def _callback_class(top: str) -> type:
    callbacks = importlib.import_module(
        f"{'lightning.pytorch' if top == 'lightning' else 'pytorch_lightning'}.callbacks")
    callback: Any = callbacks.Callback  # whichever package's: known only at run time

    class _CheckpointMetrics(callback):
        """Logs ckpt/stall_s, ckpt/write_s (local durable), ckpt/GBps, and with a
        remote tier ckpt/remote_s and ckpt/remote_ok, for every completed ckptio save."""

        _cursor: Optional[int] = None

        def _log(self, trainer: Any) -> None:
            from .plugins.checkpoint_io import save_reports

            reports, self._cursor = save_reports(self._cursor if self._cursor is not None else 0)
            for report in reports:
                metrics = {"ckpt/stall_s": report.stall_seconds, "ckpt/write_s": report.write_seconds,
                           "ckpt/GBps": report.gbps, "ckpt/bytes": float(report.bytes)}
                if report.remote_seconds is not None:  # a copy to the remote tier was made (or tried)
                    metrics["ckpt/remote_s"] = report.remote_seconds
                    metrics["ckpt/remote_ok"] = float(report.remote_error is None)
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)

        def on_fit_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            if self._cursor is None:  # only saves made from now on
                from .plugins.checkpoint_io import save_reports

                self._cursor = save_reports()[1]

        def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            self._log(trainer)

        def on_validation_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            self._log(trainer)

        def on_fit_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            self._log(trainer)

    _CheckpointMetrics.__name__ = _CheckpointMetrics.__qualname__ = "CheckpointMetrics"
    return _CheckpointMetrics


def CheckpointMetrics(namespace: str = "lightning") -> Any:
    """A Callback (for ``lightning`` or ``pytorch_lightning``) that logs ckptio save metrics."""
    if namespace not in _FABRIC_IO_MODULES:
        raise ValueError(f"namespace must be one of {sorted(_FABRIC_IO_MODULES)}, not {namespace!r}")
    return _callback_class(namespace)()


def _resume_in_place_class(top: str) -> type:
    callbacks = importlib.import_module(
        f"{'lightning.pytorch' if top == 'lightning' else 'pytorch_lightning'}.callbacks")
    callback: Any = callbacks.Callback  # whichever package's: known only at run time

    class _ResumeInPlace(callback):
        """Points the Trainer's ckptio plugin at the module's state_dict, so a
        resume reads the checkpoint's "state_dict" into it. Lightning's
        load_state_dict then finds each tensor already in place (copy_ of a
        tensor onto its own memory returns at once). Optimizer states and
        everything else load into fresh memory as before."""

        def setup(self, trainer: Any, pl_module: Any, stage: Optional[str] = None) -> None:
            plugin = _fast_plugin_of(trainer.strategy)
            if plugin is None:
                import warnings

                warnings.warn("ckptio.lightning.ResumeInPlace does nothing here: the Trainer's checkpoint_io is not "
                              "ckptio's FastCheckpointIO (or an AsyncCheckpointIO over it)", stacklevel=2)
                return
            plugin.load_target = lambda: {"state_dict": pl_module.state_dict()}

        def teardown(self, trainer: Any, pl_module: Any, stage: Optional[str] = None) -> None:
            plugin = _fast_plugin_of(trainer.strategy)
            if plugin is not None:
                plugin.load_target = None

    _ResumeInPlace.__name__ = _ResumeInPlace.__qualname__ = "ResumeInPlace"
    return _ResumeInPlace


def _fast_plugin_of(strategy: Any) -> Optional[FastCheckpointIO]:
    from .plugins import FastCheckpointIO

    io = strategy.checkpoint_io
    io = getattr(io, "checkpoint_io", io)  # ckptio's AsyncCheckpointIO wraps one
    return io if isinstance(io, FastCheckpointIO) else None


def ResumeInPlace(namespace: str = "lightning") -> Any:
    """A Callback (for ``lightning`` or ``pytorch_lightning``): resumes read
    the model's tensors straight into the LightningModule (ckptio.load_into)."""
    if namespace not in _FABRIC_IO_MODULES:
        raise ValueError(f"namespace must be one of {sorted(_FABRIC_IO_MODULES)}, not {namespace!r}")
    return _resume_in_place_class(namespace)()


@functools.cache
def _sharded_strategy_class(top: str, name: str) -> type:
    from .plugins.sharded import ShardedCheckpoints, load_fsdp, load_model_parallel

    strategies = importlib.import_module(f"{'lightning.pytorch' if top == 'lightning' else 'pytorch_lightning'}"
                                         ".strategies")
    base: Any = getattr(strategies, name)  # whichever package's: known only at run time

    if name == "ModelParallelStrategy":
        class _Strategy(ShardedCheckpoints, base):
            def _ckptio_saves_sharded(self) -> bool:
                return bool(self._save_distributed_checkpoint)

            def _ckptio_load_sharded(self, path: Any, weights_only: Optional[bool]) -> dict[str, Any]:
                return load_model_parallel(self, path, weights_only)
    else:
        class _Strategy(ShardedCheckpoints, base):  # type: ignore[no-redef]
            _ckptio_model_key = "model"

            def _ckptio_saves_sharded(self) -> bool:
                return self._state_dict_type == "sharded"

            def _ckptio_load_sharded(self, path: Any, weights_only: Optional[bool]) -> dict[str, Any]:
                return load_fsdp(self, path, weights_only)

    _Strategy.__name__ = _Strategy.__qualname__ = name
    _Strategy.__doc__ = f"Lightning's {name}, its sharded checkpoints written and read by ckptio (see " \
                        "ckptio.plugins.sharded)."
    return _Strategy


def ModelParallelStrategy(*args: Any, namespace: str = "lightning", memory: int = 0, replicas: int = 0,
                          partner: Optional[Callable[[int, int], int]] = None, **kwargs: Any) -> Any:
    """Lightning's ModelParallelStrategy (of ``lightning`` or
    ``pytorch_lightning``, as `namespace` says; same arguments) whose sharded
    checkpoints ckptio saves asynchronously and durably and loads in place,
    CRC-verified (ckptio.plugins.sharded). `memory`: also keep each rank's
    files of the `memory` newest checkpoints of a directory in the checkpoint
    service's memory tier (RAM that outlives the trainer); a resume reads them
    from there (``strategy.last_loaded_tier``). `replicas=1` (with memory):
    each rank's files also go to its partner rank's memory tier, on another
    node (`partner`: see ckptio.partner_link); a rank whose node lost them
    resumes from the partner's ("partner")."""
    return _make_sharded_strategy("ModelParallelStrategy", namespace, memory, replicas, partner, args, kwargs)


def FSDPStrategy(*args: Any, namespace: str = "lightning", memory: int = 0, replicas: int = 0,
                 partner: Optional[Callable[[int, int], int]] = None, **kwargs: Any) -> Any:
    """Lightning's FSDPStrategy (same arguments) whose sharded checkpoints
    (``state_dict_type="sharded"``) ckptio saves and loads, as
    ModelParallelStrategy's. FSDP needs a GPU."""
    return _make_sharded_strategy("FSDPStrategy", namespace, memory, replicas, partner, args, kwargs)


def _make_sharded_strategy(name: str, namespace: str, memory: int, replicas: int,
                           partner: Optional[Callable[[int, int], int]], args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> Any:
    if namespace not in _FABRIC_IO_MODULES:
        raise ValueError(f"namespace must be one of {sorted(_FABRIC_IO_MODULES)}, not {namespace!r}")
    if not isinstance(memory, int) or isinstance(memory, bool) or memory < 0:
        raise ValueError(f"memory must be an int >= 0 (checkpoints kept in RAM), not {memory!r}")
    if replicas not in (0, 1) or isinstance(replicas, bool):
        raise ValueError(f"replicas must be 0 or 1 (a partner rank's copy), not {replicas!r}")
    if replicas and not memory:
        raise ValueError("replicas=1 needs memory >= 1: replicas live in the memory tier, beside its own copies")
    if replicas:
        from .config import replica_config

        replica_config()  # a bad CKPTIO_REPLICA_TIMEOUT_S is named here, not at the first save
    strategy = _sharded_strategy_class(namespace, name)(*args, **kwargs)
    strategy.memory, strategy.replicas, strategy.partner = memory, replicas, partner
    return strategy


@functools.cache
def _replicated_strategy_class(top: str) -> type:
    from .plugins.replicated import ReplicatedCheckpoints

    strategies = importlib.import_module(f"{'lightning.pytorch' if top == 'lightning' else 'pytorch_lightning'}"
                                         ".strategies")

    class _Strategy(ReplicatedCheckpoints, strategies.DDPStrategy):  # type: ignore[name-defined]
        pass

    _Strategy.__name__ = _Strategy.__qualname__ = "DDPStrategy"
    _Strategy.__doc__ = "Lightning's DDPStrategy, rank 0's checkpoints replicated to a partner node's memory tier " \
                        "(see ckptio.plugins.replicated)."
    return _Strategy


def DDPStrategy(*args: Any, namespace: str = "lightning", replicas: int = 1,
                partner: Optional[Callable[[int, int], int]] = None, **kwargs: Any) -> Any:
    """Lightning's DDPStrategy (same arguments) whose rank-0 checkpoints,
    written by ckptio's AsyncCheckpointIO with ``memory >= 1`` (the
    Trainer's plugin), also go to rank 0's partner rank's node's memory tier
    (`partner`: see ckptio.partner_link); a restart after the loss of rank
    0's node reads them from there (``strategy.last_loaded_tier`` says
    "partner" where a rank received it)."""
    if namespace not in _FABRIC_IO_MODULES:
        raise ValueError(f"namespace must be one of {sorted(_FABRIC_IO_MODULES)}, not {namespace!r}")
    if replicas not in (0, 1) or isinstance(replicas, bool):
        raise ValueError(f"replicas must be 0 or 1 (a partner rank's copy), not {replicas!r}")
    if replicas:
        from .config import replica_config

        replica_config()  # a bad CKPTIO_REPLICA_TIMEOUT_S is named here, not at the first save
    strategy = _replicated_strategy_class(namespace)(*args, **kwargs)
    strategy.replicas, strategy.partner = replicas, partner
    return strategy
