"""`ckptio verify PATH...`: one line per checkpoint on stdout, for scripts:

    OK         PATH  (7 records, 297 bytes)
    DAMAGED    PATH  CRC-32 mismatch ... in record 'data/0'
    UNSAFE     PATH  whole, but its pickle names argparse.Namespace, which weights-only loading refuses
    UNCHECKED  PATH  no such file or directory

Only DAMAGED means damaged (exit code 1): a missing path, a directory, a
legacy file (which holds no checksums), a bad setting or a file that is not a
checkpoint are UNCHECKED, never DAMAGED. A path may be a torch.save file or a
DCP checkpoint directory. If any path is not OK, one line on stderr says so:
that path's reason, or a count when several are not OK."""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass

from .cli_checks import check_legacy, check_zip
from .cli_dcp import check_dcp
from .cli_files import Kind, checkpoint_kind, convert_hint
from .cli_inspect import dcp_failure
from .cli_outcome import CliFailure, Exit, counted, failure_from

__all__ = ["cmd_verify"]

_WORDS = {Exit.OK: "OK", Exit.DAMAGED: "DAMAGED", Exit.UNSAFE: "UNSAFE"}  # any other code: UNCHECKED


@dataclass
class Verdict:
    code: Exit
    detail: str


def cmd_verify(args: argparse.Namespace) -> int:
    verdicts = []
    for path in args.paths:
        try:
            verdict = verify_one(path)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - each path gets its own line; the next is still checked
            failure = failure_from(e, path)
            if failure.code in (Exit.BAD_SETTING, Exit.INTERNAL):
                raise  # not about this file: every path would fail alike
            if getattr(args, "debug", False):
                traceback.print_exc()
            verdict = Verdict(failure.code, _without_verdict_word(failure.message))
        verdicts.append((path, verdict))
        word = _WORDS.get(verdict.code, "UNCHECKED")
        print(f"{word:<9}  {path}  {verdict.detail}", flush=True)  # one line each, never wrapped: scripts parse it
    return _summary(verdicts)


def _summary(verdicts: list[tuple[str, Verdict]]) -> int:
    bad = [(p, v) for p, v in verdicts if v.code != Exit.OK]
    if not bad:
        return Exit.OK
    if len(bad) == 1:
        path, verdict = bad[0]
        print(f"ckptio verify: {path}: {verdict.detail}", file=sys.stderr, flush=True)
    else:
        damaged = sum(v.code == Exit.DAMAGED for _, v in bad)
        unsafe = sum(v.code == Exit.UNSAFE for _, v in bad)
        unchecked = len(bad) - damaged - unsafe
        parts = [f"{damaged} damaged" if damaged else "", f"{unsafe} unsafe" if unsafe else "",
                 f"{unchecked} not checked" if unchecked else ""]
        print(f"ckptio verify: {', '.join(p for p in parts if p)} (of {len(verdicts)})", file=sys.stderr, flush=True)
    if any(v.code == Exit.DAMAGED for _, v in bad):
        return Exit.DAMAGED
    return bad[0][1].code


def verify_one(path: str) -> Verdict:
    if "://" in path:
        return _verify_url(path)
    try:
        kind = checkpoint_kind(path)
    except CliFailure as e:
        return Verdict(e.code, e.message)
    if kind is Kind.DCP:
        return _verify_dcp(path)
    if kind is Kind.LEGACY:
        return _verify_legacy(path)
    return _verify_zip(path)


def _verify_url(url: str) -> Verdict:
    """A checkpoint at an fsspec URL (s3://...): ckptio.verify reads a copy."""
    from . import api
    from .errors import CkptioError

    try:
        result = api.verify(url)
    except (CkptioError, OSError):
        raise  # damaged, missing, ...: classified as for a local file
    except Exception as e:  # noqa: BLE001 - the object store's own errors (credentials, network, no bucket)
        return Verdict(Exit.NOT_CHECKED, f"cannot read it: {type(e).__name__}: {' '.join(str(e).split())}")
    return Verdict(Exit.OK, f"({counted(result.records, 'record')}, {counted(result.bytes, 'byte')})")


def _verify_zip(path: str) -> Verdict:
    check = check_zip(path)
    if check.damage:
        return Verdict(Exit.DAMAGED, check.damage)
    records = check.archive.records
    size = sum(r.size for r in records.values())
    if check.refused:
        return Verdict(Exit.UNSAFE, f"whole, but its pickle names {', '.join(check.refused)}, which weights-only "
                                    "loading refuses")
    return Verdict(Exit.OK, f"({counted(len(records), 'record')}, {counted(size, 'byte')})")


def _verify_legacy(path: str) -> Verdict:
    check = check_legacy(path)
    if check.refused:
        return Verdict(Exit.UNSAFE, f"a legacy torch.save file whose pickle names {', '.join(check.refused)}, which "
                                    "weights-only loading refuses; it holds no checksums to verify")
    if check.problem is not None:
        return Verdict(Exit.NOT_CHECKED, f"a legacy torch.save file that torch.load cannot read ({check.problem}); it "
                                         "holds no checksums to verify")
    return Verdict(Exit.NOT_CHECKED, f"a legacy torch.save file (before torch 1.6): it loads, but holds no checksums "
                                     f"to verify; {convert_hint(path)}")


def _verify_dcp(path: str) -> Verdict:
    check = check_dcp(path)
    failure = dcp_failure(check)
    if failure is not None:
        return Verdict(failure.code, _without_verdict_word(failure.message))
    chunks = check.chunks()
    return Verdict(Exit.OK, f"(DCP: {counted(len(check.files), 'rank file')}, {counted(len(check.entries), 'item')}, "
                            f"{counted(sum(c.length for c in chunks), 'byte')})")


def _without_verdict_word(message: str) -> str:
    """ "damaged: X" -> "X": the line's first word already says it."""
    for word in ("damaged: ", "unsafe: ", "not checked: "):
        if message.startswith(word):
            return message[len(word):]
    return message
