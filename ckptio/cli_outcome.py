"""What a `ckptio` command tells the shell: its exit codes, and the one plain
line it prints on stderr when something is wrong.

Every failure becomes a :class:`CliFailure` (an exit code and a one-line
message) in exactly one place, :func:`failure_from`, so the same cause always
gets the same code whatever command met it. Scripts rely on the codes:

====  ==============  =========================================================
code  name            meaning
====  ==============  =========================================================
0     OK              done; ``verify``: every checkpoint is whole
1     DAMAGED         a checkpoint is damaged: a CRC-32 mismatch, or a
                      checkpoint's structure is broken (truncated, a record
                      out of place, a DCP rank file missing)
2     NOT_CHECKED     bad input, nothing could be checked or done: a missing
                      path, a directory, an unreadable file, not a checkpoint,
                      a legacy file (no checksums to verify), a bad argument,
                      a destination that cannot be written, an unreachable
                      remote tier
3     BAD_SETTING     a ``CKPTIO_*`` environment variable has a value ckptio
                      cannot use
4     UNSAFE          a pickle in the checkpoint names a global that
                      weights-only loading refuses
5     UNSUPPORTED     valid input this command cannot handle: what safetensors
                      cannot hold, a missing optional package, an unknown DCP
                      stream transform, a TorchScript archive, a re-zipped
                      (compressed) archive
70    INTERNAL        a bug in ckptio (rerun with --debug and report it)
130   INTERRUPTED     Ctrl-C
141   STDOUT_CLOSED   the reader of stdout went away (``| head``); nothing on
                      stderr
====  ==============  =========================================================

Only 1 ever means damaged: a script may delete or restore checkpoints on 1 and
must treat any other non-zero code as "not checked".
"""

from __future__ import annotations

import enum
import errno as _errno
import os
import re

__all__ = ["Exit", "CliFailure", "failure_from", "plain", "counted", "EXIT_CODES_HELP"]


class Exit(enum.IntEnum):
    OK = 0
    DAMAGED = 1
    NOT_CHECKED = 2
    BAD_SETTING = 3
    UNSAFE = 4
    UNSUPPORTED = 5
    INTERNAL = 70
    INTERRUPTED = 130
    STDOUT_CLOSED = 141  # as a shell reports a command ended by SIGPIPE


# The table --help shows (argparse's epilog); docs/cli.md holds the same.
EXIT_CODES_HELP = """exit codes:
  0    ok (verify: every checkpoint whole)
  1    damaged: a CRC-32 mismatch or broken structure (the only code that means damaged)
  2    not checked / bad input: missing, a directory, unreadable, not a checkpoint,
       a legacy file (no checksums), a bad argument, an unwritable destination,
       an unreachable remote
  3    bad setting: a CKPTIO_* environment variable ckptio cannot use
  4    unsafe: a pickle names a global that weights-only loading refuses
  5    unsupported: what safetensors cannot hold, a missing optional package,
       an unknown DCP stream transform, a TorchScript archive
  70   internal error (a bug: rerun with --debug and report it)
  130  interrupted
  141  stdout closed early (| head)
On failure exactly one line goes to stderr; --debug adds the traceback."""


class CliFailure(Exception):
    """A command's failure as the shell sees it: an exit code and one line.
    `path`: what the line names ("" for nothing; None: the path the command
    was given)."""

    def __init__(self, code: Exit, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.path = path


def failure_from(exc: BaseException, path: str | None = None) -> CliFailure:
    """The exit code and plain one-line message for any exception a command
    met while working on `path` (None: no particular path)."""
    from .errors import (
        CkptioError,
        ConfigError,
        CorruptCheckpointError,
        SaveCancelledError,
        UnsafeCheckpointError,
        UnsupportedTransformError,
    )

    if isinstance(exc, CliFailure):
        return exc
    if isinstance(exc, (KeyboardInterrupt, SaveCancelledError)):
        return CliFailure(Exit.INTERRUPTED, "interrupted; nothing was written")
    if isinstance(exc, ConfigError):
        return CliFailure(Exit.BAD_SETTING, f"bad setting: {plain(str(exc), path)}")
    if isinstance(exc, UnsafeCheckpointError):
        return CliFailure(Exit.UNSAFE, unsafe_message(exc.refused, str(exc)))
    if isinstance(exc, UnsupportedTransformError):
        return CliFailure(Exit.UNSUPPORTED, plain(str(exc), path))
    if isinstance(exc, CorruptCheckpointError):
        return CliFailure(Exit.DAMAGED, f"damaged: {plain(str(exc), path)}")
    if isinstance(exc, OSError):  # CheckpointIOError included
        return CliFailure(Exit.NOT_CHECKED, os_error_message(exc, path))
    if isinstance(exc, ImportError) and exc.name:
        return CliFailure(Exit.UNSUPPORTED, f"needs the Python package {exc.name!r}, which is not installed "
                                            f"(pip install {exc.name.split('.')[0]})")
    if isinstance(exc, CkptioError):  # what ckptio does not read, e.g. a TorchScript archive
        return CliFailure(Exit.UNSUPPORTED, plain(str(exc), path))
    return CliFailure(Exit.INTERNAL, f"internal error: {type(exc).__name__}: {plain(str(exc), path)} "
                                     "(a bug in ckptio: rerun with --debug and report the traceback)")


def unsafe_message(refused: tuple[str, ...] | list[str], text: str = "",
                   hint: str = "load it only if you trust the file") -> str:
    """A weights-only refusal in one line, naming the globals."""
    from .errors import globals_refused_in

    names = list(refused) or globals_refused_in(text)
    what = ", ".join(names) if names else "a global"
    return f"unsafe: its pickle names {what}, which weights-only loading refuses ({hint})"


_OS_WORDS = {
    _errno.ENOENT: "no such file or directory",
    _errno.EISDIR: "is a directory, not a checkpoint file",
    _errno.EACCES: "permission denied",
    _errno.ENOTDIR: "a part of the path is not a directory",
    _errno.ENOSPC: "no space left on the device",
    _errno.EROFS: "the file system is read-only",
}


def os_error_message(exc: OSError, path: str | None) -> str:
    """An OSError in words, without "[Errno N]" or the strerror said twice:
    ckptio's own text when it wrote one (it says more), else the errno's."""
    from .errors import CkptioError

    if isinstance(exc, CkptioError) and exc.strerror:
        words = plain(exc.strerror, path)
    else:
        words = _OS_WORDS.get(exc.errno or 0) or plain(exc.strerror or str(exc), path)
    where = exc.filename if exc.filename is not None else None
    if where is not None and os.fspath(where) != path:
        return f"{os.fspath(where)}: {words}"
    return words


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The zip format's own names for its parts, which mean nothing to most readers.
_JARGON = (
    ("not a checkpoint: no zip end-of-directory record (truncated or not a zip file)",
     "the file's end is missing: it is truncated (or not a zip archive)"),
    ("zip64 end of central directory", "the file's end record"),
    ("zip64 locator", "the file's end record"),
    ("end of central directory", "the file's end"),
    ("end-of-directory record", "end record"),
    ("central directory", "the file's directory"),
    ("zip local header", "record header"),
)


def plain(text: str, path: str | None = None) -> str:
    """One line of plain words from a library message: no ANSI codes, no
    line breaks, the path not repeated (the caller names it once), no zip
    jargon, "1 byte" not "1 bytes", an errno text said once."""
    text = " ".join(_ANSI.sub("", text).split())
    if path:
        for p in {path, os.path.abspath(path)}:
            while text.startswith(f"{p}: "):
                text = text[len(p) + 2:]
    # "in record 'end of central directory'": the message already says where.
    text = re.sub(r" in record '(zip64 )?(end of )?central directory'", "", text)
    text = re.sub(r" in record '(zip64 locator|archive)'", "", text)
    for jargon, words in _JARGON:
        text = text.replace(jargon, words)
    text = re.sub(r"\b1 bytes\b", "1 byte", text)
    text = re.sub(r"(\b[\w ,']+?) \[\1\]", r"\1", text)  # "No such file [No such file]"
    text = re.sub(r"^\[Errno \d+\] ", "", text)
    return text


def counted(n: int, noun: str) -> str:
    """"1 byte", "4,096 bytes"."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"
