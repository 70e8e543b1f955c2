"""The checks behind `ckptio inspect` and `ckptio verify` for one file: its
structure, every record's CRC-32, and the globals its pickle names that
weights-only loading would refuse. They report what they found as data;
the commands decide how to show it."""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .cli_outcome import CliFailure, Exit, failure_from, plain

if TYPE_CHECKING:
    from .archive import Archive

__all__ = ["ZipCheck", "check_zip", "LegacyCheck", "check_legacy", "refused_globals", "unreadable_zip"]


@dataclass
class ZipCheck:
    archive: Archive
    bad_records: dict[str, str] = field(default_factory=dict)  # record -> what is wrong with it
    refused: list[str] = field(default_factory=list)  # globals weights-only loading refuses
    pickle_bytes: bytes | None = None  # data.pkl, when intact

    @property
    def damage(self) -> str | None:
        """The first damage found, in words; None when every CRC matches."""
        if not self.bad_records:
            return None
        name, what = next(iter(self.bad_records.items()))
        more = len(self.bad_records) - 1
        return what + (f" (and {more} more record{'s' if more > 1 else ''})" if more else "")


def check_zip(path: str, *, every_record: bool = False) -> ZipCheck:
    """Structure and CRC-32s of a torch.save zip archive. A broken structure
    raises CliFailure(DAMAGED); a zip that is no torch checkpoint raises
    CliFailure(NOT_CHECKED). With every_record, each record is checked on its
    own after a mismatch, so all damaged records are named (not just the first)."""
    from . import archive as A
    from .errors import CorruptCheckpointError

    try:
        arc = A.open_archive(path)
    except CorruptCheckpointError as e:
        raise unreadable_zip(path, e) from e
    check = ZipCheck(arc)
    try:
        A.RecordReader.of(arc, verify=True, keep=False).finish()
    except CorruptCheckpointError as e:
        check.bad_records[e.record or "?"] = plain(str(e), path)
        if every_record:
            for name, record in arc.records.items():
                if name != e.record:
                    try:
                        A.RecordReader(path, [(name, record)], verify=True, keep=False).finish()
                    except CorruptCheckpointError as each:
                        check.bad_records[name] = plain(str(each), path)
    if "data.pkl" not in check.bad_records:
        check.pickle_bytes = A.read_small_records(path, {0: arc}, verify=True)[0]["data.pkl"]
        check.refused = refused_globals(check.pickle_bytes)
    return check


def unreadable_zip(path: str, e: Exception) -> CliFailure:
    """What a zip archive that ckptio's reader rejected is: a damaged
    checkpoint (DAMAGED), or an intact zip that is no torch.save checkpoint:
    a TorchScript archive, compressed records (zipped by another tool), no
    data.pkl at all (UNSUPPORTED / NOT_CHECKED). A zip that Python's zipfile
    cannot open either counts as a damaged checkpoint."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return failure_from(e, path)
    names = [i.filename for i in infos]
    if any(n.endswith("/constants.pkl") for n in names):
        return CliFailure(Exit.UNSUPPORTED, "a TorchScript archive (torch.jit.save): load it with torch.jit.load; "
                                            "ckptio reads torch.save checkpoints")
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return CliFailure(Exit.NOT_CHECKED, "a zip archive, but not a torch.save checkpoint (it has no data.pkl "
                                            "record)")
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
        return CliFailure(Exit.UNSUPPORTED, "a zip archive with compressed records (torch.save stores them "
                                            "uncompressed: was it re-zipped by another tool?)")
    return failure_from(e, path)


def refused_globals(pickle_bytes: bytes) -> list[str]:
    """The globals a torch.save pickle names that torch's weights-only
    unpickler would refuse (torch.serialization.get_unsafe_globals_in_checkpoint,
    on the pickle alone); [] when it cannot be parsed (torch.load will say why)."""
    import torch.serialization  # noqa: F401 - registers torch's own safe globals
    from torch import _weights_only_unpickler as wo

    allowed = set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
    try:
        named = wo.get_globals_in_pkl(io.BytesIO(pickle_bytes))
    except Exception:  # noqa: BLE001 - a pickle the scan cannot follow: torch.load reports it
        return []
    return sorted(named - allowed)


@dataclass
class LegacyCheck:
    obj: Any = None  # what torch.load(map_location="meta", weights_only=True) built, tensors on "meta"
    refused: list[str] = field(default_factory=list)
    problem: str | None = None  # why it does not load


def check_legacy(path: str) -> LegacyCheck:
    """A legacy torch.save file holds no checksums: all that can be checked is
    that torch's weights-only unpickler reads it (tensors on "meta": no
    payload is read into memory)."""
    import torch

    from .errors import globals_refused_in

    try:
        return LegacyCheck(obj=torch.load(path, map_location="meta", weights_only=True))
    except pickle.UnpicklingError as e:
        refused = globals_refused_in(str(e))
        if refused:
            return LegacyCheck(refused=refused)
        return LegacyCheck(problem=_first_words(e, path))
    except OSError as e:
        raise failure_from(e, path) from e
    except Exception as e:  # noqa: BLE001 - torch's legacy reader on a damaged file: EOFError, RuntimeError, ...
        return LegacyCheck(problem=_first_words(e, path))


def _first_words(e: BaseException, path: str) -> str:
    return plain(str(e), path) or type(e).__name__
