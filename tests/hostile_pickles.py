"""Pickles that call nothing but write into objects a reader hands them:
BUILD (``__setstate__`` / ``__dict__`` update / attribute writes), SETITEM(S)
and APPEND(S) on every global an allowlist gives out. A reader that lets one
through may have changed that shared object for every later load in the
process. Assembled opcode by opcode (protocol 2, as torch.save writes).
"""

from __future__ import annotations

import io
import struct
import zipfile

import torch

# What each hostile write stores: a dtype, which every reader's allowlist
# names, so the write itself is the only thing a reader could refuse.
_VALUE = b"ctorch\nint32\n"


def global_op(qualified: str) -> bytes:
    module, _, name = qualified.rpartition(".")
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _writes(target: bytes) -> dict[str, bytes]:
    """Opcodes that leave `target` (already pushed) written into, on the stack."""
    key = text("dtype")
    return {
        "BUILD dict state": target + b"}" + key + _VALUE + b"sb",
        "BUILD slot state (setattr)": target + b"N}" + key + _VALUE + b"s\x86b",
        "BUILD __defaults__": target + b"N}" + text("__defaults__") + b"(" + _VALUE + b"ts\x86b",
        "SETITEM": target + key + _VALUE + b"s",
        "SETITEMS": target + b"(" + key + _VALUE + b"u",
        "APPEND": target + _VALUE + b"a",
        "APPENDS": target + b"(" + _VALUE + b"e",
        # the same object fetched back from the memo first
        "BUILD via the memo": target + b"q\x07h\x07}" + key + _VALUE + b"sb",
    }


def hostile_pickles(globals_: list[str]) -> dict[str, bytes]:
    """{description: pickle} writing into each global in `globals_`, the pickle's result the written-to object."""
    cases = {}
    for g in globals_:
        for op, body in _writes(global_op(g)).items():
            cases[f"{op} on {g}"] = b"\x80\x02" + body + b"."
    return cases


def hostile_pickles_on_made_objects() -> dict[str, bytes]:
    """Writes torch's weights-only unpickler refuses on objects the pickle made
    itself (BUILD on a dict, SETITEM on a list, APPEND on a dict)."""
    return {
        "BUILD on a dict": b"\x80\x02}}" + text("x") + _VALUE + b"sb.",
        "SETITEM on a list": b"\x80\x02](" + _VALUE + b"eJ\x00\x00\x00\x00" + _VALUE + b"s.",
        "APPEND on a dict": b"\x80\x02}" + _VALUE + b"a.",
        "BUILD on an OrderedDict's class": b"\x80\x02" + global_op("collections.OrderedDict") + b"}" + text("x")
        + _VALUE + b"sb.",
    }


def archive_with_pickle(path: str, data_pkl: bytes) -> None:
    """A torch.save archive of one float32 tensor whose data.pkl is replaced by
    `data_pkl` (every CRC valid: only the pickle is hostile)."""
    buf = io.BytesIO()
    torch.save(torch.arange(8, dtype=torch.float32), buf)
    with zipfile.ZipFile(buf) as z:
        records = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in records.items():
            z.writestr(name, data_pkl if name.endswith("/data.pkl") else data)


def archive_bytes_with_pickle(data_pkl: bytes) -> bytes:
    buf = io.BytesIO()
    archive_with_pickle(buf, data_pkl)  # type: ignore[arg-type]  # zipfile takes a file object too
    return buf.getvalue()
