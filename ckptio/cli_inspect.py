"""`ckptio inspect PATH`: the records, tensors and state of a torch.save
file (zip or legacy) or of a DCP checkpoint directory. Tables go to stdout;
if the checkpoint is not whole, one line on stderr says why and the exit code
says what (ckptio.cli_outcome)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._console import console as make_console, escape, table as make_table
from .cli_checks import check_legacy, check_zip
from .cli_dcp import DAMAGED, NO_CRC, OK, UNSAFE, DcpCheck, check_dcp
from .cli_files import Kind, checkpoint_kind, convert_hint
from .cli_outcome import CliFailure, Exit, counted, plain, unsafe_message

if TYPE_CHECKING:
    import torch

    from .archive import Archive

__all__ = ["cmd_inspect", "dcp_failure"]


def cmd_inspect(args: argparse.Namespace) -> int:
    path = args.path
    if "://" in path:
        raise CliFailure(Exit.UNSUPPORTED, "inspect reads local files and DCP directories; `ckptio verify URL` checks "
                                           "a remote checkpoint")
    kind = checkpoint_kind(path)
    out = make_console()
    if kind is Kind.DCP:
        return _inspect_dcp(path, out)
    if kind is Kind.LEGACY:
        return _inspect_legacy(path, out)
    return _inspect_zip(path, out)


# --- a torch.save zip archive -----------------------------------------------------

def _inspect_zip(path: str, out: Any) -> int:
    check = check_zip(path, every_record=True)
    arc = check.archive
    offsets = _data_offsets(path, arc)
    records = make_table(f"{escape(path)}: records")
    for col in ("record", "bytes", "offset", "alignment", "CRC-32", "CRC status"):
        records.add_column(col, justify="right" if col in ("bytes", "offset", "alignment") else "left")
    for name, r in arc.records.items():
        off = offsets.get(name)
        align = _alignment(off) if off is not None else "?"
        if name in check.bad_records:
            status = "[red]BAD[/red]"
        else:
            status = "unchecked (0)" if (r.crc == 0 and r.size) else "ok"
        records.add_row(escape(name), f"{r.size:,}", f"{off:,}" if off is not None else "?", str(align),
                        f"{r.crc:08x}", status)
    out.print(records)

    total = 0
    if check.pickle_bytes is None:
        out.print("tensors not listed: the pickle (data.pkl) is damaged")
    elif check.refused:
        out.print(f"tensors not listed: the pickle names {escape(', '.join(check.refused))}, which weights-only "
                  "loading refuses")
    else:
        total = _print_tensors(path, out)
    aligned = all(o % 4096 == 0 for n, o in offsets.items() if n.startswith("data/"))
    payload = sum(r.size for r in arc.records.values())
    out.print(f"{counted(len(arc.records), 'record')}, {counted(payload, 'payload byte')}"
              f", {counted(total, 'tensor byte')}, file {counted(arc.file_size, 'byte')}; "
              f"writer: {_writer_of(arc, aligned)}")
    if check.damage:
        raise CliFailure(Exit.DAMAGED, f"damaged: {check.damage}")
    if check.refused:
        raise CliFailure(Exit.UNSAFE, unsafe_message(check.refused))
    return Exit.OK


def _print_tensors(path: str, out: Any) -> int:
    """The tensors table (read on the "meta" device: no payload is read); their bytes."""
    import torch

    try:
        obj = torch.load(path, map_location="meta", weights_only=True)
    except Exception as e:  # noqa: BLE001 - intact records, a pickle torch cannot rebuild
        out.print(f"tensors not listed: torch.load cannot rebuild the pickle ({escape(plain(str(e), path))})")
        raise CliFailure(Exit.NOT_CHECKED, f"its records are intact but torch.load cannot rebuild its pickle: "
                                           f"{plain(str(e), path)}") from e
    return _tensor_table(obj, out)


def _tensor_table(obj: object, out: Any) -> int:
    tensors = make_table("tensors")
    for col in ("name", "dtype", "shape", "bytes"):
        tensors.add_column(col, justify="right" if col == "bytes" else "left")
    total = 0
    for name, t in _tensors(obj):
        nbytes = t.numel() * t.element_size()
        total += nbytes
        tensors.add_row(escape(name), str(t.dtype).replace("torch.", ""), str(tuple(t.shape)), f"{nbytes:,}")
    out.print(tensors)
    return total


def _writer_of(arc: Archive, offsets_aligned: bool) -> str:
    if offsets_aligned and arc.records.get(".storage_alignment") is not None:
        return "ckptio-compatible (4096-byte aligned payloads)"
    return "torch.save (or another zip writer)"


def _data_offsets(path: str, arc: Archive) -> dict[str, int]:
    """Where each record's payload starts (after its local header)."""
    out = {}
    with open(path, "rb") as f:
        for name, r in arc.records.items():
            f.seek(r.header_offset + 26)
            head = f.read(4)
            if len(head) == 4:
                name_and_extra = int.from_bytes(head[:2], "little") + int.from_bytes(head[2:], "little")
                out[name] = r.header_offset + 30 + name_and_extra
    return out


def _alignment(offset: int) -> int:
    a = 1
    while offset and offset % (a * 2) == 0 and a < 65536:
        a *= 2
    return a if offset else 65536


def _tensors(obj: object, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix or "<root>", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


# --- a legacy torch.save file -------------------------------------------------------

def _inspect_legacy(path: str, out: Any) -> int:
    out.print(f"{escape(path)}: {Kind.LEGACY.value}: one pickle stream, no records and no checksums")
    check = check_legacy(path)
    if check.refused:
        raise CliFailure(Exit.UNSAFE, unsafe_message(check.refused))
    if check.problem is not None:
        raise CliFailure(Exit.NOT_CHECKED, f"a legacy torch.save file that torch.load cannot read: {check.problem}")
    total = _tensor_table(check.obj, out)
    out.print(f"{counted(total, 'tensor byte')}, file {counted(os.path.getsize(path), 'byte')}. Its bytes cannot be "
              f"verified; {convert_hint(path)}.")
    return Exit.OK


# --- a DCP checkpoint directory ------------------------------------------------------

def _inspect_dcp(path: str, out: Any) -> int:
    check = check_dcp(path)
    files = make_table(f"{escape(path)}: DCP checkpoint, {counted(len(check.files), 'rank file')}")
    for col in ("file", "rank", "bytes", "items"):
        files.add_column(col, justify="left" if col == "file" else "right")
    for rel, (rank, size) in check.files.items():
        n = sum(1 for c in check.chunks() if c.file == rel)
        files.add_row(escape(rel), str(rank), "missing" if size is None else f"{size:,}", str(n))
    out.print(files)
    items = make_table("items")
    for col in ("item", "dtype", "shape", "file", "offset", "bytes", "CRC status"):
        items.add_column(col, justify="right" if col in ("offset", "bytes") else "left")
    for entry in check.entries:
        shape = str(entry.shape) if entry.shape is not None else ""
        for c in entry.chunks or []:
            status = c.state if not c.detail else f"{c.state}: {escape(c.detail)}"
            if c.state == DAMAGED:
                status = f"[red]BAD[/red]: {escape(c.detail)}"
            items.add_row(escape(entry.fqn), entry.dtype or entry.kind, shape, escape(c.file), f"{c.offset:,}",
                          f"{c.length:,}", status)
    out.print(items)
    chunks = check.chunks()
    out.print(f"{counted(len(check.entries), 'item')} in {counted(len(chunks), 'stored chunk')}, "
              f"{counted(sum(c.length for c in chunks), 'byte')}: {sum(c.state in (OK, NO_CRC) for c in chunks)} ok, "
              f"{len(check.with_state(DAMAGED))} damaged, {len(check.with_state(UNSAFE))} unsafe")
    failure = dcp_failure(check)
    if failure is not None:
        raise failure
    return Exit.OK


def dcp_failure(check: DcpCheck) -> CliFailure | None:
    """What is wrong with a checked DCP checkpoint, worst first; None if whole."""
    from .cli_dcp import UNCHECKED

    for state, code, word in ((DAMAGED, Exit.DAMAGED, "damaged"), (UNSAFE, Exit.UNSAFE, "unsafe"),
                              (UNCHECKED, Exit.UNSUPPORTED, "not checked")):
        found = check.with_state(state)
        if found:
            c = found[0]
            more = f" (and {counted(len(found) - 1, 'more item')})" if len(found) > 1 else ""
            return CliFailure(code, f"{word}: item {c.fqn!r} (rank {c.rank}, {c.file}): {c.detail}{more}")
    return None
