"""The CheckpointIO interface, with Lightning's method signatures.

Lightning's Trainer calls ``save_checkpoint(checkpoint, path,
storage_options=...)``, Fabric calls it with keywords, launchers without
storage_options; ``load_checkpoint(path, weights_only=...)``;
``remove_checkpoint(path)``; ``teardown()`` after every stage (and plugins
must keep working afterwards: ddp_spawn saves after teardown).
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from .registration import register_plugins, stands_for

if TYPE_CHECKING:
    from ..save_queue import SaveHandle

_PATH = Union[str, "os.PathLike[str]"]

__all__ = ["CheckpointIO", "SaveReport", "save_reports"]


@stands_for("CheckpointIO")
class CheckpointIO(ABC):
    """Saves, loads and removes checkpoints. Subclasses pick the backend.

    Creating any ckptio plugin registers the classes with the Lightning
    packages installed (see plugins.registration), so ``Trainer(plugins=[...])``
    accepts it whether the user imports ``lightning`` or ``pytorch_lightning``.
    """

    def __init__(self) -> None:
        register_plugins()

    @abstractmethod
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        """Write `checkpoint` to `path`; when this returns (sync backends) it is durable."""

    @abstractmethod
    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Read a checkpoint (to CPU by default, as Lightning's plugins do)."""

    @abstractmethod
    def remove_checkpoint(self, path: _PATH) -> None:
        """Delete a checkpoint; removing one that does not exist is not an error."""

    def teardown(self) -> None:  # noqa: B027 (an optional hook: a no-op unless overridden)
        """Flush: called at the end of every Trainer stage. The plugin stays usable."""

    # What async saves need from a backend (see AsyncCheckpointIO).
    def _async_save(self, checkpoint: dict[str, Any], path: str, storage_options: Optional[Any],
                    snapshot: Optional[str] = None) -> SaveHandle:
        raise NotImplementedError(f"{type(self).__name__} cannot save asynchronously")


def _reject_storage_options(plugin: object, storage_options: object) -> None:
    if storage_options is not None:
        raise TypeError(
            f"`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg is not supported "
            f"for `{type(plugin).__name__}`. Please implement your custom `CheckpointIO` to define how you'd "
            "like to use `storage_options`."
        )


def _to_cpu(storage: Any, location: str) -> Any:
    """Lightning's default map_location: everything to CPU."""
    return storage


@dataclass(frozen=True)
class SaveReport:
    """What one completed save cost: for logs and the Lightning metrics callback."""

    path: str
    stall_seconds: float   # how long the caller was blocked
    write_seconds: float   # from handing the bytes to the writer to durable (locally, with a remote tier)
    bytes: int
    remote_seconds: Optional[float] = None  # the copy to the remote tier, until committed (None: no copy)
    remote_error: Optional[str] = None      # why that copy failed

    @property
    def gbps(self) -> float:
        return self.bytes / 1e9 / self.write_seconds if self.write_seconds > 0 else 0.0


_REPORTS_KEPT = 1000
_reports: list[SaveReport] = []  # the newest _REPORTS_KEPT reports
_reports_total = 0   # reports ever recorded: a reader's cursor counts these
_reports_lock = threading.Lock()


def record_save(report: SaveReport) -> None:
    global _reports_total
    with _reports_lock:
        _reports.append(report)
        del _reports[:-_REPORTS_KEPT]
        _reports_total += 1


def save_reports(since: int = 0) -> tuple[list[SaveReport], int]:
    """(reports recorded after the first `since`, cursor for the next call).

    Each reader keeps its own cursor, so several can follow the same saves."""
    with _reports_lock:
        start = max(since, _reports_total - len(_reports))
        return _reports[len(_reports) - (_reports_total - start):], _reports_total
