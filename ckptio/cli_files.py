"""What a path given to the command line is, decided from its first bytes
before any reader touches it: a torch.save zip archive, a legacy (before
torch 1.6) torch.save file, or a DCP checkpoint directory. Anything else is
refused here with the reason in words, so a reader never has to guess later
whether its error meant "damaged" or "not a checkpoint at all"."""

from __future__ import annotations

import enum
import os
import re

from .cli_outcome import CliFailure, Exit, counted, os_error_message

__all__ = ["Kind", "checkpoint_kind", "is_dcp_directory", "dcp_metadata_files", "convert_hint"]

_ZIP_MAGIC = b"PK\x03\x04"
# torch's legacy format opens with a pickled magic number: PROTO n, then
# LONG1 0x1950a86a20f9469cfc6c (torch.serialization.MAGIC_NUMBER).
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_FRAME = 0x95  # pickle protocol 4+ may frame the stream first: FRAME + 8-byte length
# A DCP save without collectives (torch >= 2.9) writes one metadata file per rank.
_RANK_METADATA = re.compile(r"__(\d+)\.metadata")


def convert_hint(path: str) -> str:
    """What to do with a legacy file, which holds no checksums."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"`ckptio convert {path} {stem}-ckptio.pt` rewrites it with a CRC-32 on every record"


class Kind(enum.Enum):
    ZIP = "torch.save zip archive"
    LEGACY = "legacy torch.save file (before torch 1.6)"
    DCP = "DCP checkpoint directory"


def is_dcp_directory(path: str) -> bool:
    """A directory holding DCP's ``.metadata``, or the per-rank
    ``__<rank>.metadata`` files of a save without collectives (torch >= 2.9)."""
    return os.path.isdir(path) and bool(dcp_metadata_files(path))


def dcp_metadata_files(path: str) -> list[str]:
    """``[".metadata"]``, or the per-rank metadata files by rank; [] if none."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return [".metadata"]
    per_rank = [(int(m.group(1)), name) for name in _listing(path) if (m := _RANK_METADATA.fullmatch(name))]
    return [name for _, name in sorted(per_rank)]


def checkpoint_kind(path: str) -> Kind:
    """The kind of checkpoint at `path`; CliFailure(NOT_CHECKED) naming why
    it is none."""
    if os.path.isdir(path):
        if is_dcp_directory(path):
            return Kind.DCP
        if any(name.endswith(".distcp") for name in _listing(path)):
            raise CliFailure(Exit.NOT_CHECKED, "holds DCP rank files (.distcp) but no .metadata: not a complete DCP "
                                               "checkpoint (the coordinator writes .metadata last, once every rank's "
                                               "data is durable)")
        raise CliFailure(Exit.NOT_CHECKED, "is a directory, not a checkpoint file (a DCP checkpoint directory holds a "
                                           ".metadata file)")
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as e:
        raise CliFailure(Exit.NOT_CHECKED, os_error_message(e, path)) from e
    if head.startswith(_ZIP_MAGIC):
        return Kind.ZIP
    if _is_legacy(head):
        return Kind.LEGACY
    if not head:
        raise CliFailure(Exit.NOT_CHECKED, "is empty (0 bytes), not a checkpoint")
    size = os.path.getsize(path)
    raise CliFailure(Exit.NOT_CHECKED, "not a checkpoint: neither a torch.save zip archive nor a legacy torch.save "
                                       f"file ({counted(size, 'byte')})")


def _is_legacy(head: bytes) -> bool:
    if len(head) < 2 or head[0] != 0x80:  # PROTO
        return False
    body = head[2:]
    if body[:1] == bytes([_FRAME]):
        body = body[9:]
    return body.startswith(_LEGACY_MAGIC)


def _listing(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
