"""`ckptio convert SRC DST`: between torch.save files (zip or legacy),
ckptio's aligned, checksummed layout and ``.safetensors``.

    SRC: a torch.save file (loaded weights-only unless --unsafe, every CRC
         checked) or a .safetensors file
    DST: NAME.safetensors -> safetensors (ckptio.safetensors_export states
         what it can hold; written without the safetensors package);
         any other name -> ckptio's layout

The destination is checked before the source is read (a typo in it fails at
once, not after minutes of loading) and written durably: on any failure,
whatever was at DST is untouched."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ._console import console as make_console, escape
from .cli_checks import check_legacy, unreadable_zip
from .cli_files import Kind, checkpoint_kind
from .cli_outcome import CliFailure, Exit, counted, failure_from, unsafe_message

__all__ = ["cmd_convert"]

_NEEDS_SAFETENSORS = "reading a .safetensors file needs the safetensors package: pip install 'ckptio[cli]'"


def cmd_convert(args: argparse.Namespace) -> int:
    src, dst = args.src, args.dst
    _check_destination(dst)
    obj = _read_safetensors(src) if src.endswith(".safetensors") else _read_checkpoint(src, unsafe=args.unsafe)
    out = make_console()
    if dst.endswith(".safetensors"):
        return _write_safetensors(obj, dst, tensors_only=args.tensors_only, out=out)
    from . import api

    try:
        result = api.save(obj, dst)
    except Exception as e:
        raise _named(failure_from(e, dst), dst) from e
    out.print(f"wrote {escape(dst)}: {counted(result.bytes, 'byte')}, 4096-aligned, CRC-32 on every record "
              f"(O_DIRECT: {result.direct_io})")
    return Exit.OK


def _check_destination(dst: str) -> None:
    if os.path.isdir(dst):
        raise CliFailure(Exit.NOT_CHECKED, "the destination is a directory; name the file to write", path=dst)
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise CliFailure(Exit.NOT_CHECKED, f"the destination's directory {os.path.dirname(dst) or '.'} {what}",
                         path=dst)
    if not os.access(parent, os.W_OK):
        raise CliFailure(Exit.NOT_CHECKED, "the destination's directory is not writable (permission denied)",
                         path=dst)


def _read_checkpoint(src: str, *, unsafe: bool) -> Any:
    from . import api
    from .errors import CorruptCheckpointError, UnsafeCheckpointError

    kind = Kind.ZIP if "://" in src else checkpoint_kind(src)  # a URL: ckptio.load fetches it
    if kind is Kind.DCP:
        raise CliFailure(Exit.UNSUPPORTED, "is a DCP checkpoint directory; convert reads one file (torch's "
                                           "torch.distributed.checkpoint.format_utils.dcp_to_torch_save makes one)")
    try:
        return api.load(src, weights_only=not unsafe, verify=True)
    except UnsafeCheckpointError as e:
        raise CliFailure(Exit.UNSAFE, unsafe_message(
            e.refused, str(e), hint="if you trust the file, pass --unsafe to load it with weights_only=False")) from e
    except CorruptCheckpointError as e:
        if kind is Kind.ZIP:
            raise unreadable_zip(src, e) from e
        if kind is Kind.LEGACY:  # no checksums: torch's reader failing is no proof of damage
            problem = check_legacy(src).problem or failure_from(e, src).message
            raise CliFailure(Exit.NOT_CHECKED, f"a legacy torch.save file that torch.load cannot read: {problem}"
                             ) from e
        raise


def _read_safetensors(src: str) -> Any:
    if os.path.isdir(src):
        raise CliFailure(Exit.NOT_CHECKED, "is a directory, not a .safetensors file")
    if not os.path.exists(src):
        raise CliFailure(Exit.NOT_CHECKED, "no such file or directory")
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CliFailure(Exit.UNSUPPORTED, _NEEDS_SAFETENSORS) from None
    try:
        return load_file(src)
    except SafetensorError as e:
        raise CliFailure(Exit.NOT_CHECKED, f"not a readable .safetensors file: {' '.join(str(e).split())}") from e


def _write_safetensors(obj: Any, dst: str, *, tensors_only: bool, out: Any) -> int:
    from .safetensors_export import CannotExportError, export_safetensors

    try:
        result = export_safetensors(obj, dst, tensors_only=tensors_only)
    except CannotExportError as e:
        raise CliFailure(Exit.UNSUPPORTED, f"cannot write safetensors: {e}", path=dst) from e
    except Exception as e:
        raise _named(failure_from(e, dst), dst) from e
    out.print(f"wrote {escape(dst)}: {counted(result.tensors, 'tensor')}, {counted(result.bytes, 'byte')} "
              "(safetensors)")
    if result.left_out:
        out.print(f"left out {counted(len(result.left_out), 'non-tensor value')} (--tensors-only): "
                  f"{escape(', '.join(result.left_out))}")
    if result.copied_shared:
        n = len(result.copied_shared)
        how = "was written as its own copy" if n == 1 else "were written as their own copies"
        out.print(f"{counted(n, 'tensor')} shared storage with another and {how} (safetensors cannot share "
                  f"storage; loading gives separate tensors): {escape(', '.join(result.copied_shared))}")
    return Exit.OK


def _named(failure: CliFailure, dst: str) -> CliFailure:
    """A failure while writing: the line names the destination, not the source."""
    return CliFailure(failure.code, f"cannot write it: {failure.message}", path=dst)
