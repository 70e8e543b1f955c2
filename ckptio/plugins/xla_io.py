"""XLACheckpointIO: checkpoints of torch_xla tensors (TPU, or the CPU device
with PJRT_DEVICE=CPU), written by ckptio's engine from the master ordinal."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional

from .._paths import make_parent_directories, normalize_path
from .checkpoint_io import _PATH, CheckpointIO, _reject_storage_options, _to_cpu

if TYPE_CHECKING:
    from ..save_queue import SaveHandle
from .registration import stands_for

__all__ = ["XLACheckpointIO", "to_host"]

_INSTALL_HINT = (
    "XLACheckpointIO needs torch_xla: pip install 'ckptio[xla]' (torch_xla must match your torch "
    "version exactly, e.g. torch==2.9.0 with torch_xla==2.9.0)"
)


def _xla() -> tuple[ModuleType, ModuleType]:
    try:
        import torch_xla
        import torch_xla.core.xla_model as xm
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return torch_xla, xm


def to_host(checkpoint: Any, writer: bool) -> Any:
    """Flush pending XLA computations (every ordinal: they may hold
    collectives) and, on the writer, copy every XLA tensor to the CPU in one
    batched transfer, as xm.save does. The copies are ours: a snapshot."""
    torch_xla, xm = _xla()
    torch_xla.sync()
    return xm._maybe_convert_to_cpu(checkpoint, convert=writer)


@stands_for("XLACheckpointIO")
class XLACheckpointIO(CheckpointIO):
    """Like Lightning's XLACheckpointIO (xm.save): pending XLA work is flushed,
    tensors come to the host in one batched transfer, and only the master
    ordinal writes, but through ckptio's engine and durable commit, and
    asynchronously under AsyncCheckpointIO. Loads map to CPU."""

    def __init__(self) -> None:
        super().__init__()
        _xla()

    def _is_writer(self) -> bool:
        _, xm = _xla()
        return xm.is_master_ordinal(local=False)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        from .. import api
        from ..save_queue import get_queue

        _reject_storage_options(self, storage_options)
        path = normalize_path(path)
        writer = self._is_writer()
        host = to_host(checkpoint, writer)
        if writer:  # like xm.save, no barrier: Lightning's XLA strategies add their own
            get_queue().wait_path(path)
            make_parent_directories(path)
            api.save(host, path)

    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        from .. import api

        return api.load(normalize_path(path), map_location=map_location if map_location is not None else _to_cpu,
                        weights_only=weights_only)

    def remove_checkpoint(self, path: _PATH) -> None:
        from ..save_queue import get_queue
        from .fast_io import _remove

        path = normalize_path(path)
        if self._is_writer():
            get_queue().wait_path(path)
            _remove(path)

    def _async_save(self, checkpoint: dict[str, Any], path: str, storage_options: Optional[Any],
                    snapshot: Optional[str] = None) -> SaveHandle:
        from ..background import NativeWrite, stage, write_native

        _reject_storage_options(self, storage_options)
        writer = self._is_writer()
        host = to_host(checkpoint, writer)  # XLA tensors now CPU tensors we own
        if not writer:
            from ..save_queue import SaveHandle

            handle = SaveHandle(path, "skipped")  # not the master ordinal: nothing to write
            handle._finish(None, None)
            return handle
        make_parent_directories(path)
        # The host copies are ours alone: a lazy snapshot finds nothing to leave for later.
        return stage(host, path, lambda staged: write_native(staged, path), snapshot=snapshot, native=NativeWrite())
