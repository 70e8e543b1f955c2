"""ckptio's exception hierarchy.

Every error ckptio raises derives from :class:`CkptioError`, and also from the
builtin a caller would catch without knowing ckptio (``OSError``,
``FileNotFoundError``, ``ValueError``), so existing ``except`` clauses keep
working.
"""

from __future__ import annotations

import errno as _errno
import os
import pickle as _pickle
import re
from collections.abc import Iterable, Mapping

__all__ = [
    "CkptioError",
    "CheckpointIOError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "UnsupportedTransformError",
    "StateMismatchError",
    "ConfigError",
    "SaveCancelledError",
]


class CkptioError(Exception):
    """Base class of every error ckptio raises."""


class CheckpointIOError(CkptioError, OSError):
    """A system call failed while reading or writing a checkpoint.

    ``errno``, ``strerror`` and ``filename`` are set as on any ``OSError``.
    """


class CheckpointNotFoundError(CheckpointIOError, FileNotFoundError):
    """The checkpoint (or its directory) does not exist."""

    @classmethod
    def missing_checkpoint(cls, path: str) -> CheckpointNotFoundError:
        """The error for loading a checkpoint that is not there. Its text is
        Lightning's ("Checkpoint file not found: <path>"), which users and
        Lightning's own tests match."""
        return cls(_errno.ENOENT, f"Checkpoint file not found: {path}", path)

    def __str__(self) -> str:
        # A message that already names the path is shown as it is, without
        # OSError's "[Errno 2] ...: 'path'" decoration repeating it.
        if self.strerror and self.filename and str(self.filename) in self.strerror:
            return self.strerror
        return super().__str__()


class CorruptCheckpointError(CkptioError, ValueError):
    """The file is not an intact checkpoint. ``record`` names the damaged part."""

    def __init__(self, message: str, *, path: str | None = None, record: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.record = record
        self.written_keys: tuple[str, ...] = ()  # load_into: target key paths already written into


class StateMismatchError(CkptioError, RuntimeError):
    """load_into(strict=True): the checkpoint's tensors and the target's do not
    pair up. ``missing``: target key paths the checkpoint has no tensor for;
    ``unexpected``: checkpoint tensors the target has no place for;
    ``mismatched``: {key path: (checkpoint's shape/dtype, target's)}. Raised
    before anything is written into the target. (RuntimeError, like
    ``Module.load_state_dict(strict=True)``.)"""

    def __init__(self, path: str, *, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                 mismatched: Mapping[str, tuple[object, object]] | None = None) -> None:
        self.path = path
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = dict(mismatched or {})
        lines = [f"{path}: the checkpoint does not fit the target; nothing was written into it."]
        if self.missing:
            lines.append(f"  in the target but not in the checkpoint: {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  in the checkpoint but not in the target: {', '.join(self.unexpected)}")
        for key, (saved, target) in self.mismatched.items():
            lines.append(f"  {key}: the checkpoint has {saved}, the target {target}")
        lines.append("Pass strict=False to load what fits (the rest into fresh memory).")
        super().__init__("\n".join(lines))


class UnsafeCheckpointError(CorruptCheckpointError, _pickle.UnpicklingError):
    """A pickle in the checkpoint (``.metadata`` or a BYTES item) names a
    global that the weights-only reader does not allow. ``record`` names the
    item, ``refused`` the global(s)."""

    def __init__(self, message: str, *, path: str | None = None, record: str | None = None,
                 refused: Iterable[str] = ()) -> None:
        super().__init__(message, path=path, record=record)
        self.refused = tuple(refused)


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def globals_refused_in(message: str) -> list[str]:
    """The globals a refusal of torch's weights-only unpickler names."""
    return _UNSUPPORTED_GLOBAL.findall(message)


class UnsupportedTransformError(CkptioError, ValueError):
    """An item was written through a DCP stream transform (an ``_extensions``
    entry such as ZStandard) that this reader cannot apply."""


class ConfigError(CkptioError, ValueError):
    """A tuning environment variable has a value ckptio cannot use."""


class SaveCancelledError(CkptioError):
    """A save was cancelled (e.g. by Ctrl-C) before it committed; nothing was written."""


# Codes of ckptio::Status::Code in csrc/engine/status.h.
_IO_ERROR, _NOT_FOUND, _CORRUPT, _INVALID_ARGUMENT, _CANCELLED = 1, 2, 3, 4, 5


def from_engine_status(code: int, err: int, path: str, record: str, message: str) -> Exception:
    """Turn an engine Status into the matching exception (called by ckptio._C)."""
    if code == _CORRUPT:
        where = f" in record '{record}'" if record else ""
        return CorruptCheckpointError(f"{path}: {message}{where}", path=path, record=record or None)
    if code in (_IO_ERROR, _NOT_FOUND):
        err = err or _errno.EIO
        cls = CheckpointNotFoundError if err == _errno.ENOENT else CheckpointIOError
        return cls(err, f"{message} [{os.strerror(err)}]", path)
    if code == _CANCELLED:
        return SaveCancelledError(f"{path}: cancelled before it completed; nothing was written")
    return CkptioError(f"{path}: {message}" if path else message)
