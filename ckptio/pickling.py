"""Turn a Python object into the records of a torch.save archive.

torch's own ``torch.serialization._save`` does the pickling, so the pickle,
the storage keys and their order, and every dtype rule are exactly
torch.save's. It hands each record to a ``zip_file.write_record`` that we
provide; instead of writing, we collect (name, bytes or storage) pairs for the
engine, which writes them with 4096-byte alignment.
"""

from __future__ import annotations

import os
import pickle
import secrets
from dataclasses import dataclass, field

import torch
import torch.serialization

from .errors import CkptioError

__all__ = ["ALIGNMENT", "SavePlan", "archive_prefix", "plan_records"]

# Payload alignment: every payload starts on a page, so the engine can write
# it with O_DIRECT and mmap'd tensors are page aligned.
ALIGNMENT = 4096
_PICKLE_PROTOCOL = 2  # torch.load's weights-only unpickler accepts only protocol 2


@dataclass
class SavePlan:
    """Records in file order, and the objects that own their memory."""

    records: list = field(default_factory=list)  # [(name, bytes | (address, size))]
    keepalive: list = field(default_factory=list)
    storages: list = field(default_factory=list)  # [(name, UntypedStorage)] in record order
    total_bytes: int = 0


def archive_prefix(path: str) -> str:
    """The top-level directory torch.save uses inside the zip for `path`.

    torch.save names it after the file's basename without its last extension
    (caffe2/serialize/inline_container.cc ``basename``); a non-ASCII path goes
    through a Python file object, which gets "archive".
    """
    try:
        path.encode("ascii")
    except UnicodeEncodeError:
        return "archive"
    base = path.replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return stem or "archive"


class _RecordCollector:
    """The part of torch._C.PyTorchFileWriter that torch.serialization._save calls."""

    def __init__(self, prefix: str, plan: SavePlan):
        self._prefix = prefix
        self._plan = plan

    def write_record(self, name, data, nbytes):
        if name == ".storage_alignment":
            data = str(ALIGNMENT)  # the layout we really write, whatever torch's config says
        full = f"{self._prefix}/{name}"
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, (bytes, bytearray)):
            self._plan.records.append((full, bytes(data)))
            self._plan.total_bytes += len(data)
            return
        storage = data  # a CPU UntypedStorage: torch moved device storages already
        if storage.device.type != "cpu":
            storage = storage.cpu()
        self._plan.keepalive.append(storage)
        self._plan.storages.append((full, storage))
        self._plan.records.append((full, (storage.data_ptr(), int(nbytes))))
        self._plan.total_bytes += int(nbytes)

    def write_record_metadata(self, name, nbytes):
        raise CkptioError("ckptio.save does not support torch.serialization.skip_data()")


def plan_records(obj, path: str | os.PathLike) -> SavePlan:
    """Pickle `obj` as torch.save would and list the archive's records."""
    prefix = archive_prefix(os.fspath(path))
    plan = SavePlan()
    collector = _RecordCollector(prefix, plan)
    torch.serialization._save(obj, collector, pickle, _PICKLE_PROTOCOL, False)
    # What PyTorchStreamWriter::writeEndOfFile appends.
    for name, value in (("version", b"3\n"), (".data/serialization_id", _serialization_id())):
        plan.records.append((f"{prefix}/{name}", value))
        plan.total_bytes += len(value)
    return plan


def _serialization_id() -> bytes:
    # torch uses 40 decimal digits (a hash of names and CRCs, used only for
    # logging); random digits serve the same purpose.
    return "".join(str(secrets.randbelow(10)) for _ in range(40)).encode()
