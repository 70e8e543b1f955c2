"""The ckptio command line: inspect, verify, convert, bench.

    ckptio inspect PATH            records and tensors of any torch.save file
    ckptio verify PATH...          every CRC and structure; exit 0 only if all intact
    ckptio convert SRC DST         torch.save / safetensors -> ckptio's aligned, checksummed layout
    ckptio list DIR [--remote URL] a CheckpointManager's checkpoints per tier: whole / damaged / remote-only
    ckptio bench [--dir D] [--size 1GiB] [--json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .archive import Archive

__all__ = ["main"]


def _console() -> Any:
    from ._console import console

    return console()


# --- inspect -------------------------------------------------------------------

def _writer_of(arc: Archive, offsets_aligned: bool) -> str:
    align = arc.records.get(".storage_alignment")
    if offsets_aligned and align is not None:
        return "ckptio-compatible (4096-byte aligned payloads)"
    return "torch.save (or another zip writer)"


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from . import archive as A
    from ._console import table as Table
    from .errors import CkptioError

    console = _console()
    path = args.path
    try:
        arc = A.open_archive(path)
    except (CkptioError, OSError) as e:
        console.print(f"[red]{path}: {e}[/red]")
        return 2
    crc_ok: dict[str, bool] = {}
    try:
        A.RecordReader.of(arc, verify=True, keep=False).finish()
        crc_ok = {name: True for name in arc.records}
    except CkptioError as e:
        bad = getattr(e, "record", None)
        crc_ok = {name: (name != bad) for name in arc.records}
        console.print(f"[red]damaged: {e}[/red]")
    offsets = _data_offsets(path, arc)

    records = Table(f"{path}: records")
    for col in ("record", "bytes", "offset", "alignment", "CRC-32", "CRC status"):
        records.add_column(col, justify="right" if col in ("bytes", "offset", "alignment") else "left")
    for name, r in arc.records.items():
        off = offsets.get(name)
        align = _alignment(off) if off is not None else "?"
        status = "unchecked (0)" if (r.crc == 0 and r.size) else ("ok" if crc_ok.get(name) else "[red]BAD[/red]")
        records.add_row(name, f"{r.size:,}", f"{off:,}" if off is not None else "?", str(align), f"{r.crc:08x}", status)
    console.print(records)

    tensors = Table("tensors")
    for col in ("name", "dtype", "shape", "bytes"):
        tensors.add_column(col, justify="right" if col == "bytes" else "left")
    total = 0
    try:
        obj = torch.load(path, map_location="meta", weights_only=True)
        for name, t in _tensors(obj):
            nbytes = t.numel() * t.element_size()
            total += nbytes
            tensors.add_row(name, str(t.dtype).replace("torch.", ""), str(tuple(t.shape)), f"{nbytes:,}")
        console.print(tensors)
    except Exception as e:  # a pickle outside weights_only's allowlist: records are still shown
        console.print(f"(tensors not listed: {type(e).__name__}: {str(e).splitlines()[0][:200]})")
    aligned = all(o % 4096 == 0 for n, o in offsets.items() if n.startswith("data/"))
    console.print(f"{len(arc.records)} records, {sum(r.size for r in arc.records.values()):,} payload bytes, "
                  f"{total:,} tensor bytes, file {arc.file_size:,} bytes; writer: {_writer_of(arc, aligned)}")
    return 0 if all(crc_ok.values()) else 1


def _data_offsets(path: str, arc: Archive) -> dict[str, int]:
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


# --- verify --------------------------------------------------------------------

def cmd_verify(args: argparse.Namespace) -> int:
    from . import api
    from .errors import CkptioError

    failed = 0
    for path in args.paths:  # one line per file, never wrapped: scripts parse it
        try:
            r = api.verify(path)
            print(f"OK       {path}  ({r.records} records, {r.bytes:,} bytes)", flush=True)
        except (CkptioError, OSError) as e:
            failed += 1
            print(f"DAMAGED  {path}  {' '.join(str(e).split())}", flush=True)
    return 1 if failed else 0


# --- list ------------------------------------------------------------------------

def cmd_list(args: argparse.Namespace) -> int:
    import os

    from .manager import CheckpointManager

    if not os.path.isdir(args.directory) and args.remote is None:
        print(f"ckptio list: {args.directory}: no such directory", file=sys.stderr)
        return 2
    manager = CheckpointManager(args.directory, keep_last=None, remote=args.remote, prefix=args.prefix,
                                suffix=args.suffix)
    rows = manager.inventory()
    print(f"{'step':>10}  {'local':<8}  {'remote':<11}  note")  # plain columns: scripts parse it
    for step, local, remote in rows:
        note = "remote-only" if local is None else ("local-only" if remote is None and args.remote else "")
        print(f"{step:>10}  {local or '-':<8}  {remote or '-':<11}  {note}".rstrip(), flush=True)
    return 0 if any("whole" in (local, remote) for _, local, remote in rows) else 1


# --- convert -------------------------------------------------------------------

def cmd_convert(args: argparse.Namespace) -> int:
    from . import api

    console = _console()
    src = args.src
    if src.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SystemExit("converting a .safetensors file needs safetensors: pip install 'ckptio[cli]'") from None

        obj = load_file(src)
    else:
        obj = api.load(src, weights_only=not args.unsafe, verify=True)
    result = api.save(obj, args.dst)
    console.print(f"wrote {args.dst}: {result.bytes:,} bytes, 4096-aligned, CRC-32 on every record "
                  f"(O_DIRECT: {result.direct_io})")
    return 0


# --- bench ---------------------------------------------------------------------

def _parse_size(text: str) -> int:
    units = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in units:
        raise argparse.ArgumentTypeError(f"size {text!r}: use e.g. 512MiB or 1GiB")
    return int(float(num) * units[unit])


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args, _console())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ckptio", description="PyTorch checkpoints at the speed of the disk.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="records and tensors of a checkpoint, with CRC status")
    p.add_argument("path")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("verify", help="check every CRC and the structure; exit 0 only if all intact")
    p.add_argument("paths", nargs="+")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("list", help="a CheckpointManager directory's checkpoints per tier, with their state")
    p.add_argument("directory")
    p.add_argument("--remote", default=None, help="the manager's remote tier (an fsspec URL prefix)")
    p.add_argument("--prefix", default="step_")
    p.add_argument("--suffix", default=".pt")
    p.set_defaults(fn=cmd_list)
    p = sub.add_parser("convert", help="rewrite a torch.save or safetensors file in ckptio's layout")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--unsafe", action="store_true", help="load SRC with weights_only=False (trusted files only)")
    p.set_defaults(fn=cmd_convert)
    p = sub.add_parser("bench", help="save/load/stall against torch.save, Lightning and DCP on this disk")
    p.add_argument("--dir", default=".", help="directory on the disk to measure (default: .)")
    p.add_argument("--size", type=_parse_size, default=_parse_size("1GiB"), help="state size, e.g. 512MiB, 1GiB")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", nargs="?", const="-", default=None, help="write results as JSON (to a file, or stdout)")
    p.add_argument("--plot", default=None, help="write a bar chart PNG")
    p.set_defaults(fn=cmd_bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
